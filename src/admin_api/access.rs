//! Who may go into which agent, as whom, and the record of it: the part
//! of the operator RPCs (`Exec`, `CopyFrom`, `CopyTo`, `Logs`) that is not
//! about moving bytes.
//!
//! - **Target**: a name (+ project) or a container id, resolved against
//!   the worldview (the agents the CP holds sessions to).
//! - **Gate**: an agent that is untrusted (its latest verdict, or its
//!   session's), quarantined or locked (its containment records, see
//!   [`AgentView::restrictions`]) is refused with the reasons — and an
//!   `agent.exec.refused` event — unless the operator forces it, which
//!   publishes `agent.exec.forced`. `Logs` is read-only and never refused.
//! - **Identity**: the operator is the SHA-256 thumbprint of the CLI
//!   certificate of the connection (the admin API admits nothing else).
//! - **Audit**: [`Use`] publishes `agent.exec.started` and
//!   `agent.exec.finished` for every use, with a truncated argv.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tonic::Status;

use crate::defaults::agent_user;
use crate::events::worldview::AgentView;
use crate::events::{self, AgentRef, Bus, ExecKind};
use crate::identity::Thumbprint;
use crate::proto::admin::v1 as pb;
use crate::session::Sessions;
use crate::session::command;
use crate::session::lifecycle::LiveSession;
use crate::session::mux::SessionMux;

/// How the operator RPCs reach an agent's open session.
pub trait LiveSessions: Send + Sync + 'static {
    fn live<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, Option<LiveSession>>;
}

impl LiveSessions for Sessions {
    fn live<'a>(&'a self, container_id: &'a str) -> BoxFuture<'a, Option<LiveSession>> {
        Box::pin(Sessions::live(self, container_id))
    }
}

/// At most this many argv entries reach events, each cut to
/// [`MAX_ARG_CHARS`] characters.
pub const MAX_ARGS: usize = 32;
pub const MAX_ARG_CHARS: usize = 256;

/// argv as events carry it: bounded in count and length.
pub fn truncate_argv(argv: &[String]) -> Vec<String> {
    let mut out: Vec<String> = argv
        .iter()
        .take(MAX_ARGS)
        .map(|a| match a.char_indices().nth(MAX_ARG_CHARS) {
            Some((i, _)) => format!("{}…", &a[..i]),
            None => a.clone(),
        })
        .collect();
    if argv.len() > MAX_ARGS {
        out.push(format!("…(+{} more)", argv.len() - MAX_ARGS));
    }
    out
}

/// The operator: thumbprint of the connection's client certificate.
pub fn operator_of<T>(req: &tonic::Request<T>) -> String {
    req.peer_certs()
        .and_then(|c| c.first().map(|der| Thumbprint::of_der(der).to_hex()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Why an agent is refused without `force` (empty: it is not).
pub fn refusal_reasons(view: &AgentView, session_trusted: bool) -> Vec<String> {
    let mut reasons = Vec::new();
    if !view.trust.trusted {
        let why = view.trust.reason.map(|r| r.as_str()).unwrap_or("unknown");
        reasons.push(format!("untrusted:{why}"));
    } else if !session_trusted {
        reasons.push("untrusted:session".to_owned());
    }
    let r = view.restrictions();
    if r.quarantined {
        reasons.push("quarantined".to_owned());
    }
    if r.locked {
        reasons.push("locked".to_owned());
    }
    reasons
}

/// Finds the agent a target names among `agents` (the worldview's).
pub fn find_agent<'a>(
    agents: impl Iterator<Item = &'a AgentView>,
    target: &pb::AgentTarget,
) -> Result<&'a AgentView, Status> {
    let all: Vec<&AgentView> = agents.collect();
    let name = target.agent.as_str();
    if name.is_empty() {
        return Err(Status::invalid_argument("no agent named"));
    }
    let by_name: Vec<&AgentView> = all
        .iter()
        .copied()
        .filter(|a| a.agent == name && a.project == target.project)
        .collect();
    let candidates =
        if by_name.is_empty() && name.len() >= 12 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            all.iter()
                .copied()
                .filter(|a| a.container_id.starts_with(name))
                .collect()
        } else {
            by_name
        };
    let shown = if target.project.is_empty() {
        name.to_owned()
    } else {
        format!("{}/{name}", target.project)
    };
    match candidates.len() {
        0 => Err(Status::not_found(format!(
            "no agent {shown} known to the control plane (see `clawker worldview`)"
        ))),
        1 => Ok(candidates[0]),
        _ => {
            // Two containers claim the name (an impostor, or a leftover):
            // prefer the one with an open session, else make the operator
            // pick by container id.
            let connected: Vec<&AgentView> = candidates
                .iter()
                .copied()
                .filter(|a| a.session_status == events::worldview::SessionStatus::Connected)
                .collect();
            if connected.len() == 1 {
                return Ok(connected[0]);
            }
            let ids: Vec<&str> = candidates
                .iter()
                .map(|a| a.container_id.get(..12).unwrap_or(&a.container_id))
                .collect();
            Err(Status::failed_precondition(format!(
                "{} containers claim agent {shown} ({}); name one by container id",
                candidates.len(),
                ids.join(", ")
            )))
        }
    }
}

