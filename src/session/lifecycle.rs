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

use clawker_actors::Backoff;

use crate::events::{self, AgentRef, Publish, UntrustedReason, failed_reason};
use crate::runtime::{Inspect, RuntimeError};

use super::classify::{self, Classification, RegistryLookup};
use super::dial::{self, DialConfig};
use super::init::{self, InitConfig};
use super::mux::SessionMux;
use super::register;

/// What the session needs to know about its container, re-read on every
/// attempt of the slow phase.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedTarget {
    /// The agent and project the container's labels claim.
    pub agent: String,
    pub project: String,
    pub running: bool,
    /// clawkerd's address (agent-network IP : clawkerd port in production).
    pub addr: Option<SocketAddr>,
}

impl ResolvedTarget {
    fn who(&self, container_id: &str) -> AgentRef {
        AgentRef::new(container_id, self.agent.as_str(), self.project.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("container not found")]
    NotFound,
    #[error("inspect: {0}")]
    Transient(String),
}

/// How a session finds its container. In production [`RuntimeResolver`]
/// over the runtime seam; tests point sessions at loopback clawkerds.
pub trait ContainerResolver: Send + Sync + 'static {
    fn resolve(
        &self,
        container_id: &str,
    ) -> futures::future::BoxFuture<'_, Result<ResolvedTarget, ResolveError>>;
}

/// The production resolver: inspect through the runtime, dial clawkerd at
/// the container's agent-network address on `clawkerd_port`.
pub struct RuntimeResolver {
    pub containers: Arc<dyn Inspect>,
    pub clawkerd_port: u16,
}

impl ContainerResolver for RuntimeResolver {
    fn resolve(
        &self,
        container_id: &str,
    ) -> futures::future::BoxFuture<'_, Result<ResolvedTarget, ResolveError>> {
        let id = container_id.to_owned();
        Box::pin(async move {
            match self.containers.inspect(&id).await {
                Ok(f) => Ok(ResolvedTarget {
                    agent: f.agent_label().to_owned(),
                    project: f.project_label().to_owned(),
                    running: f.running,
                    addr: f.ip.map(|ip| SocketAddr::new(ip, self.clawkerd_port)),
                }),
                Err(RuntimeError::NotFound(_)) => Err(ResolveError::NotFound),
                Err(e) => Err(ResolveError::Transient(e.to_string())),
            }
        })
    }
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
    pub agent: AgentRef,
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
        who: AgentRef,
        address: String,
        attempts: u32,
    },
}

/// How often a session whose container lost its clawker-net endpoint
/// re-checks on its own (a network `connect` event wakes it at once).
pub const ENDPOINT_RECHECK: Duration = Duration::from_secs(5);

/// One connect cycle: inspect, dial with fast retries then the jittered
/// ladder, until connected or the cycle's budget is spent.
///
/// `endpoint_back`: set when re-establishing a session that was connected.
/// A container that is running but has no clawker-net endpoint (someone ran
/// `docker network disconnect`) is then waited for — woken by the network
/// `connect` event, re-checked every [`ENDPOINT_RECHECK`], ended by its
/// `die` — instead of failing the session for good; a session that never
/// had an endpoint still fails `clawker_net_endpoint_missing` at once.
async fn establish<P: Publish>(
    container_id: &str,
    deps: &SessionDeps<P>,
    endpoint_back: Option<&tokio::sync::Notify>,
) -> Established {
    let cfg = deps.policy.establish;
    let mut started = Instant::now();
    let mut ladder = Backoff::new(cfg.initial_backoff, cfg.max_backoff)
        .full_jitter()
        .retry();
    let mut attempts = 0u32;
    let mut connecting_published = false;
    let mut cached: Option<(ResolvedTarget, SocketAddr)> = None;
    let fail = |reason: &str, t: Option<&ResolvedTarget>, addr: Option<SocketAddr>, attempts| {
        Established::Failed {
            reason: reason.to_owned(),
            who: t
                .map(|t| t.who(container_id))
                .unwrap_or_else(|| AgentRef::container(container_id)),
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
                    tokio::time::sleep(ladder.next_delay()).await;
                    continue;
                }
                Ok(t) => match t.addr {
                    None if endpoint_back.is_some() => {
                        tracing::info!(
                            event = "agentdial_endpoint_wait",
                            container_id,
                            "container has no clawker-net endpoint; waiting for it to be connected again"
                        );
                        if let Some(back) = endpoint_back {
                            let _ = tokio::time::timeout(ENDPOINT_RECHECK, back.notified()).await;
                        }
                        // The wait is not dialing time: the budget (and
                        // the fast phase) start again when it ends.
                        started = Instant::now();
                        continue;
                    }
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
                agent: target.who(container_id),
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
                    ladder.next_delay()
                };
                tracing::debug!(event = "agentdial_connect_retry", container_id, dial_target = %addr, retry_in_ms = sleep.as_millis() as u64, error = %e, "dial failed; retrying");
                tokio::time::sleep(sleep).await;
            }
        }
    }
}

/// `SessionBroken.reason` when the session is re-established because the
/// container's address moved (quarantine or release).
pub const REASON_ADDRESS_MOVED: &str = "container address moved";

