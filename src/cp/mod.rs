//! `clawker cp serve`: the whole control plane in one process.
//!
//! Wiring, in start order (this function is the one place where the parts
//! meet; each part only knows its own narrow inputs):
//!
//! 1. auth material, the runtime (`runtime.rs`: one engine with
//!    `clawker-net` and `clawker-quarantine`, created if missing, the
//!    quarantine bridge guarded on the host; or a swarm manager with the
//!    agent and quarantine overlays);
//! 2. infrastructure that every actor holds a handle to and that never
//!    crashes on bad input (errors are values): the event bus and the
//!    registry actor. They are started before the tree and live for the
//!    process — restarting them would invalidate every handle;
//! 3. the root supervisor `clawker-cp` (one_for_one) with `sessions`
//!    (session actors, one per container), `docker-events` (the feeder),
//!    `docker-dispatch` (events → dial/stop/evict) and `session-redial`
//!    (running agents without a session are dialed again);
//! 4. the agent API (AgentService + token endpoint on the clawker-net
//!    gateway, or the CP task's overlay address) and the admin API
//!    (loopback; in Swarm mode the container's published port), their
//!    connection caps fitted below the file-descriptor limit (`serve`
//!    raised it first);
//! 5. the startup orphan reap and the boot dial of running agents;
//! 6. SIGTERM/SIGINT: stop the tree first (session tasks are aborted, so no
//!    spurious SessionBroken), then the servers, the bus and the registry.

pub mod agent;
pub mod certs;
pub mod config;
pub mod deploy;
pub mod dispatch;
pub mod feeder;
pub mod redial;
pub mod runtime;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clawker_actors::{ChildSpec, Supervisor, SupervisorHandle, SupervisorSpec};
use tokio_util::sync::CancellationToken;

use clawker_actors::Backoff;

use crate::docker::Docker;
use crate::events::{self, Bus};
use crate::pki::AuthPaths;
use crate::registry::{Registry, RegistryStore};
use crate::runtime::{Inventory, ListScope};
use crate::session::Sessions;
use crate::session::actor::sessions_spec;
use crate::session::dial::DialConfig;
use crate::session::lifecycle::{RuntimeResolver, SessionDeps, SessionPolicy};
use crate::session::rotation::{CertRotation, RotationConfig};

pub use config::CpConfig;

/// Handles to a running CP (for the serve loop and tests).
pub struct RunningCp {
    pub admin_api_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness: Arc<crate::policy::health::Readiness>,
    pub bus: Bus,
    pub registry: Registry,
    pub root: SupervisorHandle,
    pub sessions: Sessions,
    pub agent_api_addr: SocketAddr,
    /// Where agents reach the CP (the agent API's address).
    pub gateway: std::net::IpAddr,
    pub clawkerd_port: u16,
    pub shutdown: CancellationToken,
    pub docker: Docker,
    /// The runtime's container facts (engine: container inspect; swarm:
    /// the service and its current task).
    pub inspect: Arc<dyn crate::runtime::Inspect>,
    /// The runtime's agent listing (startup reap, boot dial).
    pub inventory: Arc<dyn Inventory>,
    /// The agent-port guard run on every start (engine mode only).
    pub port_guard: Option<dispatch::PortGuard>,
    /// The containment core (ladders and operator lifts).
    pub containment: Arc<crate::policy::containment::Containment>,
}

