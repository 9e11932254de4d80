//! Operator commands over the admin API: `agents`, `events`, `worldview`,
//! `tree`, `status`. Output goes to stdout (tables for people, `--json` for
//! scripts); errors carry what to do next (see
//! [`ClientError`](crate::admin_api::ClientError)).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Command;
use super::audit;
use crate::admin_api::{AdminClient, SERVICE_NAME};
use crate::proto::admin::v1 as pb;

pub(super) async fn run(
    state_dir: &Path,
    admin_addr: &str,
    command: Command,
) -> anyhow::Result<()> {
    let addr = || -> anyhow::Result<SocketAddr> {
        admin_addr.parse().with_context(|| {
            format!("--admin-addr / CLAWKER_ADMIN_ADDR {admin_addr:?} is not an IP:port address")
        })
    };
    let connect = |addr: SocketAddr| async move {
        AdminClient::connect(state_dir, addr)
            .await
            .map_err(anyhow::Error::from)
    };
    let mut out = std::io::stdout().lock();
    match command {
        Command::Ca(_) | Command::Cp(_) | Command::Agent(_) => {
            anyhow::bail!("internal: {command:?} is dispatched by cli::run")
        }
        Command::Agents { json } => {
            let agents = connect(addr()?).await?.list_agents().await?;
            if json {
                let rows: Vec<Value> = agents.iter().map(agent_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                write!(out, "{}", agents_table(&agents))?;
            }
        }
        Command::Events {
            follow,
            json,
            prefixes,
            last,
        } => {
            if follow {
                let client = connect(addr()?).await?;
                let mut stream = client.watch_events(prefixes).await?;
                while let Some(ev) = stream
                    .message()
                    .await
                    .context("the control plane ended the event stream")?
                {
                    let at = OffsetDateTime::from_unix_timestamp_nanos(ev.time_unix_nanos.into())
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                    let event: Value = serde_json::from_str(&ev.json).unwrap_or(Value::Null);
                    print_event(&mut out, json, &ev.name, &rfc3339(at), &event)?;
                    out.flush()?;
                }
            } else {
                let path = audit::audit_log_path(state_dir);
                let (records, skipped) = match audit::tail(&path, last, &prefixes) {
                    Ok(x) => x,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        eprintln!(
                            "no audit log at {} (is the CP's audit log enabled?); \
                             use --follow to stream live events",
                            path.display()
                        );
                        return Ok(());
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("reading {}", path.display()));
                    }
                };
                for r in &records {
                    print_event(&mut out, json, &r.name, &r.at, &r.event)?;
                }
                if skipped > 0 {
                    eprintln!("skipped {skipped} malformed line(s) in {}", path.display());
                }
            }
        }
        Command::Worldview { json } => {
            let view = connect(addr()?).await?.worldview().await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
            } else {
                write!(out, "{}", worldview_table(&view))?;
            }
        }
        Command::Tree { json } => {
            let tree = connect(addr()?).await?.tree().await?;
            if json {
                let v: Value = serde_json::from_str(&tree.json).context("malformed tree JSON")?;
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                write!(out, "{}", tree.rendered)?;
            }
        }
        Command::Status => {
            let addr = addr()?;
            let client = connect(addr).await?;
            let health = client.health(SERVICE_NAME).await?;
            let agents = client.list_agents().await?;
            let view = client.worldview().await?;
            writeln!(out, "control plane  reachable at {addr}")?;
            writeln!(out, "health         {}", health.as_str_name())?;
            writeln!(out, "agents         {} registered", agents.len())?;
            writeln!(out, "sessions       {}", session_counts(&view))?;
            if health != tonic_health::pb::health_check_response::ServingStatus::Serving {
                anyhow::bail!("the control plane at {addr} is not serving");
            }
        }
    }
    Ok(())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn unix_rfc3339(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .map(rfc3339)
        .unwrap_or_else(|_| secs.to_string())
}

fn short(s: &str, n: usize) -> &str {
    s.get(..n).unwrap_or(s)
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "project": a.project,
        "agent_name": a.agent_name,
        "container_id": a.container_id,
        "cert_thumbprint": a.cert_thumbprint,
        "registered_at_unix": a.registered_at_unix,
        "last_seen_unix": a.last_seen_unix,
    })
}

/// Left-aligned columns, two spaces apart, header first.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    s
}

