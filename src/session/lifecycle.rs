//! The life of one agent's session (reference `cp-session.md` §5–9):
//! resolve → dial (with retries) → Hello → classify → maybe Register →
//! init → hold → on break, reconnect.
//!
//! This is plain async code; the session actor runs it as a task and owns
//! its lifetime (aborting it is how a session is stopped, which is why a
//! stopped or shut-down session publishes nothing further).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::events::{self, Publish, UntrustedReason, failed_reason};

use super::classify::{self, Classification, RegistryLookup};
use super::dial::{self, DialConfig};
use super::init::{self, InitConfig, InitTarget};
use super::mux::SessionMux;
use super::register;

/// What the session needs to know about its container, re-read on every
/// attempt of the slow phase.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedTarget {
    pub agent: String,
    pub project: String,
    pub running: bool,
    /// clawkerd's address (clawker-net IP : 7700 in production).
    pub addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("container not found")]
    NotFound,
    #[error("inspect: {0}")]
    Transient(String),
}

/// How a session finds its container (Docker inspect in production).
pub trait ContainerResolver: Send + Sync + 'static {
    fn resolve(
        &self,
        container_id: &str,
    ) -> futures::future::BoxFuture<'_, Result<ResolvedTarget, ResolveError>>;
}

/// Retry policy of one establish cycle.
#[derive(Debug, Clone, Copy)]
pub struct EstablishConfig {
    /// Budget of one cycle (reference: 60 s).
    pub total: Duration,
    /// Fast phase: right after a container starts, clawkerd is usually a
    /// few milliseconds from listening. Retry at `fast_interval` for this
    /// long before falling back to the jittered ladder, instead of the
    /// reference's 500 ms full-jitter first sleep (~250 ms added to every
    /// agent start).
    pub fast_window: Duration,
    pub fast_interval: Duration,
    /// Jittered ladder: ceilings `initial`, ×2, … capped at `max`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for EstablishConfig {
    fn default() -> Self {
        Self {
            total: Duration::from_secs(60),
            fast_window: Duration::from_secs(2),
            fast_interval: Duration::from_millis(5),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Full-jitter exponential backoff: each sleep is uniform in [0, ceiling).
#[derive(Debug, Clone)]
pub struct Ladder {
    ceiling: Duration,
    max: Duration,
}

impl Ladder {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            ceiling: initial,
            max,
        }
    }

    /// The next sleep; advances the ceiling.
    pub fn next_sleep(&mut self) -> Duration {
        let c = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        if c.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_nanos(fastrand::u64(0..c.as_nanos() as u64))
    }

    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }
}

/// Session-wide policy.
#[derive(Debug, Clone)]
pub struct SessionPolicy {
    pub establish: EstablishConfig,
    pub init: InitConfig,
    pub register_timeout: Duration,
    /// Register rounds per session actor (the reference retried forever).
    pub max_register_attempts: u32,
    /// Run init for agents that are not trusted (default off: the
    /// reference ran it for everyone, releasing an untrusted user command).
    pub init_untrusted: bool,
    /// After a stream ends, how long to let Docker catch up before asking
    /// whether the container is still running.
    pub break_grace: Duration,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self {
            establish: EstablishConfig::default(),
            init: InitConfig::default(),
            register_timeout: register::REGISTER_REQUIRED_TIMEOUT,
            max_register_attempts: 3,
            init_untrusted: false,
            break_grace: Duration::from_millis(150),
        }
    }
}

/// Everything a session task needs.
pub struct SessionDeps<P: Publish> {
    pub resolver: Arc<dyn ContainerResolver>,
    pub registry: Arc<dyn RegistryLookup>,
    pub dial: DialConfig,
    pub sink: P,
    pub policy: SessionPolicy,
}

