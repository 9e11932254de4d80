//! Policy subscriber actors on a real actix System and a real bus: the
//! audit log (nothing lost on a clean shutdown), the metrics endpoint
//! (scraped and parsed as Prometheus text), the webhook forwarder against a
//! loopback HTTP server, and the containment actor's triggers (with the
//! in-memory Docker double; the real engine is in `policy_docker.rs`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawker::events::{
    self, AgentRef, AgentRegistered, AgentTrusted, AgentUntrusted, ContainmentAction,
    ContainmentApplied, ContainmentOutcome, InitStepCompleted, SessionConnected, SessionFailed,
    UntrustedReason,
};
use clawker::identity::Thumbprint;
use clawker::policy::audit::{AuditActor, AuditConfig, read_last};
use clawker::policy::containment::{
    Containment, ContainmentActor, ContainmentConfig, Rule, TriggerKind,
};
use clawker::policy::health::{Readiness, serve_metrics};
use clawker::policy::metrics::{self as m, Metrics, MetricsActor, RefreshMetrics};
use clawker::policy::webhook::{WebhookConfig, WebhookForwarder};
use clawker::runtime::memory::MemoryOps;
use clawker::session::control::NoSessions;
use clawker_actors::{ChildExit, ExitReason, Supervisor, SupervisorSpec};
use tokio_util::sync::CancellationToken;

fn untrusted(id: &str, reason: UntrustedReason) -> AgentUntrusted {
    AgentUntrusted {
        agent: AgentRef::new(id, "dev", "web"),
        reason,
        detail: "test".into(),
        at: events::now(),
    }
}

fn trusted(i: usize) -> AgentTrusted {
    AgentTrusted {
        agent: AgentRef::new(format!("c{i}"), "dev", "web"),
        rotations: 0,
        at: events::now(),
    }
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- audit -----------------------------------------------------------------

#[test]
fn audit_log_loses_nothing_on_clean_shutdown_and_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let path = AuditConfig::default().resolve_path(dir.path());
    assert!(path.ends_with("audit/events.jsonl"));
    let n = 3000;
    actix::System::new().block_on(async {
        let bus = events::start_bus();
        let cfg = AuditConfig {
            max_bytes: 64 * 1024,
            keep: 50,
            ..AuditConfig::default()
        };
        let sup = Supervisor::start(SupervisorSpec::new("policy").child(AuditActor::spec(
            bus.clone(),
            path.clone(),
            cfg,
        )));
        // Let the child start and subscribe.
        wait_until("audit subscribed", Duration::from_secs(5), || {
            bus.stats().subscribers == 1
        })
        .await;
        for i in 0..n {
            assert!(bus.publish(trusted(i)));
        }
        // Every event is in the audit mailbox; stop at once: whatever the
        // actor has not handled yet must be drained by stopped().
        bus.flush().await.unwrap();
        sup.shutdown();
        wait_until("supervisor stopped", Duration::from_secs(10), || {
            !sup.is_alive()
        })
        .await;
        let p = path.clone();
        wait_until("all lines durable", Duration::from_secs(10), move || {
            read_last(&p, 10 * n).map(|r| r.len()).unwrap_or(0) >= n
        })
        .await;
    });
    let recs = read_last(&path, 10 * n).unwrap();
    assert_eq!(recs.len(), n, "exactly every event, once");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.name, "agent.trusted");
        assert_eq!(r.event["container_id"], format!("c{i}"), "in publish order");
        assert_eq!(r.at, r.event["at"].as_str().unwrap());
    }
    let rotated = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().starts_with("events.jsonl."))
                .unwrap_or(false)
        })
        .count();
    assert!(rotated >= 2, "rotated {rotated} times");
    let last = read_last(&path, 3).unwrap();
    assert_eq!(last[2].event["container_id"], format!("c{}", n - 1));
}

