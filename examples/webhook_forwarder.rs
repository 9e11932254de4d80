//! Forward selected CP events to a webhook as JSON POSTs (the logic is
//! `clawker::policy::webhook`; this is a thin main).
//!
//! ```text
//! cargo run --example webhook_forwarder                              # built-in loopback receiver prints the POSTs
//! cargo run --example webhook_forwarder -- http://127.0.0.1:9000/hook
//! ```
//!
//! It starts its own bus and publishes a few synthetic events; in the CP
//! the daemon adds `WebhookForwarder::spec(bus, cfg)` to its `policy`
//! supervisor instead.

use std::time::Duration;

use clawker::events::{self, AgentRef, AgentTrusted, AgentUntrusted, UntrustedReason};
use clawker::policy::webhook::{WebhookConfig, WebhookForwarder};
use clawker_actors::{Supervisor, SupervisorSpec};

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
            }
            let _ = s
                .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                .await;
        }
    });
    Ok(url)
}

fn main() {
    let arg = std::env::args().nth(1);
    actix::System::new().block_on(async move {
        let url = match arg {
            Some(u) => u,
            None => match receiver().await {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("cannot start the loopback receiver: {e}");
                    return;
                }
            },
        };
        println!("forwarding agent.untrusted and policy.* events to {url}");
        let bus = events::start_bus();
        let cfg = WebhookConfig {
            url,
            events: vec!["agent.untrusted".into(), "policy.*".into()],
            ..WebhookConfig::default()
        };
        let sup = Supervisor::start(
            SupervisorSpec::new("policy").child(WebhookForwarder::spec(bus.clone(), cfg)),
        );
        while bus.stats().subscribers == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bus.publish(AgentTrusted {
            agent: AgentRef::new("c-trusted", "dev", "example"),
            rotations: 0,
            at: events::now(),
        }); // not selected: not forwarded
        bus.publish(AgentUntrusted {
            agent: AgentRef::new("c-bad", "dev", "example"),
            reason: UntrustedReason::CertInvalid,
            detail: "synthetic event from the example".into(),
            at: events::now(),
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        sup.shutdown();
    });
}