/// Starts everything on the current actix system. Must run inside one.
pub async fn start(cfg: &CpConfig) -> anyhow::Result<RunningCp> {
    let paths = AuthPaths::new(&cfg.state_dir);
    let read = |p: std::path::PathBuf| {
        std::fs::read(&p).with_context(|| {
            format!(
                "reading {} (run `clawker ca init --state-dir {}` first)",
                p.display(),
                cfg.state_dir.display()
            )
        })
    };
    let dial = DialConfig::new(
        &read(paths.ca_cert())?,
        &read(paths.cp_client_cert())?,
        &read(paths.cp_client_key())?,
    )
    .context("CP client identity")?;
    // The CA key signs agents' renewal CSRs (leaf rotation). It is read
    // into this process's memory only and never leaves it: no API returns
    // it and no container receives it (DESIGN §13, ARCHITECTURE "pki").
    // Only the CA: in Swarm mode the CP's volume has no CLI keys.
    let ca = {
        let cert = read(paths.ca_cert())?;
        let key = read(paths.ca_key())?;
        crate::pki::Ca::load(
            &String::from_utf8_lossy(&cert),
            &String::from_utf8_lossy(&key),
        )
        .with_context(|| format!("loading the CA from {}", paths.ca_cert().display()))?
    };

    // Listener caps must leave most descriptors to what the CP opens
    // itself (sessions, Docker, redb), so a flood cannot starve them.
    let caps = fit_listener_caps(cfg);

    // Health endpoints first: while the CP waits for its engine, /healthz
    // answers and /readyz says 503 (docker not ready).
    let shutdown = CancellationToken::new();
    let readiness = crate::policy::health::Readiness::new();
    let metrics = crate::policy::metrics::Metrics::new();
    if let Err(e) = metrics.install_global() {
        // A second CP in one process (tests): keep the first recorder.
        tracing::debug!(error = %e, "metrics recorder already installed");
    }
    // Gauges are refreshed at every scrape (no timer: an idle CP wakes for
    // nothing); the bus they read starts after the engine answers, so the
    // refresh is a no-op until then.
    let bus_for_scrape: Arc<std::sync::OnceLock<events::Bus>> = Arc::default();
    let refresh: crate::policy::health::Refresh = {
        let (bus, metrics) = (bus_for_scrape.clone(), metrics.clone());
        Arc::new(move || {
            let (bus, metrics) = (bus.get().cloned(), metrics.clone());
            Box::pin(async move {
                if let Some(bus) = bus {
                    crate::policy::metrics::refresh_gauges(metrics, bus).await;
                }
            })
        })
    };
    let (metrics_addr, _metrics_task) = crate::policy::health::serve_bounded(
        cfg.metrics_addr,
        metrics.handle(),
        readiness.clone(),
        Some(refresh),
        caps.metrics,
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("metrics endpoint {}", cfg.metrics_addr))?;

    let backend = runtime::connect(cfg).await?;
    let docker = backend.docker.clone();

    let bus = events::start_bus();
    let _ = bus_for_scrape.set(bus.clone());
    let registry = Registry::start(
        RegistryStore::open(&cfg.registry_path())
            .with_context(|| format!("opening {}", cfg.registry_path().display()))?,
    )?;
    readiness.set_bus(true);
    readiness.set_registry(true);

    // Agent API on the agent network: containers reach the CP there, and
    // their source address is their own address on it (Register's peer-IP
    // check).
    let agent_listen = SocketAddr::new(backend.agent_ip, cfg.agent_port);
    let mut api_cfg =
        crate::agent_api::server::AgentApiConfig::from_state_dir(&cfg.state_dir, agent_listen)?;
    api_cfg.limits = caps.agent_api;
    api_cfg.request_timeout = cfg.agent_listener.request_timeout;
    api_cfg.body_read_timeout = cfg.agent_listener.body_read_timeout;
    let stop = shutdown.clone();
    let api = crate::agent_api::server::serve_agent_api(
        api_cfg,
        registry.clone(),
        backend.inspect.clone(),
        async move { stop.cancelled().await },
    )
    .await?;

    let mut policy = SessionPolicy {
        init_untrusted: cfg.init_untrusted,
        ..SessionPolicy::default()
    };
    policy.establish.total = cfg.sessions.connect_budget;
    let rotation = CertRotation {
        ca: Arc::new(ca),
        rows: Arc::new(registry.clone()),
        config: RotationConfig {
            agent_cert_ttl: cfg.agent_cert_ttl,
            stale_after: cfg.agent_cert_stale_after,
            retire_bootstrap_leaf: cfg.retire_bootstrap_leaf,
            ..RotationConfig::default()
        },
    };
    policy.init.hooks = cfg.hooks.clone();
    policy.init.keep_on_failure = cfg.keep_on_init_failure;
    let deps = SessionDeps {
        resolver: Arc::new(RuntimeResolver {
            containers: backend.inspect.clone(),
            clawkerd_port: cfg.clawkerd_port,
        }),
        registry: Arc::new(registry.clone()),
        terminate: Arc::new(crate::runtime::KillViaContainment(
            backend.containment.clone(),
        )),
        dial,
        sink: bus.clone(),
        policy,
        certs: Some(Arc::new(rotation)),
    };

    // `sessions` is a child of the root, which may restart it: the
    // front door finds it by name through the root handle (set right after
    // the root starts).
    let root_slot: Arc<std::sync::OnceLock<SupervisorHandle>> = Arc::default();
    let sessions = Sessions::via_root(root_slot.clone(), deps.clone());
    // The feeder sets readiness's Docker flag itself as its stream
    // connects and drops.
    let feeder_up = readiness.docker_flag();
    let containment = Arc::new(crate::policy::containment::Containment::new(
        cfg.containment.clone(),
        backend.containment.clone(),
        Arc::new(sessions.clone()),
        cfg.clawkerd_port,
    ));
    let port_guard = backend.port_guard.clone().map(|guard| dispatch::PortGuard {
        guard,
        port: cfg.clawkerd_port,
    });
    let policy = policy_spec(cfg, &bus, &containment, &metrics);
    let spec = SupervisorSpec::new("clawker-cp")
        .strategy(clawker_actors::Strategy::OneForOne)
        .intensity(10, Duration::from_secs(60))
        .child(ChildSpec::supervisor(sessions_spec(bus.clone(), deps.registry.clone())))
        .child(feeder::FeederActor::spec_with(backend.feed.clone(), bus.clone(), feeder_up.clone()))
        .child(dispatch::DockerDispatch::spec(bus.clone(), sessions.clone(), registry.clone(), port_guard.clone()))
        .child(redial::Redial::spec(backend.inventory.clone(), sessions.clone(), cfg.sessions.redial_interval))
        .child(ChildSpec::supervisor(policy))
        .on_exit(crate::policy::metrics::record_child_exit)
        .on_escalate(|e| tracing::error!(supervisor = %e.supervisor, reason = %e.reason, "root supervisor gave up"));
    let root = Supervisor::start(spec);
    let _ = root_slot.set(root.clone());

    let mut admin_cfg = crate::admin_api::AdminConfig::load(&cfg.state_dir, cfg.admin_addr)?;
    admin_cfg.limits = caps.admin_api;
    admin_cfg.allow_non_loopback = backend.admin_beyond_loopback;
    let admin = crate::admin_api::service::AdminApi::new(
        Arc::new(registry.reader().clone()),
        bus.clone(),
        Arc::new(root.clone()),
    )
    .with_sessions(Arc::new(sessions.clone()))
    .with_containment(containment.clone());
    let (admin_api_addr, _admin_task) =
        crate::admin_api::server::serve_admin_api(admin_cfg, admin, shutdown.clone()).await?;
    // The CP's own certificates: warn 30 days before they expire.
    tokio::spawn(certs::watch(paths.clone(), bus.clone(), shutdown.clone()));

    Ok(RunningCp {
        admin_api_addr,
        metrics_addr,
        readiness,
        bus,
        registry,
        root,
        sessions,
        agent_api_addr: api.local_addr,
        gateway: backend.agent_ip,
        clawkerd_port: cfg.clawkerd_port,
        shutdown,
        docker,
        inspect: backend.inspect,
        inventory: backend.inventory,
        port_guard,
        containment,
    })
}

