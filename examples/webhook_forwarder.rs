//! A policy program outside the CP: forward selected events of a running
//! CP to a webhook as JSON POSTs (`{"name", "at", "event"}`, the audit log's
//! record), retrying failed posts with backoff.
//!
//! It subscribes through the admin API's `WatchEvents` with the CLI
//! certificate and reconnects with jittered backoff when the CP restarts
//! ([`EventWatch`]); events published while it was disconnected are not
//! replayed (the bus keeps no history; the audit log has them).
//!
//! ```text
//! cargo run --example webhook_forwarder                                  # a loopback receiver prints the POSTs
//! cargo run --example webhook_forwarder -- --url http://127.0.0.1:9000/hook [--event agent.exec.]…
//! ```
//!
//! Default selection: `agent.untrusted`, `policy.` (containment steps) and
//! `agent.exec.` (operator commands in agents). State dir and admin
//! address as for `clawker` (`--state-dir`/`$CLAWKER_STATE_DIR`,
//! `--admin-addr`/`$CLAWKER_ADMIN_ADDR`), falling back to the demo's
//! `target/demo-state` when only it holds CLI credentials.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clawker::admin_api::watch::{EventWatch, WatchItem};
use clawker::policy::audit::AuditRecord;
use clawker::policy::webhook::{self, WebhookConfig};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A minimal loopback receiver: prints each request body.
async fn receiver() -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", l.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            // Read until the announced body is complete.
            while let Ok(n) = s.read(&mut buf[got..]).await {
                if n == 0 {
                    break;
                }
                got += n;
                let text = String::from_utf8_lossy(&buf[..got]);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        println!("webhook received: {body}");
                        break;
                    }
                }
                if got == buf.len() {
                    break;
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                .await;
        }
    });
    Ok(url)
}

struct Options {
    state_dir: PathBuf,
    admin_addr: SocketAddr,
    url: Option<String>,
    events: Vec<String>,
}

fn options() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut state_dir = None;
    let mut admin_addr = std::env::var("CLAWKER_ADMIN_ADDR").ok();
    let mut url = None;
    let mut events = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--state-dir" => state_dir = args.next().map(PathBuf::from),
            "--admin-addr" => admin_addr = args.next(),
            "--url" => url = args.next(),
            "--event" => events.extend(args.next()),
            other => anyhow::bail!(
                "unknown argument {other:?} (usage: [--url URL] [--event PREFIX]… [--state-dir DIR] [--admin-addr IP:PORT])"
            ),
        }
    }
    if events.is_empty() {
        events = vec![
            "agent.untrusted".into(),
            "policy.".into(),
            "agent.exec.".into(),
        ];
    }
    let state_dir = state_dir.unwrap_or_else(|| {
        let usual = clawker::config::default_state_dir();
        let creds = |d: &PathBuf| clawker::pki::AuthPaths::new(d).cli_cert().exists();
        let demo = PathBuf::from("target/demo-state");
        if !creds(&usual) && std::env::var_os("CLAWKER_STATE_DIR").is_none() && creds(&demo) {
            eprintln!("using the demo's state dir {}", demo.display());
            demo
        } else {
            usual
        }
    });
    let admin_addr = admin_addr
        .unwrap_or_else(|| clawker::defaults::ADMIN_ADDR.to_string())
        .parse()
        .context("--admin-addr: want IP:PORT")?;
    Ok(Options {
        state_dir,
        admin_addr,
        url,
        events,
    })
}

/// A streamed event as the webhook gets it (the audit log's record).
fn record(ev: &clawker::proto::admin::v1::Event) -> AuditRecord {
    let at = OffsetDateTime::from_unix_timestamp_nanos(ev.time_unix_nanos.into())
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default();
    AuditRecord {
        name: ev.name.clone(),
        at,
        event: serde_json::from_str(&ev.json).unwrap_or(serde_json::Value::Null),
    }
}

fn main() -> anyhow::Result<()> {
    let opts = options()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let url = match opts.url {
            Some(u) => u,
            None => receiver().await.context("starting the loopback receiver")?,
        };
        let cfg = WebhookConfig {
            url: url.clone(),
            events: Vec::new(), // the CP filters by prefix already
            ..WebhookConfig::default()
        };
        println!(
            "forwarding {:?} from {} to {url}",
            opts.events, opts.admin_addr
        );
        let mut watch = EventWatch::new(opts.state_dir, opts.admin_addr, opts.events);
        loop {
            match watch.next().await? {
                WatchItem::Connected(_) => println!("connected to the control plane"),
                WatchItem::Event(ev) => {
                    let name = ev.name.clone();
                    if !webhook::deliver(&cfg, &record(&ev)).await {
                        eprintln!("{name}: not delivered (see the log)");
                    }
                }
                WatchItem::Disconnected(why) => {
                    println!("control plane gone ({why}); reconnecting")
                }
            }
        }
    })
}
