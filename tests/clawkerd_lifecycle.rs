//! clawkerd's side of one-time init vs every-start boot, and of ending the
//! container on a failed step, against the real binary over real mTLS:
//! `HelloAck{initialized, cmd_running}`, the init marker written by
//! `AgentInitialized` and read by the next clawkerd process (a restarted
//! container), and `exit_on_non_zero` ending PID 1 with the step's code
//! after its `Done` is on the wire.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use clawker::proto::clawkerd::v1::{
    self as pb, command::Payload as Cmd, response::Payload as Resp,
};
use common::*;

const T: Duration = Duration::from_secs(10);

async fn ack(s: &mut Session, id: &str) -> pb::HelloAck {
    s.send(hello(id)).await;
    match s.next_for(id, T).await.unwrap().payload {
        Some(Resp::HelloAck(a)) => a,
        other => panic!("expected HelloAck, got {other:?}"),
    }
}

async fn done(s: &mut Session, id: &str) -> i32 {
    match s.next_for(id, T).await.unwrap().payload {
        Some(Resp::Done(d)) => d.final_exit_code,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn agent_initialized(id: &str) -> pb::Command {
    cmd(id, Cmd::AgentInitialized(pb::AgentInitialized {}))
}

async fn session(d: &Clawkerd, pki: &TestPki) -> Session {
    let mut c = CpClient::connect(d.addr, pki).await.unwrap();
    let s = c.open_session().await.unwrap();
    // Keep the client (and its connection) alive for the session.
    std::mem::forget(c);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_ack_reports_the_init_marker_and_the_running_command_across_restarts() {
    let pki = TestPki::new();
    let opts = Opts {
        args: vec!["sleep".into(), "60".into()],
        ..Default::default()
    };
    let d = Clawkerd::spawn_with(&pki, opts.clone());
    let mut s = session(&d, &pki).await;
    // Fresh container: neither.
    let a = ack(&mut s, "h1").await;
    assert_eq!((a.initialized, a.cmd_running), (false, false));

    // The last init step writes the marker (0600 in a 0700 dir) before Done.
    s.send(agent_initialized("init-x-agent-initialized-6"))
        .await;
    assert_eq!(done(&mut s, "init-x-agent-initialized-6").await, 0);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pki.init_marker()), 0o600);
    assert_eq!(mode(&pki.state_dir()), 0o700);
    let a = ack(&mut s, "h2").await;
    assert_eq!((a.initialized, a.cmd_running), (true, false), "read afresh");

    // The boot plan's last step starts the command.
    s.send(agent_ready("boot-x-agent-ready-2")).await;
    assert_eq!(done(&mut s, "boot-x-agent-ready-2").await, 0);
    let a = ack(&mut s, "h3").await;
    assert_eq!(
        (a.initialized, a.cmd_running),
        (true, true),
        "a reconnect runs nothing"
    );
    // A second session of the same process (CP restart) sees the same.
    let mut s2 = session(&d, &pki).await;
    let a = ack(&mut s2, "h4").await;
    assert_eq!((a.initialized, a.cmd_running), (true, true));
    drop(s2);
    drop(s);
    drop(d);

    // Container restart: a new clawkerd process on the same writable layer.
    let d = Clawkerd::spawn_with(&pki, opts);
    let mut s = session(&d, &pki).await;
    let a = ack(&mut s, "h5").await;
    assert_eq!((a.initialized, a.cmd_running), (true, false), "boot only");
    assert!(d.logs.count("hello_ack") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_state_dir_is_tolerated_and_init_simply_runs_again() {
    let pki = TestPki::new();
    // A regular file where the state dir should be: mkdir fails.
    std::fs::write(pki.state_dir(), "not a dir").unwrap();
    let d = Clawkerd::spawn(&pki);
    let mut s = session(&d, &pki).await;
    s.send(agent_initialized("i")).await;
    assert_eq!(
        done(&mut s, "i").await,
        0,
        "reference: Done{{0}} and a warning"
    );
    assert!(
        d.logs
            .wait_for_async("agent_initialized_marker_write_failed", 1, T)
            .await
    );
    let a = ack(&mut s, "h").await;
    assert!(!a.initialized);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_non_zero_ends_pid_1_with_the_steps_code_after_its_done() {
    let pki = TestPki::new();
    let mut d = Clawkerd::spawn(&pki);
    let mut s = session(&d, &pki).await;
    // Without the flag a failure is just an answer; with it, a success is too.
    let out = s.run("plain", sh("exit 5")).await;
    assert_eq!(out.done, Some(5));
    let mut ok = sh("true");
    ok.exit_on_non_zero = true;
    assert_eq!(s.run("ok", ok).await.done, Some(0));
    assert!(d.is_running());

    let mut failing = sh("echo 'hook broke' >&2; exit 7");
    failing.exit_on_non_zero = true;
    let out = s.run("boot-x-pre-run-1", failing).await;
    // The Done reached us before PID 1 went away.
    assert_eq!(out.done, Some(7));
    let stderr = String::from_utf8_lossy(&out.stderr[&0]).into_owned();
    assert!(stderr.contains("hook broke"), "{out:?}");
    assert_eq!(d.wait_exit(T), Some(7), "{:#?}", d.logs.all());
    assert_eq!(d.logs.count("command_exit_on_non_zero"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_killed_by_a_signal_ends_pid_1_with_code_1() {
    let pki = TestPki::new();
    let mut d = Clawkerd::spawn(&pki);
    let mut s = session(&d, &pki).await;
    let mut killed = sh("kill -9 $$");
    killed.exit_on_non_zero = true;
    let out = s.run("k", killed).await;
    assert_eq!(out.done, Some(-1));
    assert_eq!(d.wait_exit(T), Some(1), "-1 is mirrored as 1");
}