/// The limits of the CP's three listeners after [`fit_listener_caps`].
struct ListenerCaps {
    agent_api: crate::listen::ListenerLimits,
    admin_api: crate::listen::ListenerLimits,
    metrics: crate::listen::ListenerLimits,
}

/// The configured listener limits (the metrics endpoint's are fixed) with
/// their global caps fitted together into
/// [`crate::listen::fd::LISTENER_SHARE`] of the descriptor limit (and each
/// per-source cap no larger than its global one).
fn fit_listener_caps(cfg: &CpConfig) -> ListenerCaps {
    use crate::listen::fd;
    let mut caps = ListenerCaps {
        agent_api: cfg.agent_listener.limits,
        admin_api: cfg.admin_listener,
        metrics: crate::listen::ListenerLimits::METRICS,
    };
    let soft = match fd::nofile() {
        Ok(l) => l.soft,
        Err(error) => {
            tracing::warn!(%error, "cannot read the descriptor limit; listener caps unchanged");
            return caps;
        }
    };
    let wanted = [
        caps.agent_api.max_connections,
        caps.admin_api.max_connections,
        caps.metrics.max_connections,
    ];
    let fitted = fd::fit_caps(&wanted, soft);
    if fitted != wanted {
        tracing::warn!(
            event = "listener_caps_reduced",
            nofile = soft,
            agent_api = fitted[0],
            admin_api = fitted[1],
            metrics = fitted[2],
            "listener connection caps reduced to fit the descriptor limit (raise `ulimit -n`)"
        );
    }
    for (limits, max) in [
        (&mut caps.agent_api, fitted[0]),
        (&mut caps.admin_api, fitted[1]),
        (&mut caps.metrics, fitted[2]),
    ] {
        limits.max_connections = max;
        limits.max_connections_per_source = limits.max_connections_per_source.min(max);
    }
    caps
}

/// The `policy` supervisor: containment, audit, metrics subscribers.
fn policy_spec(
    cfg: &CpConfig,
    bus: &Bus,
    core: &Arc<crate::policy::containment::Containment>,
    metrics: &crate::policy::metrics::Metrics,
) -> SupervisorSpec {
    use crate::policy::{audit, containment, metrics as m};
    let mut spec = SupervisorSpec::new("policy")
        .strategy(clawker_actors::Strategy::OneForOne)
        .intensity(20, Duration::from_secs(60))
        .on_exit(m::record_child_exit)
        .child(containment::ContainmentActor::spec(
            bus.clone(),
            core.clone(),
        ))
        .child(m::MetricsActor::spec(
            bus.clone(),
            metrics.clone(),
            &m::MetricsConfig::default(),
        ));
    if cfg.audit.enabled {
        spec = spec.child(audit::AuditActor::spec(
            bus.clone(),
            cfg.audit.resolve_path(&cfg.state_dir),
            cfg.audit.clone(),
        ));
    }
    spec
}