fn agents_table(agents: &[pb::Agent]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                or_dash(&a.project).to_owned(),
                a.agent_name.clone(),
                short(&a.container_id, 12).to_owned(),
                short(&a.cert_thumbprint, 16).to_owned(),
                unix_rfc3339(a.registered_at_unix),
            ]
        })
        .collect();
    table(
        &["PROJECT", "AGENT", "CONTAINER", "THUMBPRINT", "REGISTERED"],
        &rows,
    )
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The INIT column: the latest start sequence with its plans, or what the
/// latest session decided when nothing ran, and a termination if any.
fn init_cell(a: &Value) -> String {
    let start_plans = a["start"]["plans"].as_array();
    let skipped = str_at(a, &["start", "skipped"]);
    let mut cell = if start_plans.is_some_and(|p| p.is_empty()) {
        match skipped {
            "cmd_running" => "reattached (command running)".to_owned(),
            "" => "-".to_owned(),
            other => format!("skipped:{other}"),
        }
    } else {
        let status = or_dash(str_at(a, &["init", "status"])).to_owned();
        let plans: Vec<&str> = a["init"]["plans"]
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if status == "running" {
            format!(
                "running {}/{} {} ({})",
                a["init"]["step_index"].as_u64().unwrap_or(0) + 1,
                a["init"]["step_count"].as_u64().unwrap_or(0),
                str_at(a, &["init", "step"]),
                or_dash(str_at(a, &["init", "plan"]))
            )
        } else if plans.is_empty() {
            status
        } else {
            format!("{status} ({})", plans.join("+"))
        }
    };
    if a["terminated"].is_object() {
        cell.push_str(&format!(
            "; ended by {} after {} {} (exit {})",
            str_at(a, &["terminated", "by"]),
            str_at(a, &["terminated", "plan"]),
            str_at(a, &["terminated", "step"]),
            a["terminated"]["exit_code"].as_i64().unwrap_or(-1)
        ));
    }
    cell
}

