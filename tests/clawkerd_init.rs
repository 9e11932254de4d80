//! clawkerd as init: boot exit codes, AgentReady (spawn once, privilege
//! drop, ready file), signal forwarding, reaping, exit codes.

mod common;

use std::time::{Duration, Instant};

use clawker::proto::clawkerd::v1::{ErrorCode, response::Payload as Resp};
use common::*;

fn opts(args: &[&str]) -> Opts {
    Opts {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn agent_ready_ok(d: &Clawkerd, pki: &TestPki, id: &str) {
    let mut c = CpClient::connect(d.addr, pki).await.unwrap();
    let mut s = c.open_session().await.unwrap();
    s.send(agent_ready(id)).await;
    let r = s.next_for(id, RECV_TIMEOUT).await.unwrap();
    assert!(
        matches!(r.payload, Some(Resp::Done(ref d)) if d.final_exit_code == 0),
        "{r:?}"
    );
}

#[test]
fn boot_config_errors_exit_2_and_transient_errors_exit_1() {
    let pki = TestPki::new();
    // CLAWKER_AGENT missing.
    let mut d = Clawkerd::spawn_with(
        &pki,
        Opts {
            env: vec![("CLAWKER_AGENT".into(), "".into())],
            no_wait: true,
            ..Default::default()
        },
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(2));
    let line = d.logs.wait_for("shutdown", Duration::from_secs(1)).unwrap();
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("required env not set: CLAWKER_AGENT")
    );

    // Unknown user.
    let mut d = Clawkerd::spawn_with(
        &pki,
        Opts {
            env: vec![("CLAWKER_USER".into(), "nosuchuser".into())],
            no_wait: true,
            ..Default::default()
        },
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(2));
    assert!(
        d.logs
            .wait_for("resolve_user_failed", Duration::from_secs(1))
            .is_some()
    );

    // Garbage agent key.
    let bad = TestPki::new();
    std::fs::write(bad.bootstrap_dir.join("key.pem"), "garbage").unwrap();
    let mut d = Clawkerd::spawn_with(
        &bad,
        Opts {
            no_wait: true,
            ..Default::default()
        },
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(2));
    let line = d.logs.wait_for("shutdown", Duration::from_secs(1)).unwrap();
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("agent leaf keypair"),
        "{line}"
    );

    // Missing and empty bootstrap files name the file.
    for (file, empty) in [
        ("ca.pem", false),
        ("assertion.jwt", false),
        ("cert.pem", true),
    ] {
        let p = TestPki::new();
        if empty {
            std::fs::write(p.bootstrap_dir.join(file), "").unwrap();
        } else {
            std::fs::remove_file(p.bootstrap_dir.join(file)).unwrap();
        }
        let mut d = Clawkerd::spawn_with(
            &p,
            Opts {
                no_wait: true,
                ..Default::default()
            },
        );
        assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(2), "{file}");
        let line = d.logs.wait_for("shutdown", Duration::from_secs(1)).unwrap();
        assert!(line["error"].as_str().unwrap().contains(file), "{line}");
    }

    // Port in use: transient.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut d = Clawkerd::spawn_with(
        &pki,
        Opts {
            env: vec![(
                "CLAWKER_LISTEN_ADDR".into(),
                busy.local_addr().unwrap().to_string(),
            )],
            no_wait: true,
            ..Default::default()
        },
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(1));
}

#[test]
fn sigterm_before_agent_ready_exits_1() {
    let pki = TestPki::new();
    let mut d = Clawkerd::spawn_with(&pki, opts(&["sleep", "30"]));
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(1));
    assert!(
        d.logs
            .wait_count("shutdown_before_spawn", 1, Duration::from_secs(5))
    );
    assert_eq!(d.logs.count("shutdown_before_spawn"), 1);
    // Other signals before spawn are ignored, not fatal.
    let mut d = Clawkerd::spawn_with(&pki, opts(&["sleep", "30"]));
    d.signal(libc::SIGHUP);
    d.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.is_running());
}