/// Runs the session until it ends for good (container gone, no address,
/// connect budget exhausted). Returns the terminal `SessionFailed` reason.
///
/// `moved` is rung when someone moved the container between networks
/// (containment's quarantine and release): the held session then checks
/// the container's address and, if it changed, drops the connection (whose
/// path is gone, though nothing would notice until the keepalive times
/// out) and dials the new address at once.
pub async fn run<P: Publish>(
    container_id: String,
    deps: SessionDeps<P>,
    live: watch::Sender<Option<LiveSession>>,
    moved: Arc<tokio::sync::Notify>,
) -> String {
    let mut register_rounds = 0u32;
    let mut cycle = 0u32;
    loop {
        cycle += 1;
        // A session that was connected waits for a lost endpoint to come
        // back (network disconnect/connect) rather than failing for good.
        let endpoint_back = (cycle > 1).then_some(moved.as_ref());
        let (conn, target, addr, attempts) =
            match establish(&container_id, &deps, endpoint_back).await {
                Established::Ok {
                    conn,
                    target,
                    addr,
                    attempts,
                } => (conn, target, addr, attempts),
                Established::Failed {
                    reason,
                    who,
                    address,
                    attempts,
                } => {
                    deps.sink.publish(events::SessionFailed {
                        agent: who,
                        address,
                        reason: reason.clone(),
                        attempts,
                        at: events::now(),
                    });
                    return reason;
                }
            };
        let who = target.who(&container_id);
        let address = addr.to_string();
        deps.sink.publish(events::SessionConnected {
            agent: who.clone(),
            address: address.clone(),
            attempts,
            peer_cn: conn.peer.cn.clone(),
            peer_thumbprint: conn.peer.thumbprint,
            chain_verified: conn.peer.chain_verified,
            at: events::now(),
        });
        tracing::info!(event = "agentdial_session_connected", container_id = %container_id, cycle, attempts, peer_cn = %conn.peer.cn, "session connected");

        let trusted = verdict(&who, &conn, &deps, &mut register_rounds).await;

        let _ = live.send(Some(LiveSession {
            mux: conn.mux.clone(),
            agent: who.clone(),
            trusted,
        }));
        if trusted || deps.policy.init_untrusted {
            init::run(&conn.mux, &who, &deps.sink, deps.policy.init.clone()).await;
        } else {
            tracing::warn!(event = "agent_init_withheld", container_id = %container_id, "init withheld from an untrusted agent (the user command stays unreleased)");
        }

        // Hold: the mux drains unsolicited responses until the stream ends
        // or the container's address moves.
        let end = loop {
            tokio::select! {
                end = conn.mux.closed() => break Some(end),
                _ = moved.notified() => {
                    match deps.resolver.resolve(&container_id).await {
                        Ok(t) if t.running && t.addr == Some(addr) => continue,
                        // Moved, or cannot tell: re-establish (which re-checks).
                        _ => break None,
                    }
                }
            }
        };
        let _ = live.send(None);
        drop(conn);
        let Some(end) = end else {
            deps.sink.publish(events::SessionBroken {
                agent: who,
                address,
                reason: REASON_ADDRESS_MOVED.to_owned(),
                at: events::now(),
            });
            tracing::info!(event = "agentdial_session_moved", container_id = %container_id, "container address moved; re-establishing");
            continue;
        };
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
        if gone {
            deps.sink.publish(events::SessionFailed {
                agent: who,
                address,
                reason: failed_reason::CONTAINER_NOT_RUNNING.to_owned(),
                attempts: 0,
                at: events::now(),
            });
            tracing::info!(event = "agentdial_session_container_gone", container_id = %container_id, "stream ended with its container");
            return failed_reason::CONTAINER_NOT_RUNNING.to_owned();
        }
        deps.sink.publish(events::SessionBroken {
            agent: who,
            address,
            reason: end.reason(),
            at: events::now(),
        });
        tracing::info!(event = "agentdial_session_reconnecting", container_id = %container_id, reason = %end.reason(), "session broken; reconnecting");
    }
}

/// Decides trust for this session and publishes the agent-axis events.
async fn verdict<P: Publish>(
    who: &AgentRef,
    conn: &dial::Connection,
    deps: &SessionDeps<P>,
    register_rounds: &mut u32,
) -> bool {
    let container_id = who.container_id.as_str();
    let untrusted = |reason: UntrustedReason, detail: String| {
        tracing::warn!(event = "agent_untrusted", container_id, reason = reason.as_str(), detail = %detail, "agent untrusted");
        deps.sink.publish(events::AgentUntrusted {
            agent: who.clone(),
            reason,
            detail,
            at: events::now(),
        });
        false
    };
    let trusted = || {
        deps.sink.publish(events::AgentTrusted {
            agent: who.clone(),
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
                Err(register::RegisterFailure::Exhausted(
                    deps.policy.max_register_attempts,
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
                        agent: who.clone(),
                        ok: true,
                        reason: String::new(),
                        at: events::now(),
                    });
                    trusted()
                }
                Err(failure) => {
                    let reason = failure.to_string();
                    tracing::warn!(event = "agent_register_failed", container_id, reason = %reason, "register failed");
                    deps.sink.publish(events::AgentRegistered {
                        agent: who.clone(),
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