/// The user a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

impl ExecUser {
    pub fn agent() -> Self {
        Self {
            name: agent_user::NAME.into(),
            uid: agent_user::UID,
            gid: agent_user::GID,
            home: agent_user::HOME.into(),
        }
    }

    pub fn root() -> Self {
        Self {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
        }
    }

    /// HOME/USER/LOGNAME (dropping privileges does not change them), under
    /// the operator's own variables.
    pub fn env(
        &self,
        extra: &std::collections::HashMap<String, String>,
    ) -> std::collections::HashMap<String, String> {
        let mut env = std::collections::HashMap::new();
        if !self.home.is_empty() {
            env.insert("HOME".to_owned(), self.home.clone());
        }
        if !self.name.is_empty() {
            env.insert("USER".to_owned(), self.name.clone());
            env.insert("LOGNAME".to_owned(), self.name.clone());
        }
        env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
}

/// One `/etc/passwd` line's user, if `spec` names it (by name or uid).
pub fn passwd_lookup(passwd: &str, spec: &str) -> Option<ExecUser> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        let (uid, gid) = (f[2].parse().ok()?, f[3].parse().ok()?);
        (f[0] == spec || f[2] == spec).then(|| ExecUser {
            name: f[0].to_owned(),
            uid,
            gid,
            home: f[5].to_owned(),
        })
    })
}

/// Resolves `--user`: "" = the agent user, "root", "uid:gid" directly;
/// a name or a bare uid through the container's `/etc/passwd` (read over
/// the session: the CP has no other view of the container's users).
pub async fn resolve_user(spec: &str, mux: &SessionMux, id: &str) -> Result<ExecUser, Status> {
    match spec {
        "" => return Ok(ExecUser::agent()),
        "root" | "0" | "0:0" => return Ok(ExecUser::root()),
        _ => {}
    }
    if let Some((u, g)) = spec.split_once(':')
        && let (Ok(uid), Ok(gid)) = (u.parse::<u32>(), g.parse::<u32>())
    {
        return Ok(ExecUser {
            name: String::new(),
            uid,
            gid,
            home: String::new(),
        });
    }
    let cat = crate::proto::clawkerd::v1::ShellCommand {
        stages: vec![crate::proto::clawkerd::v1::PipeStage {
            argv: vec!["cat".into(), "/etc/passwd".into()],
            ..Default::default()
        }],
        timeout_seconds: 5,
        ..Default::default()
    };
    let done = command::run_to_completion(mux, id, cat, Duration::from_secs(10), 256 * 1024)
        .await
        .map_err(|e| Status::unavailable(format!("reading the container's /etc/passwd: {e}")))?;
    let passwd = String::from_utf8_lossy(&done.stdout.head);
    if let Some(u) = passwd_lookup(&passwd, spec) {
        return Ok(u);
    }
    if let Ok(uid) = spec.parse::<u32>() {
        // A uid without a passwd entry: its own group, like `docker exec -u`.
        return Ok(ExecUser {
            name: String::new(),
            uid,
            gid: uid,
            home: String::new(),
        });
    }
    Err(Status::invalid_argument(format!(
        "no user {spec:?} in the container's /etc/passwd"
    )))
}