/// AgentReady spawns once as the resolved user (uid 1001 here), touches the
/// ready file, replays as Done{0}; on SIGTERM the child gets exactly one
/// SIGTERM ([quirk fixed]: the reference sent two) and clawkerd exits with
/// the child's code.
#[tokio::test(flavor = "multi_thread")]
async fn agent_ready_spawns_once_drops_privileges_and_forwards_one_sigterm() {
    let pki = TestPki::new();
    let dir = pki.scratch.display().to_string();
    let script = format!(
        r#"n=0; trap 'echo TERM >> {dir}/terms; n=$((n+1))' TERM
id -u > {dir}/uid; id -G > {dir}/groups; echo "$HOME $USER" > {dir}/env
while [ "$n" -eq 0 ]; do sleep 0.05; done
sleep 0.5
exit 7"#
    );
    let mut d = Clawkerd::spawn_with(&pki, opts(&["--", "/bin/sh", "-c", &script]));
    agent_ready_ok(&d, &pki, "ar1").await;
    assert!(pki.scratch.join("ready").exists(), "ready file");
    // Replays: Done{0}, no second spawn.
    agent_ready_ok(&d, &pki, "ar2").await;
    agent_ready_ok(&d, &pki, "ar3").await;
    assert!(
        d.logs
            .wait_for_async("spawn_started", 1, Duration::from_secs(5))
            .await
    );
    assert_eq!(d.logs.count("spawn_started"), 1);
    assert!(
        d.logs
            .wait_for_async("agent_ready_already_spawned", 2, Duration::from_secs(5))
            .await
    );
    assert_eq!(d.logs.count("agent_ready_already_spawned"), 2);

    let deadline = Instant::now() + Duration::from_secs(5);
    while !pki.scratch.join("env").exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let read = |f: &str| std::fs::read_to_string(pki.scratch.join(f)).unwrap_or_default();
    assert_eq!(read("uid").trim(), CLAUDE_UID.to_string());
    assert_eq!(
        read("groups").trim(),
        "1001 10",
        "primary + supplementary (wheel)"
    );
    assert_eq!(read("env").trim(), "/home/claude claude");

    d.signal(libc::SIGTERM);
    let code = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(15)));
    assert_eq!(code, Some(7));
    assert_eq!(
        read("terms").lines().count(),
        1,
        "exactly one SIGTERM reached the child"
    );
}

#[test]
fn exit_code_is_the_childs_or_128_plus_signal() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (args, signal, want) in [
        (vec!["/bin/sh", "-c", "exit 42"], None, 42),
        (vec!["sleep", "30"], Some(libc::SIGTERM), 143),
        (vec!["sleep", "30"], Some(libc::SIGINT), 130),
    ] {
        let pki = TestPki::new();
        let mut d = Clawkerd::spawn_with(&pki, opts(&args));
        rt.block_on(agent_ready_ok(&d, &pki, "ar"));
        if let Some(sig) = signal {
            d.wait_user_command(Duration::from_secs(10));
            d.signal(sig);
        }
        assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(want), "{args:?}");
    }
}

#[test]
fn other_signals_are_forwarded_to_the_child_group() {
    let pki = TestPki::new();
    let dir = pki.scratch.display().to_string();
    let script = format!(
        r#"trap 'echo HUP >> {dir}/sigs' HUP; trap 'echo USR1 >> {dir}/sigs; exit 0' USR1
touch {dir}/up; while :; do sleep 0.05; done"#
    );
    let mut d = Clawkerd::spawn_with(&pki, opts(&["/bin/sh", "-c", &script]));
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(agent_ready_ok(&d, &pki, "ar"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pki.scratch.join("up").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    d.signal(libc::SIGUSR1);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    let sigs = std::fs::read_to_string(pki.scratch.join("sigs")).unwrap();
    assert_eq!(sigs, "HUP\nUSR1\n");
}

#[test]
fn orphans_are_reaped_and_do_not_delay_the_exit_much() {
    let pki = TestPki::new();
    let mut d = Clawkerd::spawn_with(
        &pki,
        Opts {
            args: vec![
                "/bin/sh".into(),
                "-c".into(),
                "(sleep 0.3; exit 0) & exit 0".into(),
            ],
            env: vec![("CLAWKER_LOG_LEVEL".into(), "debug".into())],
            ..Default::default()
        },
    );
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(agent_ready_ok(&d, &pki, "ar"));
    let t = Instant::now();
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(
        d.logs.count("spawn_orphan_reaped") >= 1,
        "{:#?}",
        d.logs.all()
    );
}

/// A failed spawn answers Error{IO_ERROR} (delivered before clawkerd exits
/// 1, unlike the reference's race) and replays the same error.
#[tokio::test(flavor = "multi_thread")]
async fn failed_spawn_answers_io_error_then_exits_1() {
    let pki = TestPki::new();
    let mut d = Clawkerd::spawn_with(
        &pki,
        Opts {
            args: vec!["no-such-program-xyz".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            ..Default::default()
        },
    );
    let mut c = CpClient::connect(d.addr, &pki).await.unwrap();
    let mut s = c.open_session().await.unwrap();
    s.send(agent_ready("ar")).await;
    let r = s.next_for("ar", RECV_TIMEOUT).await.unwrap();
    match r.payload {
        Some(Resp::Error(e)) => {
            assert_eq!(e.code(), ErrorCode::IoError);
            assert!(
                e.message.starts_with("agent_ready: spawn: "),
                "{}",
                e.message
            );
            assert!(e.message.contains("claude"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let code = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(1));
}
