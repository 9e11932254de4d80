//! The operator commands of the Session protocol against the real clawkerd
//! binary over real mTLS: pseudo-terminal commands (terminal, resize,
//! foreground-job signals, EOF), per-command flow control, spawn errnos,
//! the user command's captured output (`Logs`), and tar copies in and out
//! (`CopyTo` never leaves its directory).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use clawker::archive;
use clawker::proto::clawkerd::v1::{
    self as pb, Command, ErrorCode, Response, command::Payload as Cmd, response::Payload as Resp,
};
use common::*;

async fn setup_with(opts: Opts) -> (TestPki, Clawkerd, Session) {
    let pki = TestPki::new();
    let d = Clawkerd::spawn_with(&pki, opts);
    let mut c = CpClient::connect(d.addr, &pki).await.expect("connect");
    let s = c.open_session().await.unwrap();
    (pki, d, s)
}

async fn setup() -> (TestPki, Clawkerd, Session) {
    setup_with(Opts::default()).await
}

fn pty(id: &str, argv: &[&str], rows: u32, cols: u32) -> Command {
    cmd(
        id,
        Cmd::Pty(pb::PtyCommand {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            rows,
            cols,
            ..Default::default()
        }),
    )
}

fn grant(id: &str, bytes: u64) -> Command {
    cmd(
        id,
        Cmd::FlowGrant(pb::FlowGrant {
            output_bytes: bytes,
        }),
    )
}

/// Reads responses for `id` until `want` appears in its stdout (or the
/// deadline); returns everything seen.
async fn read_until(s: &mut Session, id: &str, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut seen = String::new();
    while !seen.contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match s.next_for(id, left).await {
            Ok(Response {
                payload: Some(Resp::Stdout(c)),
                ..
            }) => seen.push_str(&String::from_utf8_lossy(&c.data)),
            Ok(r) if is_terminal(&r) => panic!("{id} ended before {want:?}: {r:?}; saw {seen:?}"),
            Ok(_) => {}
            Err(e) => panic!("{e} waiting for {want:?} on {id}; saw {seen:?}"),
        }
    }
    seen
}