/// An admitted operator use of one agent.
pub struct Opened {
    pub live: LiveSession,
    pub agent: AgentRef,
    pub forced: bool,
}

/// What [`open`] needs to know about the request.
pub struct Ask<'a> {
    pub kind: ExecKind,
    pub target: &'a pb::AgentTarget,
    pub force: bool,
    pub operator: &'a str,
    pub argv: &'a [String],
    pub exec_id: &'a str,
}

/// Resolves the target, applies the gate (publishing refusals and forces)
/// and borrows the agent's live session.
pub async fn open(
    bus: &Bus,
    sessions: Option<&Arc<dyn LiveSessions>>,
    ask: Ask<'_>,
) -> Result<Opened, Status> {
    let sessions = sessions
        .ok_or_else(|| Status::unavailable("this admin API has no access to agent sessions"))?;
    let view = bus
        .snapshot()
        .await
        .map_err(|e| Status::unavailable(format!("worldview: {e}")))?;
    let agent = find_agent(view.agents.values(), ask.target)?;
    let who = AgentRef::new(
        agent.container_id.clone(),
        agent.agent.clone(),
        agent.project.clone(),
    );
    let live = sessions.live(&agent.container_id).await.ok_or_else(|| {
        Status::unavailable(format!(
            "no open session to agent {} ({}): session {:?}",
            agent.agent,
            agent.container_id.get(..12).unwrap_or(&agent.container_id),
            agent.session_status
        ))
    })?;
    let reasons = if ask.kind == ExecKind::Logs {
        Vec::new()
    } else {
        refusal_reasons(agent, live.trusted)
    };
    if !reasons.is_empty() && !ask.force {
        bus.publish(events::ExecRefused {
            agent: who,
            kind: ask.kind,
            operator: ask.operator.to_owned(),
            argv: ask.argv.to_vec(),
            reasons: reasons.clone(),
            at: events::now(),
        });
        return Err(Status::failed_precondition(format!(
            "refused: agent {} is {}; pass --force to {} anyway (it will be recorded)",
            agent.agent,
            reasons.join(", "),
            match ask.kind {
                ExecKind::Exec => "exec",
                ExecKind::CopyFrom | ExecKind::CopyTo => "copy",
                ExecKind::Logs => "read logs",
            }
        )));
    }
    let forced = !reasons.is_empty();
    if forced {
        tracing::warn!(event = "exec_forced", container_id = %who.container_id, operator = ask.operator, reasons = ?reasons);
        bus.publish(events::ExecForced {
            agent: who.clone(),
            exec_id: ask.exec_id.to_owned(),
            kind: ask.kind,
            operator: ask.operator.to_owned(),
            argv: ask.argv.to_vec(),
            reasons,
            at: events::now(),
        });
    }
    Ok(Opened {
        live,
        agent: who,
        forced,
    })
}