// ---- metrics + health ----------------------------------------------------

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).map(|x| x == *v).unwrap_or(false))
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[test]
fn metrics_endpoint_reflects_published_events_and_health_endpoints_answer() {
    actix::System::new().block_on(async {
        let bus = events::start_bus();
        let metrics = Metrics::new();
        let actor =
            MetricsActor::new(bus.clone(), metrics.clone(), Duration::from_secs(3600)).unwrap();
        let addr = actix::Actor::start(actor);
        let readiness = Readiness::new();
        let stop = CancellationToken::new();
        let (bound, server) = serve_metrics(
            "127.0.0.1:0".parse().unwrap(),
            metrics.handle(),
            readiness.clone(),
            stop.clone(),
        )
        .await
        .unwrap();

        let reg = |id: &str, ok| AgentRegistered {
            agent: AgentRef::new(id, "dev", "web"),
            ok,
            reason: String::new(),
            at: events::now(),
        };
        bus.publish(reg("c1", true));
        bus.publish(reg("c2", true));
        bus.publish(reg("c3", false));
        bus.publish(untrusted("c3", UntrustedReason::RegisterFailed));
        bus.publish(untrusted("c4", UntrustedReason::CertInvalid));
        bus.publish(untrusted("c5", UntrustedReason::CertInvalid));
        for (id, attempts) in [("c1", 1), ("c2", 2)] {
            bus.publish(SessionConnected {
                agent: AgentRef::new(id, "dev", "web"),
                address: "10.0.0.2:7700".into(),
                attempts,
                peer_cn: "clawker.web.dev".into(),
                peer_thumbprint: Thumbprint([1; 32]),
                chain_verified: true,
                leaf_not_after: None,
                at: events::now(),
            });
        }
        bus.publish(SessionFailed {
            agent: AgentRef::new("c3", "dev", "web"),
            address: String::new(),
            reason: "connect_total_timeout".into(),
            attempts: 9,
            at: events::now(),
        });
        for ms in [3u64, 40, 700] {
            bus.publish(InitStepCompleted {
                agent: AgentRef::new("c1", "dev", "web"),
                plan: clawker::events::Plan::Init,
                step: "git".into(),
                step_index: 2,
                duration: Duration::from_millis(ms),
                exit_code: 0,
                at: events::now(),
            });
        }
        bus.publish(ContainmentApplied {
            agent: AgentRef::new("c4", "dev", "web"),
            trigger: "untrusted:cert_invalid".into(),
            action: ContainmentAction::Isolate,
            outcome: ContainmentOutcome::Applied,
            detail: String::new(),
            at: events::now(),
        });
        bus.publish(events::CertRotated {
            agent: AgentRef::new("c1", "dev", "web"),
            old: Thumbprint([1; 32]),
            new: Thumbprint([2; 32]),
            not_after: events::now(),
            reason: events::RotationReason::HalfLife,
            rotations: 1,
            duration: Duration::from_millis(4),
            at: events::now(),
        });
        metrics.record_child_exit(&ChildExit {
            supervisor: "sessions".into(),
            name: "session".into(),
            key: Some("c1".into()),
            reason: ExitReason::Panic("boom".into()),
            restarting: true,
        });
        bus.flush().await.unwrap();
        addr.send(RefreshMetrics).await.unwrap();

        let (status, body) = http_get(bound, "/metrics").await;
        assert_eq!(status, 200);
        let scrape =
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let v = |name: &str, labels: &[(&str, &str)]| {
            value(&scrape, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{body}"))
        };
        assert_eq!(v(m::REGISTRATIONS, &[("result", "ok")]), 2.0);
        assert_eq!(v(m::REGISTRATIONS, &[("result", "failed")]), 1.0);
        assert_eq!(v(m::UNTRUSTED, &[("reason", "cert_invalid")]), 2.0);
        assert_eq!(v(m::UNTRUSTED, &[("reason", "register_failed")]), 1.0);
        assert_eq!(
            v(
                m::CERT_ROTATIONS,
                &[("reason", "half_life"), ("result", "ok")]
            ),
            1.0
        );
        assert_eq!(v(m::SESSIONS, &[("status", "connected")]), 2.0);
        assert_eq!(v(m::SESSIONS, &[("status", "failed")]), 1.0);
        assert_eq!(v(m::SESSIONS, &[("status", "broken")]), 0.0);
        assert_eq!(
            v(
                m::CONTAINMENT_ACTIONS,
                &[("action", "isolate"), ("outcome", "applied")]
            ),
            1.0
        );
        assert_eq!(
            v(
                m::SUPERVISOR_RESTARTS,
                &[("supervisor", "sessions"), ("child", "session")]
            ),
            1.0
        );
        assert_eq!(v(m::SUPERVISOR_EXITS, &[("reason", "panic")]), 1.0);
        // Histogram: 3 observations, the largest bucket (+Inf) counts all.
        assert_eq!(v(m::INIT_STEP_DURATION, &[("step", "git")]), 3.0);
        let hist = scrape
            .samples
            .iter()
            .find(|s| s.metric == m::INIT_STEP_DURATION)
            .unwrap();
        match &hist.value {
            prometheus_parse::Value::Histogram(b) => {
                let le_50ms = b
                    .iter()
                    .find(|x| (x.less_than - 0.05).abs() < 1e-9)
                    .unwrap();
                assert_eq!(le_50ms.count, 2.0, "3 ms and 40 ms are ≤ 50 ms");
            }
            other => panic!("init step durations must be a histogram, got {other:?}"),
        }
        let published = bus.stats().published as f64;
        assert!(v(m::BUS_PUBLISHED, &[]) >= published - 1.0);
        assert_eq!(v(m::BUS_DROPPED, &[("where", "queue")]), 0.0);

        assert_eq!(http_get(bound, "/healthz").await.0, 200);
        let (code, body) = http_get(bound, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("registry, bus, docker"), "{body}");
        readiness.set_registry(true);
        readiness.set_bus(true);
        assert_eq!(http_get(bound, "/readyz").await.0, 503);
        readiness.set_docker(true);
        assert_eq!(http_get(bound, "/readyz").await, (200, "ready\n".into()));

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .unwrap();
        assert!(tokio::net::TcpStream::connect(bound).await.is_err());
    });
}

// ---- webhook ---------------------------------------------------------------

type Received = Arc<Mutex<Vec<serde_json::Value>>>;

/// A loopback HTTP server that records JSON bodies; the first `fail_first`
/// requests are answered 500.
async fn webhook_server(fail_first: usize) -> (std::net::SocketAddr, Received) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Received = Arc::default();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let g = g.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let g = g.clone();
                        let seen = seen.clone();
                        async move {
                            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let body = req.into_body().collect().await?.to_bytes();
                            let status = if n < fail_first {
                                500
                            } else {
                                if let Ok(v) = serde_json::from_slice(&body) {
                                    g.lock().unwrap().push(v);
                                }
                                200
                            };
                            Ok::<_, hyper::Error>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

#[test]
fn webhook_forwards_selected_events_and_retries_failures() {
    actix::System::new().block_on(async {
        let (addr, got) = webhook_server(1).await;
        let bus = events::start_bus();
        let cfg = WebhookConfig {
            url: format!("http://{addr}/hook"),
            events: vec!["agent.untrusted".into(), "policy.*".into()],
            timeout_ms: 2000,
            max_attempts: 3,
        };
        let _sup = Supervisor::start(
            SupervisorSpec::new("policy").child(WebhookForwarder::spec(bus.clone(), cfg)),
        );
        wait_until("forwarder subscribed", Duration::from_secs(5), || {
            bus.stats().subscribers == 1
        })
        .await;
        bus.publish(trusted(1)); // not selected
        bus.publish(untrusted("c9", UntrustedReason::CertCnMismatch));
        bus.publish(ContainmentApplied {
            agent: AgentRef::new("c9", "dev", "web"),
            trigger: "untrusted:cert_cn_mismatch".into(),
            action: ContainmentAction::Alert,
            outcome: ContainmentOutcome::Applied,
            detail: String::new(),
            at: events::now(),
        });
        let g = got.clone();
        wait_until("two webhook posts", Duration::from_secs(10), move || {
            g.lock().unwrap().len() >= 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0]["name"], "agent.untrusted",
            "first one retried after a 500"
        );
        assert_eq!(got[0]["event"]["reason"], "cert_cn_mismatch");
        assert_eq!(got[0]["event"]["container_id"], "c9");
        assert_eq!(got[1]["name"], "policy.containment.applied");
        assert!(got[1]["at"].is_string());
    });
}

// ---- containment actor (in-memory Docker) ----------------------------------

#[test]
fn containment_actor_contains_untrusted_and_repeated_session_failures_into_the_worldview() {
    actix::System::new().block_on(async {
        let bus = events::start_bus();
        let ops = MemoryOps::default();
        ops.add("bad", &["clawker-net", "corp"]);
        ops.add("flaky", &["clawker-net"]);
        let mut cfg = ContainmentConfig::default();
        cfg.rules.push(Rule {
            on: TriggerKind::SessionFailed,
            reasons: vec![],
            count: 3,
            window_secs: 60,
            actions: vec![ContainmentAction::Kill],
        });
        let mut applied = bus.subscribe::<ContainmentApplied>().unwrap();
        let core = Arc::new(Containment::new(
            cfg,
            Arc::new(ops.clone()),
            Arc::new(NoSessions),
            7700,
        ));
        let _sup = Supervisor::start(
            SupervisorSpec::new("policy").child(ContainmentActor::spec(bus.clone(), core)),
        );
        wait_until("containment subscribed", Duration::from_secs(5), || {
            bus.stats().subscribers == 4
        })
        .await;
        bus.publish(untrusted("bad", UntrustedReason::CertThumbprintMismatch));
        let mut got = Vec::new();
        for _ in 0..2 {
            let e = tokio::time::timeout(Duration::from_secs(5), applied.recv())
                .await
                .unwrap()
                .unwrap();
            got.push((e.action, e.outcome));
        }
        assert_eq!(
            got,
            vec![
                (ContainmentAction::Alert, ContainmentOutcome::Applied),
                (ContainmentAction::Isolate, ContainmentOutcome::Applied)
            ]
        );
        assert_eq!(
            ops.networks("bad").unwrap(),
            vec![MemoryOps::QUARANTINE],
            "isolated = quarantined, off every other network"
        );

        let failed = || SessionFailed {
            agent: AgentRef::new("flaky", "dev", "web"),
            address: String::new(),
            reason: "connect_total_timeout".into(),
            attempts: 1,
            at: events::now(),
        };
        bus.publish(failed());
        bus.publish(failed());
        bus.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            ops.running("flaky"),
            Some(true),
            "two failures are below the threshold"
        );
        bus.publish(failed());
        let e = tokio::time::timeout(Duration::from_secs(5), applied.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.agent.container_id, "flaky");
        assert_eq!(e.trigger, "session_failed_repeated:3");
        assert_eq!(
            (e.action, e.outcome),
            (ContainmentAction::Kill, ContainmentOutcome::Applied)
        );
        assert_eq!(ops.running("flaky"), Some(false));

        let view = bus.snapshot().await.unwrap();
        let bad = &view.agents["bad"];
        assert_eq!(bad.containment.len(), 2);
        assert_eq!(bad.containment[1].action, ContainmentAction::Isolate);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            json["agents"]["flaky"]["containment"][0]["outcome"],
            "applied"
        );
    });
}