fn worldview_table(view: &Value) -> String {
    let empty = serde_json::Map::new();
    let agents = view
        .get("agents")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let rows: Vec<Vec<String>> = agents
        .values()
        .map(|a| {
            let trust = if a["trust"]["trusted"].as_bool().unwrap_or(false) {
                "trusted".to_owned()
            } else if a["trust"]["at"].is_null() && a["trust"]["reason"].is_null() {
                // No decision yet in this session (connecting, or never connected).
                "pending".to_owned()
            } else {
                format!("untrusted:{}", or_dash(str_at(a, &["trust", "reason"])))
            };
            let init = init_cell(a);
            vec![
                or_dash(str_at(a, &["project"])).to_owned(),
                or_dash(str_at(a, &["agent"])).to_owned(),
                short(str_at(a, &["container_id"]), 12).to_owned(),
                or_dash(str_at(a, &["session_status"])).to_owned(),
                if a["registered"].as_bool().unwrap_or(false) {
                    "yes".into()
                } else {
                    "no".into()
                },
                trust,
                init.trim_end().to_owned(),
                or_dash(str_at(a, &["leaf_not_after"])).to_owned(),
                a["rotations"].as_u64().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    let mut s = table(
        &[
            "PROJECT",
            "AGENT",
            "CONTAINER",
            "SESSION",
            "REGISTERED",
            "TRUST",
            "INIT",
            "LEAF EXPIRES",
            "ROTATIONS",
        ],
        &rows,
    );
    let containers = view
        .get("containers")
        .and_then(Value::as_object)
        .map_or(0, |m| m.len());
    s.push_str(&format!(
        "{} agent(s), {containers} container(s) known\n",
        rows.len()
    ));
    s
}

/// `connected=2 failed=1`, or `none`.
fn session_counts(view: &Value) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    if let Some(agents) = view.get("agents").and_then(Value::as_object) {
        for a in agents.values() {
            *counts
                .entry(a["session_status"].as_str().unwrap_or("unknown"))
                .or_default() += 1;
        }
    }
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `--json`: `{"name","at","event"}` (the audit log's shape); otherwise
/// `<time> <name> <container_id[..12]> <key=value …>`.
fn print_event(
    out: &mut impl Write,
    as_json: bool,
    name: &str,
    at: &str,
    event: &Value,
) -> std::io::Result<()> {
    if as_json {
        let line = json!({"name": name, "at": at, "event": event});
        return writeln!(out, "{line}");
    }
    writeln!(out, "{}", human_event(name, at, event))
}

fn human_event(name: &str, at: &str, event: &Value) -> String {
    let cid = str_at(event, &["container_id"]);
    let mut s = format!("{at} {name} {}", or_dash(short(cid, 12)));
    if let Some(fields) = event.as_object() {
        for (k, v) in fields {
            if k == "container_id" || k == "at" {
                continue;
            }
            let v = match v {
                Value::String(s) if !s.is_empty() && !s.contains(char::is_whitespace) => s.clone(),
                other => other.to_string(),
            };
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_event_line_shape() {
        let ev = json!({
            "container_id": "0123456789abcdef",
            "agent": "dev",
            "reason": "connection reset",
            "attempts": 3,
            "at": "2024-01-01T00:00:00Z",
        });
        assert_eq!(
            human_event("agent.session.broken", "2024-01-01T00:00:00Z", &ev),
            "2024-01-01T00:00:00Z agent.session.broken 0123456789ab agent=dev attempts=3 \
             reason=\"connection reset\""
        );
        assert_eq!(
            human_event("agent.reap.degraded", "t", &json!({"reason": "x"})),
            "t agent.reap.degraded - reason=x"
        );
    }

    #[test]
    fn agents_table_truncates_ids_and_formats_times() {
        let t = agents_table(&[pb::Agent {
            agent_name: "dev".into(),
            container_id: "0123456789abcdef0123".into(),
            cert_thumbprint: "ab".repeat(32),
            registered_at_unix: 1_704_067_200,
            last_seen_unix: 0,
            project: String::new(),
        }]);
        let lines: Vec<_> = t.lines().collect();
        assert!(lines[0].starts_with("PROJECT  AGENT  CONTAINER"), "{t}");
        assert!(
            lines[1]
                .contains("-        dev    0123456789ab  abababababababab  2024-01-01T00:00:00Z"),
            "{t}"
        );
    }

    #[test]
    fn worldview_table_and_session_counts() {
        let view = json!({
            "containers": {},
            "agents": {
                "c1": {"container_id": "c1", "agent": "dev", "project": "web",
                       "session_status": "connected", "registered": true,
                       "trust": {"trusted": true},
                       "init": {"status": "running", "plan": "init", "plans": ["init", "boot"], "step": "git", "step_index": 2, "step_count": 9},
                       "leaf_not_after": "2030-01-01T00:00:10Z", "rotations": 12},
                "c2": {"container_id": "c2", "agent": "x", "project": "",
                       "session_status": "failed", "registered": false,
                       "trust": {"trusted": false, "reason": "cert_invalid"},
                       "init": {"status": "unknown"}},
                "c3": {"container_id": "c3", "agent": "y", "project": "web",
                       "session_status": "connecting", "registered": false,
                       "trust": {"trusted": false, "reason": null, "at": null},
                       "init": {"status": "unknown"}},
            }
        });
        let t = worldview_table(&view);
        assert!(t.contains("running 3/9 git (init)"), "{t}");
        assert!(t.contains("LEAF EXPIRES"), "{t}");
        assert!(t.contains("2030-01-01T00:00:10Z  12"), "{t}");
        assert!(t.contains("untrusted:cert_invalid"), "{t}");
        assert!(
            t.contains("pending"),
            "undecided trust is shown as pending: {t}"
        );
        assert!(t.ends_with("3 agent(s), 0 container(s) known\n"), "{t}");
        assert_eq!(session_counts(&view), "connected=1 connecting=1 failed=1");
        assert_eq!(session_counts(&json!({})), "none");
    }

    #[test]
    fn init_cell_shows_plans_reattach_and_termination() {
        let done = json!({"start": {"plans": ["boot"], "skipped": ""},
                          "init": {"status": "completed", "plans": ["boot"]}});
        assert_eq!(init_cell(&done), "completed (boot)");
        let reattached = json!({"start": {"plans": [], "skipped": "cmd_running"},
                                "init": {"status": "unknown"}});
        assert_eq!(init_cell(&reattached), "reattached (command running)");
        let withheld = json!({"start": {"plans": [], "skipped": "untrusted"}});
        assert_eq!(init_cell(&withheld), "skipped:untrusted");
        let ended = json!({"start": {"plans": ["boot"], "skipped": ""},
                           "init": {"status": "failed", "plans": ["boot"]},
                           "terminated": {"by": "self_exit", "plan": "boot", "step": "pre-run", "exit_code": 3}});
        assert_eq!(
            init_cell(&ended),
            "failed (boot); ended by self_exit after boot pre-run (exit 3)"
        );
        assert_eq!(
            init_cell(&json!({"init": {"status": "unknown"}})),
            "unknown"
        );
    }
}