/// One use, as the audit log and metrics see it.
pub struct Use {
    pub bus: Bus,
    pub agent: AgentRef,
    pub exec_id: String,
    pub kind: ExecKind,
    pub operator: String,
    pub argv: Vec<String>,
    pub user: String,
    pub tty: bool,
    pub started: Instant,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Use {
    pub fn publish_started(&self, forced: bool) {
        self.bus.publish(events::ExecStarted {
            agent: self.agent.clone(),
            exec_id: self.exec_id.clone(),
            kind: self.kind,
            operator: self.operator.clone(),
            argv: self.argv.clone(),
            user: self.user.clone(),
            tty: self.tty,
            forced,
            at: events::now(),
        });
    }

    pub fn publish_finished(&self, exit_code: Option<i32>, error: impl Into<String>) {
        let error = error.into();
        tracing::info!(
            event = "exec_finished",
            exec_id = %self.exec_id,
            kind = self.kind.as_str(),
            container_id = %self.agent.container_id,
            exit_code,
            error = %error,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
        );
        self.bus.publish(events::ExecFinished {
            agent: self.agent.clone(),
            exec_id: self.exec_id.clone(),
            kind: self.kind,
            operator: self.operator.clone(),
            argv: self.argv.clone(),
            user: self.user.clone(),
            tty: self.tty,
            exit_code,
            error,
            duration: self.started.elapsed(),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            at: events::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::worldview::{ContainmentRecord, SessionStatus, Trust};
    use crate::events::{ContainmentAction as A, ContainmentOutcome as O, UntrustedReason};

    fn view(id: &str, name: &str) -> AgentView {
        let mut w = events::Worldview::default();
        let e = events::AgentTrusted {
            agent: AgentRef::new(id, name, "p"),
            rotations: 0,
            at: events::now(),
        };
        w.apply_event(&e);
        w.agents.remove(id).unwrap()
    }

    fn record(action: A, outcome: O) -> ContainmentRecord {
        ContainmentRecord {
            trigger: "untrusted:cert_invalid".into(),
            action,
            outcome,
            detail: String::new(),
            at: events::now(),
        }
    }

    #[test]
    fn untrusted_quarantined_and_locked_are_reasons() {
        let mut a = view("c1", "dev");
        assert!(refusal_reasons(&a, true).is_empty());
        assert_eq!(refusal_reasons(&a, false), ["untrusted:session"]);
        a.trust = Trust {
            trusted: false,
            reason: Some(UntrustedReason::CertInvalid),
            detail: String::new(),
            at: Some(events::now()),
        };
        a.containment = vec![
            record(A::Alert, O::Applied),
            record(A::Isolate, O::Failed),
            record(A::Lock, O::Unsupported),
        ];
        assert_eq!(refusal_reasons(&a, true), ["untrusted:cert_invalid"]);
        a.containment.push(record(A::Isolate, O::AlreadyApplied));
        a.containment.push(record(A::Lock, O::Applied));
        assert_eq!(
            refusal_reasons(&a, true),
            ["untrusted:cert_invalid", "quarantined", "locked"]
        );
    }

    #[test]
    fn targets_resolve_by_name_or_container_prefix_and_ambiguity_is_explained() {
        let a = view("aaaaaaaaaaaa1111", "dev");
        let mut b = view("bbbbbbbbbbbb2222", "dev");
        let c = view("cccccccccccc3333", "other");
        let t = |agent: &str| pb::AgentTarget {
            agent: agent.into(),
            project: "p".into(),
        };
        let all = [a.clone(), b.clone(), c.clone()];
        assert_eq!(
            find_agent(all.iter(), &t("other")).unwrap().container_id,
            c.container_id
        );
        assert_eq!(
            find_agent(all.iter(), &t("bbbbbbbbbbbb"))
                .unwrap()
                .container_id,
            b.container_id
        );
        let e = find_agent(all.iter(), &t("dev")).unwrap_err();
        assert!(e.message().contains("2 containers claim"), "{e:?}");
        b.session_status = SessionStatus::Connected;
        let all = [a, b.clone(), c];
        assert_eq!(
            find_agent(all.iter(), &t("dev")).unwrap().container_id,
            b.container_id
        );
        assert_eq!(
            find_agent(all.iter(), &t("nobody")).unwrap_err().code(),
            tonic::Code::NotFound
        );
    }

    #[test]
    fn argv_is_bounded_for_events() {
        let long = "x".repeat(1000);
        let argv: Vec<String> = std::iter::once(long)
            .chain((0..40).map(|i| i.to_string()))
            .collect();
        let t = truncate_argv(&argv);
        assert_eq!(t.len(), MAX_ARGS + 1);
        assert_eq!(t[0].chars().count(), MAX_ARG_CHARS + 1);
        assert_eq!(t.last().unwrap(), "…(+9 more)");
    }

    #[test]
    fn passwd_names_and_uids_resolve() {
        let p = "root:x:0:0:root:/root:/bin/sh\nclaude:x:1001:1001:claude:/home/claude:/bin/sh\nbad line\n";
        assert_eq!(passwd_lookup(p, "claude").unwrap().home, "/home/claude");
        assert_eq!(passwd_lookup(p, "1001").unwrap().name, "claude");
        assert!(passwd_lookup(p, "nobody").is_none());
        let env = ExecUser::agent().env(&[("HOME".to_owned(), "/x".to_owned())].into());
        assert_eq!(env["HOME"], "/x");
        assert_eq!(env["USER"], "claude");
    }
}