/// Startup reap (reference §10.2): evict rows whose container no longer
/// exists (stopped containers keep theirs). Soft-fails into ReapDegraded.
pub async fn reap_orphans(runtime: &dyn Inventory, registry: &Registry, bus: &Bus) {
    let mut backoff = STARTUP_RETRY.retry();
    let mut listed = None;
    for attempt in 1..=3 {
        match runtime.list_agents(ListScope::All).await {
            Ok(l) => {
                listed = Some(l);
                break;
            }
            Err(e) if attempt < 3 => {
                tracing::warn!(attempt, error = %e, "reap: listing containers failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                let reason = format!("listing containers: {e}");
                tracing::warn!(%reason, "reap degraded");
                bus.publish(events::ReapDegraded {
                    reason,
                    at: events::now(),
                });
                return;
            }
        }
    }
    let live: std::collections::HashSet<String> = listed
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let rows = registry.snapshot();
    let before = rows.len();
    let mut errors = Vec::new();
    let mut evicted = 0;
    for row in rows.into_iter().filter(|r| !live.contains(&r.container_id)) {
        match registry.evict_by_container_id(&row.container_id).await {
            Ok(_) => evicted += 1,
            Err(e) => {
                tracing::error!(container_id = %row.container_id, agent = %row.agent_name, error = %e, "reap: evict failed");
                errors.push(format!("evict {}: {e}", row.container_id));
            }
        }
    }
    if evicted > 0 {
        tracing::info!(
            evicted,
            registry_size_before = before,
            live_containers = live.len(),
            "reaped orphan rows"
        );
    }
    if !errors.is_empty() {
        bus.publish(events::ReapDegraded {
            reason: errors.join("; "),
            at: events::now(),
        });
    }
}

/// Boot dial (reference §1): the feeder's first reconcile may run before
/// the dial subscriber exists, so dial every running agent explicitly (and
/// guard its agent port, as on every start).
pub async fn boot_dial(cp: &RunningCp) {
    let mut backoff = STARTUP_RETRY.retry();
    for attempt in 1..=3 {
        match cp.inventory.list_agents(ListScope::Running).await {
            Ok(list) => {
                for c in list {
                    cp.sessions.dial(&c.id).await;
                    if let Some(guard) = &cp.port_guard {
                        guard.spawn(&c.id);
                    }
                }
                return;
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, event = "agentdial_initial_list_failed", "boot dial: listing failed");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Retries of the startup listings (reap, boot dial): 100 ms, 200 ms, …
const STARTUP_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Orderly stop: the tree first (so sessions publish nothing more), then
/// the servers, the bus and the registry.
pub async fn stop(cp: RunningCp) {
    // Let subscribers (the audit log) see every event published so far.
    let _ = cp.bus.flush().await;
    cp.root.shutdown();
    for _ in 0..200 {
        if !cp.root.is_alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cp.shutdown.cancel();
    let _ = cp.bus.flush().await;
    cp.bus.close();
    cp.registry.shutdown().await;
}

/// `clawker cp serve`: builds the runtime, runs until SIGTERM/SIGINT.
pub fn serve(cfg: CpConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("clawker-cp")
        .build()
        .context("building the tokio runtime")?;
    // Actors live on the system arbiter; I/O tasks (TLS sessions, servers,
    // the feeder) spawned with tokio::spawn run on the worker pool.
    let system = actix::System::with_tokio_rt(|| runtime);
    system.block_on(async move {
        clawker_actors::install_panic_hook();
        // Before anything opens a descriptor: a low soft limit is the
        // first thing a connection flood exhausts.
        if let Err(error) = crate::listen::fd::raise_nofile() {
            tracing::warn!(%error, "could not raise the descriptor limit");
        }
        // Startup may wait for the Docker engine; a signal meanwhile ends it.
        let cp = tokio::select! {
            cp = start(&cfg) => cp?,
            _ = wait_for_signal() => {
                tracing::info!("shutting down before startup completed");
                return Ok(());
            }
        };
        tracing::info!(
            agent_api = %cp.agent_api_addr,
            admin_api = %cfg.admin_addr,
            "control plane up"
        );
        reap_orphans(cp.inventory.as_ref(), &cp.registry, &cp.bus).await;
        boot_dial(&cp).await;
        wait_for_signal().await;
        tracing::info!("shutting down");
        stop(cp).await;
        Ok::<_, anyhow::Error>(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; running until killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