impl<P: Publish> Clone for SessionDeps<P> {
    fn clone(&self) -> Self {
        Self {
            resolver: self.resolver.clone(),
            registry: self.registry.clone(),
            dial: self.dial.clone(),
            sink: self.sink.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The open session, as other actors may use it (e.g. containment runs a
/// command over it). `None` while (re)connecting.
#[derive(Clone, Debug)]
pub struct LiveSession {
    pub mux: SessionMux,
    pub agent: String,
    pub project: String,
    pub trusted: bool,
}

enum Established {
    Ok {
        conn: Box<dial::Connection>,
        target: ResolvedTarget,
        addr: SocketAddr,
        attempts: u32,
    },
    Failed {
        reason: String,
        agent: String,
        project: String,
        address: String,
        attempts: u32,
    },
}

async fn establish<P: Publish>(container_id: &str, deps: &SessionDeps<P>) -> Established {
    let cfg = deps.policy.establish;
    let started = Instant::now();
    let mut ladder = Ladder::new(cfg.initial_backoff, cfg.max_backoff);
    let mut attempts = 0u32;
    let mut connecting_published = false;
    let mut cached: Option<(ResolvedTarget, SocketAddr)> = None;
    let fail = |reason: &str, t: Option<&ResolvedTarget>, addr: Option<SocketAddr>, attempts| {
        Established::Failed {
            reason: reason.to_owned(),
            agent: t.map(|t| t.agent.clone()).unwrap_or_default(),
            project: t.map(|t| t.project.clone()).unwrap_or_default(),
            address: addr.map(|a| a.to_string()).unwrap_or_default(),
            attempts,
        }
    };
    loop {
        attempts += 1;
        let in_fast_phase = started.elapsed() < cfg.fast_window;
        // Within the fast phase the address cannot have changed; skip the
        // inspect round trip and just re-dial.
        let (target, addr) = match cached.clone().filter(|_| in_fast_phase) {
            Some(c) => c,
            None => match deps.resolver.resolve(container_id).await {
                Err(ResolveError::NotFound) => {
                    return fail(failed_reason::CONTAINER_NOT_RUNNING, None, None, attempts);
                }
                Ok(t) if !t.running => {
                    return fail(failed_reason::CONTAINER_NOT_RUNNING, None, None, attempts);
                }
                Err(ResolveError::Transient(e)) => {
                    if started.elapsed() > cfg.total {
                        tracing::error!(event = "agentdial_inspect_timeout", container_id, error = %e, "giving up");
                        return fail(failed_reason::CONNECT_TOTAL_TIMEOUT, None, None, attempts);
                    }
                    tracing::warn!(event = "agentdial_inspect_retry", container_id, error = %e, "inspect failed; retrying");
                    tokio::time::sleep(ladder.next_sleep()).await;
                    continue;
                }
                Ok(t) => match t.addr {
                    None => {
                        tracing::error!(
                            event = "agentdial_attempt_addr_extract_failed",
                            container_id,
                            "container has no clawker-net endpoint"
                        );
                        return fail(failed_reason::ENDPOINT_MISSING, Some(&t), None, attempts);
                    }
                    Some(a) => {
                        cached = Some((t.clone(), a));
                        (t, a)
                    }
                },
            },
        };
        if !connecting_published {
            connecting_published = true;
            deps.sink.publish(events::SessionConnecting {
                container_id: container_id.to_owned(),
                agent: target.agent.clone(),
                project: target.project.clone(),
                address: addr.to_string(),
                at: events::now(),
            });
        }
        match dial::connect(addr, &deps.dial).await {
            Ok(conn) => {
                return Established::Ok {
                    conn: Box::new(conn),
                    target,
                    addr,
                    attempts,
                };
            }
            Err(e) => {
                if started.elapsed() > cfg.total {
                    tracing::error!(event = "agentdial_connect_timeout", container_id, dial_target = %addr, error = %e, "giving up");
                    return fail(
                        failed_reason::CONNECT_TOTAL_TIMEOUT,
                        Some(&target),
                        Some(addr),
                        attempts,
                    );
                }
                let sleep = if started.elapsed() < cfg.fast_window {
                    cfg.fast_interval
                } else {
                    ladder.next_sleep()
                };
                tracing::debug!(event = "agentdial_connect_retry", container_id, dial_target = %addr, retry_in_ms = sleep.as_millis() as u64, error = %e, "dial failed; retrying");
                tokio::time::sleep(sleep).await;
            }
        }
    }
}

/// Runs the session until it ends for good (container gone, no address,
/// connect budget exhausted). Returns the terminal `SessionFailed` reason.
pub async fn run<P: Publish>(
    container_id: String,
    deps: SessionDeps<P>,
    live: watch::Sender<Option<LiveSession>>,
) -> String {
    let mut register_rounds = 0u32;
    let mut cycle = 0u32;
    loop {
        cycle += 1;
        let (conn, target, addr, attempts) = match establish(&container_id, &deps).await {
            Established::Ok {
                conn,
                target,
                addr,
                attempts,
            } => (conn, target, addr, attempts),
            Established::Failed {
                reason,
                agent,
                project,
                address,
                attempts,
            } => {
                deps.sink.publish(events::SessionFailed {
                    container_id: container_id.clone(),
                    agent,
                    project,
                    address,
                    reason: reason.clone(),
                    attempts,
                    at: events::now(),
                });
                return reason;
            }
        };
        let address = addr.to_string();
        deps.sink.publish(events::SessionConnected {
            container_id: container_id.clone(),
            agent: target.agent.clone(),
            project: target.project.clone(),
            address: address.clone(),
            attempts,
            peer_cn: conn.peer.cn.clone(),
            peer_thumbprint: conn.peer.thumbprint,
            chain_verified: conn.peer.chain_verified,
            at: events::now(),
        });
        tracing::info!(event = "agentdial_session_connected", container_id = %container_id, cycle, attempts, peer_cn = %conn.peer.cn, "session connected");

        let trusted = verdict(&container_id, &target, &conn, &deps, &mut register_rounds).await;

        let init_target = InitTarget {
            container_id: container_id.clone(),
            agent: target.agent.clone(),
            project: target.project.clone(),
        };
        let _ = live.send(Some(LiveSession {
            mux: conn.mux.clone(),
            agent: target.agent.clone(),
            project: target.project.clone(),
            trusted,
        }));
        if trusted || deps.policy.init_untrusted {
            init::run(
                &conn.mux,
                &init_target,
                &deps.sink,
                deps.policy.init.clone(),
            )
            .await;
        } else {
            tracing::warn!(event = "agent_init_withheld", container_id = %container_id, "init withheld from an untrusted agent (the user command stays unreleased)");
        }

        // Hold: the mux drains unsolicited responses until the stream ends.
        let end = conn.mux.closed().await;
        let _ = live.send(None);
        drop(conn);
        // A stream usually ends because the container stopped. Give Docker
        // a moment to say so, and end quietly rather than publishing
        // SessionBroken and churning through reconnects for a container
        // that is gone (later clawker releases do the same).
        tokio::time::sleep(deps.policy.break_grace).await;
        let gone = match deps.resolver.resolve(&container_id).await {
            Ok(t) => !t.running,
            Err(ResolveError::NotFound) => true,
            Err(ResolveError::Transient(_)) => false,
        };
        {
            if gone {
                deps.sink.publish(events::SessionFailed {
                    container_id: container_id.clone(),
                    agent: target.agent.clone(),
                    project: target.project.clone(),
                    address,
                    reason: failed_reason::CONTAINER_NOT_RUNNING.to_owned(),
                    attempts: 0,
                    at: events::now(),
                });
                tracing::info!(event = "agentdial_session_container_gone", container_id = %container_id, "stream ended with its container");
                return failed_reason::CONTAINER_NOT_RUNNING.to_owned();
            }
        }
        deps.sink.publish(events::SessionBroken {
            container_id: container_id.clone(),
            agent: target.agent.clone(),
            project: target.project.clone(),
            address,
            reason: end.reason(),
            at: events::now(),
        });
        tracing::info!(event = "agentdial_session_reconnecting", container_id = %container_id, reason = %end.reason(), "session broken; reconnecting");
    }
}

/// Decides trust for this session and publishes the agent-axis events.
async fn verdict<P: Publish>(
    container_id: &str,
    target: &ResolvedTarget,
    conn: &dial::Connection,
    deps: &SessionDeps<P>,
    register_rounds: &mut u32,
) -> bool {
    let untrusted = |reason: UntrustedReason, detail: String| {
        tracing::warn!(event = "agent_untrusted", container_id, reason = reason.as_str(), detail = %detail, "agent untrusted");
        deps.sink.publish(events::AgentUntrusted {
            container_id: container_id.to_owned(),
            agent: target.agent.clone(),
            project: target.project.clone(),
            reason,
            detail,
            at: events::now(),
        });
        false
    };
    let trusted = || {
        deps.sink.publish(events::AgentTrusted {
            container_id: container_id.to_owned(),
            agent: target.agent.clone(),
            project: target.project.clone(),
            at: events::now(),
        });
        true
    };
    if !conn.peer.chain_verified {
        let detail = format!(
            "chain verify: {}",
            conn.peer.chain_error.as_deref().unwrap_or("unknown")
        );
        return untrusted(UntrustedReason::CertInvalid, detail);
    }
    match classify::classify(
        deps.registry.as_ref(),
        container_id,
        &conn.peer.cn,
        &conn.peer.thumbprint,
    ) {
        Classification::Match(_) => trusted(),
        Classification::ThumbprintMismatch => {
            untrusted(UntrustedReason::CertThumbprintMismatch, String::new())
        }
        Classification::CnMismatch => untrusted(UntrustedReason::CertCnMismatch, String::new()),
        Classification::NotQueried(d) => untrusted(UntrustedReason::CertInvalid, d),
        Classification::Miss => {
            let result = if *register_rounds >= deps.policy.max_register_attempts {
                Err(format!(
                    "register attempts exhausted ({} rounds)",
                    deps.policy.max_register_attempts
                ))
            } else {
                *register_rounds += 1;
                register::drive(
                    &conn.mux,
                    deps.registry.as_ref(),
                    container_id,
                    deps.policy.register_timeout,
                )
                .await
            };
            match result {
                Ok(()) => {
                    tracing::info!(event = "agent_registered", container_id, "agent registered");
                    deps.sink.publish(events::AgentRegistered {
                        container_id: container_id.to_owned(),
                        agent: target.agent.clone(),
                        project: target.project.clone(),
                        ok: true,
                        reason: String::new(),
                        at: events::now(),
                    });
                    trusted()
                }
                Err(reason) => {
                    tracing::warn!(event = "agent_register_failed", container_id, reason = %reason, "register failed");
                    deps.sink.publish(events::AgentRegistered {
                        container_id: container_id.to_owned(),
                        agent: target.agent.clone(),
                        project: target.project.clone(),
                        ok: false,
                        reason: reason.clone(),
                        at: events::now(),
                    });
                    untrusted(UntrustedReason::RegisterFailed, reason)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_is_full_jitter_doubling_to_the_cap() {
        let mut l = Ladder::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut ceilings = vec![];
        for _ in 0..7 {
            let c = l.ceiling();
            let s = l.next_sleep();
            assert!(s < c, "{s:?} < {c:?}");
            ceilings.push(c.as_millis());
        }
        assert_eq!(ceilings, vec![500, 1000, 2000, 4000, 8000, 10000, 10000]);
        assert_eq!(
            Ladder::new(Duration::ZERO, Duration::ZERO).next_sleep(),
            Duration::ZERO
        );
    }
}
