//! The life of one agent's session (reference `cp-session.md` §5–9,
//! `head-lifecycle.md` §1): resolve → dial (with retries) → Hello →
//! classify → maybe Register → the plans the `HelloAck` calls for (init
//! once per container, boot on every start, nothing on a reconnect) →
//! hold → on break, reconnect. A failed step ends the container
//! ([`super::terminate`]) unless configured otherwise.
//!
//! This is plain async code; the session actor runs it as a task and owns
//! its lifetime (aborting it is how a session is stopped, which is why a
//! stopped or shut-down session publishes nothing further).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use clawker_actors::Backoff;

use crate::events::{
    self, AgentRef, Publish, RotationReason, UntrustedReason, failed_reason, plan_skipped,
};
use crate::runtime::{Inspect, RuntimeError, Terminate};

use super::classify::{self, Classification, RegistryLookup};
use super::dial::{self, DialConfig};
use super::init::{self, InitConfig, InitOutcome};
use super::mux::SessionMux;
use super::plan;
use super::register;
use super::rotation::{self, CertRotation, Expiry, Rotator};
use super::terminate::{self, Termination};

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
    /// Register rounds per session, i.e. per established stream (the
    /// reference retried forever). A later session (container restart,
    /// the next reconnect) starts again from zero, so a transient fault
    /// never bricks an agent.
    pub max_register_attempts: u32,
    /// Pause before the second round of a session; doubles per round.
    /// Only retryable failures get another round.
    pub register_retry_backoff: Duration,
    /// How long clawkerd gets to end its container by itself after a
    /// failed step, before the CP kills it.
    pub terminate_grace: Duration,
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
            register_retry_backoff: Duration::from_secs(1),
            terminate_grace: terminate::DEFAULT_GRACE,
            init_untrusted: false,
            break_grace: Duration::from_millis(150),
        }
    }
}

/// Everything a session task needs.
pub struct SessionDeps<P: Publish> {
    pub resolver: Arc<dyn ContainerResolver>,
    pub registry: Arc<dyn RegistryLookup>,
    /// Kills a container whose start step failed and that did not exit.
    pub terminate: Arc<dyn Terminate>,
    pub dial: DialConfig,
    pub sink: P,
    pub policy: SessionPolicy,
    /// Leaf rotation (the CA and the registry's leaf writes); `None`
    /// disables it: CSRs are refused and expired leaves stay
    /// `cert_invalid`.
    pub certs: Option<Arc<CertRotation>>,
}