fn done_code(rs: &[Response]) -> Option<i32> {
    rs.iter().find_map(|r| match &r.payload {
        Some(Resp::Done(d)) => Some(d.final_exit_code),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn pty_command_gets_a_terminal_of_the_asked_size_and_term() {
    let (_pki, _d, mut s) = setup().await;
    s.send(pty(
        "p1",
        &["/bin/sh", "-c", "tty; stty size; echo TERM=$TERM; exit 3"],
        33,
        101,
    ))
    .await;
    let rs = s.collect("p1", RECV_TIMEOUT).await.unwrap();
    let o = Outcome::from(rs);
    o.assert_well_formed();
    let out = o.stdout_str();
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("33 101"), "{out:?}");
    assert!(out.contains("TERM=xterm"), "{out:?}");
    // The line discipline turns \n into \r\n, as on any terminal.
    assert!(out.contains("\r\n"), "{out:?}");
    assert_eq!(o.done, Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn pty_signal_reaches_the_foreground_job_and_resize_the_terminal() {
    let (_pki, _d, mut s) = setup().await;
    // An interactive shell with job control: `sleep` runs as its own
    // foreground process group.
    s.send(pty("sh", &["/bin/sh", "-i"], 24, 80)).await;
    s.send(stdin("sh", b"echo started; sleep 100\n")).await;
    // "started" ending a line is the output, not the echoed input line;
    // sleep is the foreground job a moment later.
    read_until(&mut s, "sh", "started\r\n", RECV_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.send(signal("sh", libc::SIGINT)).await;
    s.send(stdin("sh", b"echo alive $?\n")).await;
    // 130: sleep died of SIGINT; the shell survived it.
    read_until(&mut s, "sh", "alive 130", RECV_TIMEOUT).await;
    s.send(cmd(
        "sh",
        Cmd::Resize(pb::Resize {
            rows: 50,
            cols: 132,
        }),
    ))
    .await;
    s.send(stdin("sh", b"stty size\n")).await;
    read_until(&mut s, "sh", "50 132", RECV_TIMEOUT).await;
    s.send(stdin("sh", b"exit 7\n")).await;
    let rs = s.collect("sh", RECV_TIMEOUT).await.unwrap();
    assert_eq!(done_code(&rs), Some(7));
}

#[tokio::test(flavor = "multi_thread")]
async fn pty_close_stdin_is_end_of_file_in_canonical_mode() {
    let (_pki, _d, mut s) = setup().await;
    s.send(pty("cat", &["cat"], 24, 80)).await;
    s.send(stdin("cat", b"hello\n")).await;
    s.send(close_stdin("cat")).await;
    let o = Outcome::from(s.collect("cat", RECV_TIMEOUT).await.unwrap());
    // Echoed by the terminal, then written back by cat.
    assert_eq!(
        o.stdout_str().matches("hello").count(),
        2,
        "{:?}",
        o.stdout_str()
    );
    assert_eq!(o.done, Some(0));
    // Resize of something that is not a pty, and of nothing.
    s.send(shell("plain", sh("sleep 5"))).await;
    s.send(cmd("plain", Cmd::Resize(pb::Resize { rows: 1, cols: 1 })))
        .await;
    let r = s.next_for("plain", RECV_TIMEOUT).await.unwrap();
    assert!(matches!(r.payload, Some(Resp::Started(_))));
    let r = s.next_for("plain", RECV_TIMEOUT).await.unwrap();
    assert!(
        matches!(&r.payload, Some(Resp::Error(e)) if e.code() == ErrorCode::InvalidRequest),
        "{r:?}"
    );
    s.send(cmd("none", Cmd::Resize(pb::Resize { rows: 1, cols: 1 })))
        .await;
    let r = s.next_for("none", RECV_TIMEOUT).await.unwrap();
    assert!(
        matches!(&r.payload, Some(Resp::Error(e)) if e.code() == ErrorCode::UnknownCommandId),
        "{r:?}"
    );
    s.send(signal("plain", libc::SIGKILL)).await;
    let _ = s.collect("plain", RECV_TIMEOUT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn spawn_failures_carry_the_os_errno() {
    let (pki, _d, mut s) = setup().await;
    let not_exec = pki.scratch.join("data.txt");
    std::fs::write(&not_exec, "not a program").unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let not_exec = not_exec.to_str().unwrap();
    for (id, argv, errno) in [
        ("s1", vec!["no-such-program-xyz"], libc::ENOENT),
        ("s2", vec!["/nonexistent/prog"], libc::ENOENT),
        ("s3", vec![not_exec], libc::EACCES),
    ] {
        s.send(shell(id, pipeline(vec![stage(&argv)]))).await;
        let rs = s.collect(id, RECV_TIMEOUT).await.unwrap();
        match &rs[0].payload {
            Some(Resp::Error(e)) => {
                assert_eq!(e.code(), ErrorCode::SpawnFailed);
                assert_eq!(e.os_errno, errno, "{id}: {e:?}");
            }
            other => panic!("{id}: {other:?}"),
        }
        let pid = format!("{id}-pty");
        s.send(pty(&pid, &argv, 0, 0)).await;
        let rs = s.collect(&pid, RECV_TIMEOUT).await.unwrap();
        match &rs[0].payload {
            Some(Resp::Error(e)) => {
                assert_eq!((e.code(), e.os_errno), (ErrorCode::SpawnFailed, errno))
            }
            other => panic!("{pid}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_granted_command_never_sends_more_output_than_its_credit() {
    let (_pki, _d, mut s) = setup().await;
    const TOTAL: usize = 4 << 20;
    const FIRST: u64 = 64 * 1024;
    s.send(grant("fc", FIRST)).await;
    s.send(shell(
        "fc",
        sh(&format!("head -c {TOTAL} /dev/zero; echo done >&2")),
    ))
    .await;
    s.send(close_stdin("fc")).await;
    // Accepted (StdinConsumed{0}) before Started.
    let r = s.next_for("fc", RECV_TIMEOUT).await.unwrap();
    assert!(
        matches!(
            r.payload,
            Some(Resp::StdinConsumed(pb::StdinConsumed { bytes: 0 }))
        ),
        "{r:?}"
    );
    let r = s.next_for("fc", RECV_TIMEOUT).await.unwrap();
    assert!(matches!(r.payload, Some(Resp::Started(_))), "{r:?}");
    let mut got = 0usize;
    // Everything the credit allows, then silence.
    loop {
        match s.next_for("fc", Duration::from_millis(500)).await {
            Ok(Response {
                payload: Some(Resp::Stdout(c)),
                ..
            }) => got += c.data.len(),
            Ok(r) => panic!("unexpected {r:?}"),
            Err(_) => break,
        }
    }
    assert_eq!(got as u64, FIRST, "exactly the granted bytes");
    // Grant the rest: everything arrives, then Done.
    s.send(grant("fc", (TOTAL as u64) * 2)).await;
    let o = Outcome::from(s.collect("fc", Duration::from_secs(30)).await.unwrap());
    assert_eq!(got + o.stdout.len(), TOTAL);
    assert_eq!(o.done, Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stderr[&0]), "done\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_granted_command_acknowledges_the_stdin_its_child_consumed() {
    let (_pki, _d, mut s) = setup().await;
    s.send(grant("ack", 1 << 20)).await;
    s.send(shell("ack", sh("wc -c"))).await;
    let chunk = vec![b'x'; 100_000];
    for _ in 0..10 {
        s.send(stdin("ack", &chunk)).await;
    }
    s.send(close_stdin("ack")).await;
    let rs = s.collect("ack", Duration::from_secs(30)).await.unwrap();
    let acked: u64 = rs
        .iter()
        .filter_map(|r| match &r.payload {
            Some(Resp::StdinConsumed(c)) => Some(c.bytes),
            _ => None,
        })
        .sum();
    assert_eq!(acked, 1_000_000);
    let o = Outcome::from(rs);
    assert_eq!(o.stdout_str().trim(), "1000000");
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_replay_and_follow_the_user_commands_output_which_still_reaches_stdout() {
    let (_pki, d, mut s) = setup_with(Opts {
        args: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo first; echo oops >&2; sleep 0.5; echo second; sleep 30".into(),
        ],
        ..Default::default()
    })
    .await;
    s.send(agent_ready("ready")).await;
    let rs = s.collect("ready", RECV_TIMEOUT).await.unwrap();
    assert_eq!(done_code(&rs), Some(0));
    // Follow from the start: the buffered lines, then live ones.
    s.send(cmd(
        "lf",
        Cmd::Logs(pb::Logs {
            follow: true,
            tail_bytes: 0,
        }),
    ))
    .await;
    let seen = read_until(&mut s, "lf", "second", RECV_TIMEOUT).await;
    assert!(
        seen.contains("first\n") && seen.contains("oops\n"),
        "{seen:?}"
    );
    // Signal ends a follow with Done{0}.
    s.send(signal("lf", libc::SIGTERM)).await;
    let rs = s.collect("lf", RECV_TIMEOUT).await.unwrap();
    assert_eq!(done_code(&rs), Some(0));
    // Without follow: everything buffered, then Done; tail cuts it.
    let o = s
        .run_cmd(
            "l2",
            Cmd::Logs(pb::Logs {
                follow: false,
                tail_bytes: 0,
            }),
        )
        .await;
    assert!(o.stdout_str().contains("first\n") && o.stdout_str().contains("second\n"));
    let o = s
        .run_cmd(
            "l3",
            Cmd::Logs(pb::Logs {
                follow: false,
                tail_bytes: 7,
            }),
        )
        .await;
    assert_eq!(o.stdout_str(), "second\n");
    // docker logs still sees the output: it went to clawkerd's stdout.
    let deadline = Instant::now() + RECV_TIMEOUT;
    while !d.stdout.lock().unwrap().contains("second") {
        assert!(Instant::now() < deadline, "{:?}", d.stdout.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_to_then_copy_from_round_trips_a_tree_with_modes_and_owners() {
    let (pki, _d, mut s) = setup().await;
    // A tree on "the host".
    let src = tempfile::tempdir().unwrap();
    let top = src.path().join("proj");
    std::fs::create_dir_all(top.join("bin")).unwrap();
    std::fs::write(top.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(top.join("bin/run"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(top.join("notes"), "n").unwrap();
    std::os::unix::fs::chown(top.join("notes"), Some(CLAUDE_UID), Some(CLAUDE_UID)).unwrap();
    std::os::unix::fs::symlink("bin/run", top.join("link")).unwrap();
    let mut tar = Vec::new();
    archive::pack(&top, "proj", &mut tar).unwrap();

    let dest = pki.scratch.join("in");
    std::fs::create_dir(&dest).unwrap();
    s.send(grant("ct", 1 << 20)).await;
    s.send(cmd(
        "ct",
        Cmd::CopyTo(pb::CopyTo {
            dest_dir: dest.to_str().unwrap().into(),
            preserve_owner: true,
            ..Default::default()
        }),
    ))
    .await;
    for c in tar.chunks(7000) {
        s.send(stdin("ct", c)).await;
    }
    s.send(close_stdin("ct")).await;
    let rs = s.collect("ct", RECV_TIMEOUT).await.unwrap();
    assert_eq!(done_code(&rs), Some(0), "{rs:?}");
    let acked: u64 = rs
        .iter()
        .filter_map(|r| match &r.payload {
            Some(Resp::StdinConsumed(c)) => Some(c.bytes),
            _ => None,
        })
        .sum();
    assert_eq!(acked as usize, tar.len());
    let got = dest.join("proj");
    let meta = |p: &str| std::fs::symlink_metadata(got.join(p)).unwrap();
    assert_eq!(meta("bin/run").mode() & 0o7777, 0o750);
    assert_eq!(meta("notes").uid(), CLAUDE_UID);
    assert_eq!(
        std::fs::read_link(got.join("link")).unwrap().to_str(),
        Some("bin/run")
    );

    // And back out.
    let o = s
        .run_cmd(
            "cf",
            Cmd::CopyFrom(pb::CopyFrom {
                path: got.to_str().unwrap().into(),
            }),
        )
        .await;
    assert_eq!(o.done, Some(0));
    let back = tempfile::tempdir().unwrap();
    let opts = archive::UnpackOptions {
        owner: archive::Owner::Preserve,
        ..Default::default()
    };
    archive::unpack(&o.stdout[..], back.path(), &opts).unwrap();
    let m = std::fs::metadata(back.path().join("proj/notes")).unwrap();
    let want = std::fs::metadata(top.join("notes")).unwrap().mode() & 0o7777;
    assert_eq!((m.uid(), m.mode() & 0o7777), (CLAUDE_UID, want));
    let m = std::fs::metadata(back.path().join("proj/bin/run")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o750);
    assert_eq!(
        std::fs::read(back.path().join("proj/bin/run")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_to_refuses_escaping_entries_and_missing_directories() {
    let (pki, _d, mut s) = setup().await;
    // A symlink pointing out of the destination.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "escape", "/etc").unwrap();
    let tar = b.into_inner().unwrap();
    let dest = pki.scratch.join("jail");
    std::fs::create_dir(&dest).unwrap();
    s.send(cmd(
        "esc",
        Cmd::CopyTo(pb::CopyTo {
            dest_dir: dest.to_str().unwrap().into(),
            ..Default::default()
        }),
    ))
    .await;
    s.send(stdin("esc", &tar)).await;
    s.send(close_stdin("esc")).await;
    let rs = s.collect("esc", RECV_TIMEOUT).await.unwrap();
    match &rs.last().unwrap().payload {
        Some(Resp::Error(e)) => {
            assert_eq!(e.code(), ErrorCode::InvalidRequest);
            assert!(e.message.contains("absolute"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(std::fs::symlink_metadata(dest.join("escape")).is_err());
    // A missing directory is refused before Started (the CP then tries the
    // parent), and so is a relative one.
    for (id, dir, code) in [
        ("nf", "/nonexistent/dir", ErrorCode::NotFound),
        ("rel", "relative/dir", ErrorCode::InvalidRequest),
    ] {
        s.send(cmd(
            id,
            Cmd::CopyTo(pb::CopyTo {
                dest_dir: dir.into(),
                ..Default::default()
            }),
        ))
        .await;
        let rs = s.collect(id, RECV_TIMEOUT).await.unwrap();
        assert_eq!(rs.len(), 1, "{rs:?}");
        assert!(
            matches!(&rs[0].payload, Some(Resp::Error(e)) if e.code() == code),
            "{rs:?}"
        );
    }
    let o = s
        .run_cmd(
            "cfn",
            Cmd::CopyFrom(pb::CopyFrom {
                path: "/nonexistent/x".into(),
            }),
        )
        .await;
    assert_eq!(o.error.map(|e| e.code()), Some(ErrorCode::NotFound));
}