impl<P: Publish> Clone for SessionDeps<P> {
    fn clone(&self) -> Self {
        Self {
            resolver: self.resolver.clone(),
            registry: self.registry.clone(),
            terminate: self.terminate.clone(),
            dial: self.dial.clone(),
            sink: self.sink.clone(),
            policy: self.policy.clone(),
            certs: self.certs.clone(),
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
    let mut cycle = 0u32;
    // The phases before the hold are boxed: a task's future is as large as
    // its largest state, and this one is held for the agent's whole life
    // in the small hold state (5.5 KB per idle session unboxed).
    loop {
        cycle += 1;
        // A session that was connected waits for a lost endpoint to come
        // back (network disconnect/connect) rather than failing for good.
        let endpoint_back = (cycle > 1).then_some(moved.as_ref());
        let (conn, target, addr, attempts) =
            match Box::pin(establish(&container_id, &deps, endpoint_back)).await {
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
            leaf_not_after: conn
                .peer
                .not_after
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok()),
            at: events::now(),
        });
        tracing::info!(event = "agentdial_session_connected", container_id = %container_id, cycle, attempts, peer_cn = %conn.peer.cn, "session connected");

        let Verdict { trusted, rotate } = Box::pin(verdict(&who, &target, &conn, &deps)).await;

        let _ = live.send(Some(LiveSession {
            mux: conn.mux.clone(),
            agent: who.clone(),
            trusted,
        }));
        let init = Box::pin(start_sequence(&who, &conn, trusted, &deps));

        // Hold, from the verdict on (concurrently with init, so an expired
        // leaf is rotated at once): serve leaf rotations until the stream
        // ends, or until the container's address moves (containment's
        // quarantine and release), which ends this connection at once.
        let rotator = Rotator::new(
            deps.certs.clone(),
            deps.registry.clone(),
            deps.sink.clone(),
            who.clone(),
            trusted,
            &conn.peer,
        );
        let held = async {
            let ((), end) = tokio::join!(init, rotation::hold(rotator, &conn.mux, rotate));
            end
        };
        let address_moved = async {
            loop {
                moved.notified().await;
                match deps.resolver.resolve(&container_id).await {
                    Ok(t) if t.running && t.addr == Some(addr) => continue,
                    // Moved, or cannot tell: re-establish (which re-checks).
                    _ => break,
                }
            }
        };
        let end = tokio::select! {
            end = held => Some(end),
            () = address_moved => None,
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

/// The outcome of [`verdict`]: trust, and whether to rotate at once.
struct Verdict {
    trusted: bool,
    rotate: Option<RotationReason>,
}

/// Decides from the `HelloAck` (and trust) what runs on this session, runs
/// it, and ends the container if a step failed.
async fn start_sequence<P: Publish>(
    who: &AgentRef,
    conn: &dial::Connection,
    trusted: bool,
    deps: &SessionDeps<P>,
) {
    let container_id = who.container_id.as_str();
    let ack = &conn.hello;
    let decision = plan::decide(ack);
    let allowed = trusted || deps.policy.init_untrusted;
    let steps = if allowed {
        plan::compose(decision, &deps.policy.init.hooks)
    } else {
        Vec::new()
    };
    let skipped = if decision.init_bypassed {
        plan_skipped::INIT_BYPASSED
    } else if !decision.boot {
        plan_skipped::CMD_RUNNING
    } else if !allowed {
        plan_skipped::UNTRUSTED
    } else {
        ""
    };
    let plans = plan::plans_of(&steps);
    let plan_names: Vec<&str> = plans.iter().map(|p| p.as_str()).collect();
    tracing::info!(
        event = "agent_plan_decided",
        container_id,
        initialized = ack.initialized,
        cmd_running = ack.cmd_running,
        plans = ?plan_names,
        skipped,
        "start plans decided"
    );
    match skipped {
        plan_skipped::INIT_BYPASSED => tracing::warn!(
            event = "agent_init_bypassed",
            container_id,
            "the user command runs but the init marker is missing; nothing runs"
        ),
        plan_skipped::UNTRUSTED => tracing::warn!(
            event = "agent_init_withheld",
            container_id,
            "init withheld from an untrusted agent (the user command stays unreleased)"
        ),
        _ => {}
    }
    deps.sink.publish(events::PlanDecided {
        agent: who.clone(),
        initialized: ack.initialized,
        cmd_running: ack.cmd_running,
        plans,
        skipped: skipped.to_owned(),
        at: events::now(),
    });
    if steps.is_empty() {
        return;
    }
    let outcome = init::run(&conn.mux, who, &deps.sink, deps.policy.init.clone(), steps).await;
    let InitOutcome::Failed {
        plan,
        step,
        failure,
    } = outcome
    else {
        return;
    };
    // A broken transport is the session's problem (it reconnects), not the
    // step's; `keep_on_init_failure` keeps the container for inspection.
    if deps.policy.init.keep_on_failure
        || failure.reason == events::InitFailureReason::TransportError
    {
        return;
    }
    // Its own task: the container's `die` aborts this session's task.
    tokio::spawn(terminate::end_container(
        Termination {
            agent: who.clone(),
            plan,
            step,
            failure,
        },
        deps.resolver.clone(),
        deps.terminate.clone(),
        deps.sink.clone(),
        deps.policy.terminate_grace,
    ));
}

/// Decides trust for this session and publishes the agent-axis events.
async fn verdict<P: Publish>(
    who: &AgentRef,
    target: &ResolvedTarget,
    conn: &dial::Connection,
    deps: &SessionDeps<P>,
) -> Verdict {
    let container_id = who.container_id.as_str();
    let untrusted = |reason: UntrustedReason, detail: String| {
        tracing::warn!(event = "agent_untrusted", container_id, reason = reason.as_str(), detail = %detail, "agent untrusted");
        deps.sink.publish(events::AgentUntrusted {
            agent: who.clone(),
            reason,
            detail,
            at: events::now(),
        });
        Verdict {
            trusted: false,
            rotate: None,
        }
    };
    let trusted = |rotate: Option<RotationReason>| {
        deps.sink.publish(events::AgentTrusted {
            agent: who.clone(),
            rotations: deps.registry.leaf_state(container_id).rotations,
            at: events::now(),
        });
        Verdict {
            trusted: true,
            rotate,
        }
    };
    let chain_detail = || {
        format!(
            "chain verify: {}",
            conn.peer.chain_error.as_deref().unwrap_or("unknown")
        )
    };
    // An expired leaf of our CA is judged against its row (DESIGN §13);
    // anything else that fails the chain is cert_invalid, as always.
    let certs = deps.certs.as_ref();
    let expired = !conn.peer.chain_verified && conn.peer.expired_only && certs.is_some();
    let retire_bootstrap = certs.is_some_and(|c| c.config.retire_bootstrap_leaf);
    if !conn.peer.chain_verified && !expired {
        return untrusted(UntrustedReason::CertInvalid, chain_detail());
    }
    let also_expired = |d: &str| {
        if expired {
            format!(
                "{d}{}{}",
                if d.is_empty() { "" } else { "; " },
                chain_detail()
            )
        } else {
            d.to_owned()
        }
    };
    let entry = match classify::classify(
        deps.registry.as_ref(),
        container_id,
        &conn.peer.cn,
        &conn.peer.thumbprint,
    ) {
        Classification::Match(entry) => entry,
        Classification::PendingMatch(entry, pending) => {
            promote_pending(who, deps, &pending).await.unwrap_or(entry)
        }
        Classification::ThumbprintMismatch => {
            return untrusted(UntrustedReason::CertThumbprintMismatch, also_expired(""));
        }
        Classification::CnMismatch => {
            return untrusted(UntrustedReason::CertCnMismatch, also_expired(""));
        }
        Classification::NotQueried(d) => return untrusted(UntrustedReason::CertInvalid, d),
        Classification::Miss if expired => {
            return untrusted(
                UntrustedReason::CertInvalid,
                also_expired("no registry row, and an expired leaf cannot Register"),
            );
        }
        Classification::Miss => {
            return match register_rounds(container_id, conn, deps).await {
                Ok(()) => {
                    tracing::info!(event = "agent_registered", container_id, "agent registered");
                    deps.sink.publish(events::AgentRegistered {
                        agent: who.clone(),
                        ok: true,
                        reason: String::new(),
                        at: events::now(),
                    });
                    trusted(retire_bootstrap.then_some(RotationReason::Registered))
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
            };
        }
    };
    if !expired {
        // A row that never rotated still trusts the bootstrap leaf: a CP that
        // died between Register and the retiring rotation (or had the
        // setting off back then) retires it on this session instead.
        let retire = retire_bootstrap && deps.registry.leaf_state(container_id).rotations == 0;
        return trusted(retire.then_some(RotationReason::Registered));
    }
    // An expired leaf of ours, matching its row: within the staleness bound,
    // and when the runtime's facts agree with the row, trust it and rotate
    // at once. (The address agrees by construction: we dialed the one the
    // runtime reports for this container.)
    let Some(certs) = certs else {
        return untrusted(UntrustedReason::CertInvalid, chain_detail());
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let not_after = conn.peer.not_after.unwrap_or(i64::MIN);
    match rotation::assess_expiry(now, not_after, certs.config.stale_after) {
        Expiry::Stale { expired_for } => untrusted(
            UntrustedReason::CertExpired,
            format!(
                "leaf expired {}s ago, past the {}s staleness bound",
                expired_for.as_secs(),
                certs.config.stale_after.as_secs()
            ),
        ),
        Expiry::Valid | Expiry::Renewable { .. } => {
            let leaf_container = classify::leaf_container_id(&conn.peer.leaf_der);
            if leaf_container.as_deref() != Some(container_id) {
                return untrusted(
                    UntrustedReason::CertInvalid,
                    also_expired("expired leaf: its SAN names another container"),
                );
            }
            if target.agent != entry.agent_name || target.project != entry.project {
                return untrusted(
                    UntrustedReason::CertInvalid,
                    also_expired(
                        "expired leaf: the container's labels disagree with its registry row",
                    ),
                );
            }
            tracing::info!(
                event = "agent_expired_leaf_trusted",
                container_id,
                not_after,
                "expired leaf matches its row; trusting it and rotating at once"
            );
            trusted(Some(RotationReason::Expired))
        }
    }
}

/// Promotes a staged leaf the agent turned out to be using (its rotation's
/// `Done` never reached us). Returns the row as promoted.
async fn promote_pending<P: Publish>(
    who: &AgentRef,
    deps: &SessionDeps<P>,
    pending: &crate::registry::PendingLeaf,
) -> Option<crate::registry::Entry> {
    let certs = deps.certs.as_ref()?;
    let reason = RotationReason::parse(&pending.reason).unwrap_or(RotationReason::HalfLife);
    let now = time::OffsetDateTime::now_utc();
    match certs
        .rows
        .promote(&who.container_id, pending.thumbprint, now.unix_timestamp())
        .await
    {
        Ok(p) => {
            tracing::info!(event = "agent_cert_promoted_on_reconnect", container_id = %who.container_id, "agent presented its staged leaf; promoted");
            deps.sink.publish(events::CertRotated {
                agent: who.clone(),
                old: p.old,
                new: pending.thumbprint,
                not_after: time::OffsetDateTime::from_unix_timestamp(pending.not_after_unix)
                    .unwrap_or(now),
                reason,
                rotations: p.state.rotations,
                duration: Duration::ZERO,
                at: events::now(),
            });
            Some(p.entry)
        }
        Err(e) => {
            // The leaf is ours and names this row: trust stays; the next
            // session promotes it.
            tracing::warn!(event = "agent_cert_promote_failed", container_id = %who.container_id, error = %e, "promoting the staged leaf failed");
            deps.sink.publish(events::CertRotationFailed {
                agent: who.clone(),
                reason,
                detail: e.to_string(),
                at: events::now(),
            });
            None
        }
    }
}

/// Up to `max_register_attempts` Register rounds on this session, with a
/// doubling pause, as long as the failure is retryable.
async fn register_rounds<P: Publish>(
    container_id: &str,
    conn: &dial::Connection,
    deps: &SessionDeps<P>,
) -> Result<(), register::RegisterFailure> {
    let max = deps.policy.max_register_attempts;
    if max == 0 {
        return Err(register::RegisterFailure::Exhausted(0));
    }
    let mut pause = deps.policy.register_retry_backoff;
    let mut round = 1;
    loop {
        let result = register::drive(
            &conn.mux,
            deps.registry.as_ref(),
            container_id,
            deps.policy.register_timeout,
        )
        .await;
        let failure = match result {
            Ok(()) => return Ok(()),
            Err(f) => f,
        };
        if round >= max || !failure.retryable() {
            return Err(failure);
        }
        tracing::info!(
            event = "agent_register_retry",
            container_id,
            round,
            retry_in_ms = pause.as_millis() as u64,
            reason = %failure,
            "register failed transiently; retrying on this session"
        );
        tokio::time::sleep(pause).await;
        pause = pause.saturating_mul(2);
        round += 1;
    }
}
