//! The operator's way into an agent, end to end on a real Docker engine:
//! an in-process CP (`cp::start`, as `clawker cp serve`), real agent
//! containers from `CLAWKER_TEST_IMAGE`, and the real `clawker` binary as
//! the operator runs it — under a real pseudo-terminal where it matters.
//!
//! - exit codes (own, 127/126 spawn failures), users, workdir, env, stdin
//!   to EOF, a signal reaching the remote process group, logs, the audit
//!   events with the CLI certificate's thumbprint;
//! - `agent shell` under a pty: prompt, echo, window size, ^C to the
//!   foreground job, and the terminal restored after the container is
//!   killed mid-session;
//! - `agent cp` both ways with modes, owners and a symlink;
//! - an untrusted agent: refused, forced (and recorded), and the
//!   `quarantine_untrusted` example — this very file's logic — pausing it,
//!   across a CP restart.
//!
//! Networks are 10.224.N.0/24 (`clawker-exec-N`); everything is removed
//! on drop. Tests run one at a time (shared engine, 2 cores).

mod common;

#[allow(dead_code)]
#[path = "../examples/quarantine_untrusted.rs"]
mod quarantine;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clawker::cp;
use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The CP's tasks run on a multi-thread runtime, as in `cp serve`; the
/// test body only awaits (blocking work goes through `spawn_blocking`).
fn run_system<F: std::future::Future<Output = ()>>(f: F) {
    actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    })
    .block_on(f);
}

/// Runs the CLI to completion: (exit code, stdout, stderr).
async fn clawker(mut cmd: Command, stdin: Option<Vec<u8>>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            let mut w = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn exec_cmd(env: &DockerEnv, admin: SocketAddr, args: &[&str]) -> Command {
    let mut c = env.cli(admin);
    c.args(["agent", "exec"]).args(args);
    c
}

fn cli_thumbprint(env: &DockerEnv) -> String {
    let pem = std::fs::read(clawker::pki::AuthPaths::new(env.state.path()).cli_cert()).unwrap();
    let der = clawker::tls::load_certs("cli", &pem).unwrap().remove(0);
    clawker::identity::Thumbprint::of_der(&der).to_hex()
}

async fn start_agent(
    env: &DockerEnv,
    docker: &bollard::Docker,
    seen: &Seen,
    spec: cp::agent::RunSpec,
) -> String {
    let id = cp::agent::run(docker, &env.material(), &spec)
        .await
        .unwrap();
    wait_event(seen, &id, "agent.init.completed", 1, 60).await;
    id
}

#[test]
fn exec_exit_codes_users_stdin_eof_signals_logs_and_audit_events() {
    let _g = serial();
    let env = DockerEnv::new(
        "clawker-exec",
        1,
        "10.224.1.0/24",
        "127.0.0.1:0".parse().unwrap(),
    );
    run_system(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let admin = cp1.admin_api_addr;
        let mut spec = env.spec("ops", "e2e");
        spec.command = ["/bin/sh", "-c", "echo hello-from-cmd; echo to-stderr >&2; trap 'exit 0' TERM; while :; do sleep 1; done"]
            .map(String::from)
            .to_vec();
        let id = start_agent(&env, &docker, &seen, spec).await;
        let ex = |args: &[&str]| {
            let mut a = vec!["ops", "--project", "e2e"];
            a.extend_from_slice(args);
            exec_cmd(&env, admin, &a)
        };

        // Exit codes: the command's own, and the shell's for spawn failures.
        let (code, _, _) = clawker(ex(&["--", "sh", "-c", "exit 7"]), None).await;
        assert_eq!(code, 7);
        let (code, _, _) = clawker(ex(&["true"]), None).await;
        assert_eq!(code, 0);
        let (code, _, err) = clawker(ex(&["--", "no-such-command-xyz"]), None).await;
        assert_eq!(code, 127, "{err}");
        assert!(err.contains("not found"), "{err}");
        let (code, _, err) = clawker(ex(&["--", "/etc/passwd"]), None).await;
        assert_eq!(code, 126, "{err}");

        // The agent user by default, root only when asked; workdir, env.
        let (_, out, _) = clawker(ex(&["--", "id", "-u"]), None).await;
        assert_eq!(out.trim(), "1001");
        let (_, out, _) = clawker(ex(&["-u", "root", "--", "id", "-u"]), None).await;
        assert_eq!(out.trim(), "0");
        let (_, out, _) = clawker(
            ex(&[
                "-w",
                "/tmp",
                "-e",
                "FOO=bar",
                "--",
                "sh",
                "-c",
                "echo $PWD $FOO $HOME $USER",
            ]),
            None,
        )
        .await;
        assert_eq!(out.trim(), "/tmp bar /home/claude claude");

        // Stdin to EOF (wc only answers once it sees the end).
        let (code, out, _) =
            clawker(ex(&["-i", "--", "wc", "-c"]), Some(vec![b'z'; 300_000])).await;
        assert_eq!((code, out.trim()), (0, "300000"));

        // A signal to the CLI reaches the remote command's process group:
        // both background sleeps die with the shell.
        let mut c = ex(&[
            "--",
            "sh",
            "-c",
            "sleep 101 & sleep 102 & echo started; wait",
        ]);
        let code = tokio::task::spawn_blocking(move || {
            let mut child = c
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "started");
            // SAFETY: kill with plain integers.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap().code()
        })
        .await
        .unwrap();
        assert_eq!(code, Some(143));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, out, _) = clawker(
                ex(&["--", "sh", "-c", "ps | grep -c '[s]leep 10[12]'"]),
                None,
            )
            .await;
            if out.trim() == "0" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sleeps survived the signal: {out}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The user command's output, as docker logs would show it.
        let mut logs = env.cli(admin);
        logs.args(["agent", "logs", "ops", "--project", "e2e"]);
        let (code, out, _) = clawker(logs, None).await;
        assert_eq!(code, 0);
        assert!(
            out.contains("hello-from-cmd\n") && out.contains("to-stderr\n"),
            "{out:?}"
        );

        // Every use is audited, with the operator's certificate.
        cp1.bus.flush().await.unwrap();
        let started = events_for(&seen, &id, "agent.exec.started");
        let finished = events_for(&seen, &id, "agent.exec.finished");
        let operator = cli_thumbprint(&env);
        let exit7 = started
            .iter()
            .find(|e| e["argv"] == serde_json::json!(["sh", "-c", "exit 7"]))
            .expect("exec of `exit 7` recorded");
        assert_eq!(exit7["operator"], operator);
        assert_eq!(
            (exit7["user"].as_str(), exit7["tty"].as_bool()),
            (Some("claude"), Some(false))
        );
        let done7 = finished
            .iter()
            .find(|e| e["exec_id"] == exit7["exec_id"])
            .unwrap();
        assert_eq!(done7["exit_code"], 7);
        let wc = finished
            .iter()
            .find(|e| e["argv"] == serde_json::json!(["wc", "-c"]))
            .unwrap();
        assert_eq!(
            (wc["bytes_in"].as_u64(), wc["bytes_out"].as_u64()),
            (Some(300_000), Some(7))
        );
        assert!(finished.iter().any(|e| e["exit_code"] == 127));
        assert!(finished.iter().any(|e| e["kind"] == "logs"));
        cp::stop(cp1).await;
    });
}

#[test]
fn shell_under_a_real_terminal_echoes_resizes_interrupts_and_restores_it_when_the_session_breaks() {
    let _g = serial();
    let env = DockerEnv::new(
        "clawker-exec",
        2,
        "10.224.2.0/24",
        "127.0.0.1:0".parse().unwrap(),
    );
    run_system(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let admin = cp1.admin_api_addr;
        let id = start_agent(&env, &docker, &seen, env.spec("tty", "e2e")).await;

        let pty = std::sync::Arc::new(Pty::open(30, 100).unwrap());
        let before = pty.termios().unwrap();
        assert!(before.canonical() && before.echoes());
        let mut cmd = env.cli(admin);
        cmd.args([
            "agent",
            "shell",
            "tty",
            "--project",
            "e2e",
            "-e",
            "PS1=clawker$ ",
        ])
        .env("TERM", "xterm");
        let child = pty.spawn(&mut cmd).unwrap();
        let p = pty.clone();
        let mut screen = tokio::task::spawn_blocking(move || {
            let mut seen = String::new();
            p.read_until(&mut seen, "clawker$ ", Duration::from_secs(20))
                .unwrap();
            // Raw mode locally while the session runs.
            let during = p.termios().unwrap();
            assert!(!during.canonical() && !during.echoes(), "{during:?}");
            // Typed, echoed by the remote terminal, run.
            p.write(b"echo hi-$((40+2))\r").unwrap();
            p.read_until(&mut seen, "hi-42\r\n", Duration::from_secs(10))
                .unwrap();
            assert!(seen.contains("echo hi-$((40+2))"), "no echo: {seen:?}");
            // The window size travels, and follows a resize.
            p.write(b"stty size\r").unwrap();
            p.read_until(&mut seen, "30 100", Duration::from_secs(10))
                .unwrap();
            p.resize(40, 120).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            p.write(b"stty size\r").unwrap();
            p.read_until(&mut seen, "40 120", Duration::from_secs(10))
                .unwrap();
            // ^C reaches the foreground job, not the shell.
            p.write(b"sleep 100\r").unwrap();
            std::thread::sleep(Duration::from_millis(500));
            p.write(b"\x03").unwrap();
            p.write(b"echo rc=$?\r").unwrap();
            p.read_until(&mut seen, "rc=130", Duration::from_secs(10))
                .unwrap();
            seen
        })
        .await
        .unwrap();

        // The container dies mid-session: the CLI ends (255) and leaves
        // the terminal exactly as it found it.
        docker
            .kill_container(&id, None::<bollard::query_parameters::KillContainerOptions>)
            .await
            .unwrap();
        let p = pty.clone();
        let (code, after, screen) = tokio::task::spawn_blocking(move || {
            let mut child = child;
            let deadline = Instant::now() + Duration::from_secs(20);
            let code = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st.code();
                }
                assert!(Instant::now() < deadline, "the CLI outlived its session");
                // Keep the terminal drained so the CLI never blocks writing.
                if let Ok(b) = p.read_some(Duration::from_millis(50)) {
                    screen.push_str(&String::from_utf8_lossy(&b));
                }
            };
            while let Ok(b) = p.read_some(Duration::from_millis(50)) {
                if b.is_empty() {
                    break;
                }
                screen.push_str(&String::from_utf8_lossy(&b));
            }
            (code, p.termios().unwrap(), screen)
        })
        .await
        .unwrap();
        assert_eq!(code, Some(255), "{screen:?}");
        assert!(screen.contains("session"), "{screen:?}");
        assert_eq!(after, before, "terminal not restored");
        let finished = events_for(&seen, &id, "agent.exec.finished");
        assert!(
            finished
                .iter()
                .any(|e| e["tty"] == true && e["exit_code"].is_null())
        );
        cp::stop(cp1).await;
    });
}

#[test]
fn cp_round_trips_a_tree_with_modes_owners_and_symlinks_both_ways() {
    let _g = serial();
    let env = DockerEnv::new(
        "clawker-exec",
        3,
        "10.224.3.0/24",
        "127.0.0.1:0".parse().unwrap(),
    );
    run_system(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let admin = cp1.admin_api_addr;
        start_agent(&env, &docker, &seen, env.spec("files", "e2e")).await;

        let host = tempfile::tempdir().unwrap();
        let tree = host.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::create_dir_all(tree.join("ro")).unwrap();
        std::fs::write(tree.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
        std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::os::unix::fs::chown(tree.join("run.sh"), Some(1001), Some(1001)).unwrap();
        std::fs::write(tree.join("sub/secret"), "s3cret").unwrap();
        std::fs::set_permissions(
            tree.join("sub/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("run.sh", tree.join("link")).unwrap();
        std::fs::set_permissions(tree.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();

        let cp_cmd = |src: &str, dst: &str| {
            let mut c = env.cli(admin);
            c.args(["agent", "cp", "--project", "e2e", src, dst]);
            c
        };
        let ex = |args: &[&str]| {
            let mut a = vec!["files", "--project", "e2e", "--"];
            a.extend_from_slice(args);
            exec_cmd(&env, admin, &a)
        };
        // Into an existing directory: lands inside it.
        let (code, _, err) = clawker(cp_cmd(tree.to_str().unwrap(), "files:/tmp"), None).await;
        assert_eq!(code, 0, "{err}");
        let (_, out, _) = clawker(
            ex(&[
                "stat",
                "-c",
                "%a %u:%g %n",
                "/tmp/tree/run.sh",
                "/tmp/tree/sub/secret",
                "/tmp/tree/ro",
            ]),
            None,
        )
        .await;
        assert_eq!(
            out,
            "750 1001:1001 /tmp/tree/run.sh\n600 0:0 /tmp/tree/sub/secret\n555 0:0 /tmp/tree/ro\n"
        );
        let (_, out, err) = clawker(
            ex(&["sh", "-c", "readlink /tmp/tree/link && /tmp/tree/link"]),
            None,
        )
        .await;
        assert_eq!(out, "run.sh\nran\n", "{err}");
        // A file onto a path that does not exist: renamed.
        let (code, _, err) = clawker(
            cp_cmd(
                tree.join("run.sh").to_str().unwrap(),
                "files:/tmp/renamed.sh",
            ),
            None,
        )
        .await;
        assert_eq!(code, 0, "{err}");
        let (_, out, _) = clawker(ex(&["/tmp/renamed.sh"]), None).await;
        assert_eq!(out, "ran\n");

        // And back out, onto a new name.
        let back = host.path().join("back");
        let (code, _, err) = clawker(cp_cmd("files:/tmp/tree", back.to_str().unwrap()), None).await;
        assert_eq!(code, 0, "{err}");
        let m = |p: &str| std::fs::symlink_metadata(back.join(p)).unwrap();
        assert_eq!(
            (m("run.sh").mode() & 0o7777, m("run.sh").uid()),
            (0o750, 1001)
        );
        assert_eq!(m("sub/secret").mode() & 0o7777, 0o600);
        assert_eq!(m("ro").mode() & 0o7777, 0o555);
        assert_eq!(
            std::fs::read_link(back.join("link")).unwrap().to_str(),
            Some("run.sh")
        );
        assert_eq!(
            std::fs::read_to_string(back.join("sub/secret")).unwrap(),
            "s3cret"
        );
        // A missing source is an error with the path in it.
        let (code, _, err) =
            clawker(cp_cmd("files:/nonexistent", back.to_str().unwrap()), None).await;
        assert_ne!(code, 0);
        assert!(err.contains("/nonexistent"), "{err}");
        cp::stop(cp1).await;
    });
}

/// Waits for a report line of the example containing `want`.
async fn wait_line(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    lines: &mut Vec<String>,
    want: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !lines.iter().any(|l| l.contains(want)) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(l)) => lines.push(l),
            _ => panic!("no line with {want:?}; got {lines:?}"),
        }
    }
}

#[test]
fn untrusted_agent_is_refused_unless_forced_and_the_quarantine_example_pauses_it_across_a_cp_restart()
 {
    let _g = serial();
    let admin = free_port();
    let env = DockerEnv::new("clawker-exec", 4, "10.224.4.0/24", admin);
    run_system(async {
        let Some(docker) = docker_or_fail().await else {
            return;
        };
        let cp1 = cp::start(&env.cfg).await.unwrap();
        let seen = record(&cp1.bus);
        let mut spec = env.spec("mallory", "e2e");
        spec.mint_for_container = Some("0000000000000000deadbeef".into());
        let id = cp::agent::run(&docker, &env.material(), &spec)
            .await
            .unwrap();
        wait_event(&seen, &id, "agent.untrusted", 1, 60).await;
        // The default policy isolates it at once: the session breaks and is
        // dialled again over the quarantine network, where the new session
        // finds it untrusted again. Operator commands go to that session.
        wait_event(&seen, &id, "agent.untrusted", 2, 60).await;

        // Refused, with the reason, and recorded.
        let ex = |args: &[&str]| {
            let mut a = vec!["mallory", "--project", "e2e"];
            a.extend_from_slice(args);
            exec_cmd(&env, admin, &a)
        };
        let (code, _, err) = clawker(ex(&["--", "true"]), None).await;
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("refused") && err.contains("untrusted"),
            "{err}"
        );
        let refused = wait_event(&seen, &id, "agent.exec.refused", 1, 10).await;
        assert!(
            refused[0]["reasons"][0]
                .as_str()
                .unwrap()
                .starts_with("untrusted:")
        );
        // Forced: it runs, and says so.
        let (code, out, err) = clawker(ex(&["--force", "--", "echo", "forced"]), None).await;
        assert_eq!((code, out.as_str()), (0, "forced\n"), "{err}");
        let forced = wait_event(&seen, &id, "agent.exec.forced", 1, 10).await;
        assert_eq!(forced[0]["operator"], cli_thumbprint(&env));
        let started = events_for(&seen, &id, "agent.exec.started");
        assert!(started.iter().any(|e| e["forced"] == true));

        // The example, as a separate policy program: it finds mallory
        // already untrusted when it connects, takes evidence through a
        // forced Exec, and pauses the container.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let opts = quarantine::Options {
            state_dir: env.state.path().to_owned(),
            admin_addr: admin,
            evidence: true,
        };
        let example = tokio::spawn(quarantine::run(opts, tx));
        let mut lines = Vec::new();
        wait_line(&mut rx, &mut lines, "mallory").await;
        wait_line(&mut rx, &mut lines, "paused").await;
        assert!(
            lines
                .iter()
                .any(|l| l.contains("processes:") && l.contains("clawkerd")),
            "{lines:?}"
        );
        let paused = |docker: bollard::Docker, id: String| async move {
            docker
                .inspect_container(
                    &id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .unwrap()
                .state
                .unwrap()
                .paused
                .unwrap()
        };
        assert!(paused(docker.clone(), id.clone()).await);
        assert!(
            wait_event(&seen, &id, "agent.exec.forced", 2, 10)
                .await
                .len()
                >= 2
        );

        // The CP restarts on the same address: the example reconnects and
        // acts on a live verdict.
        let _ = docker
            .remove_container(
                &id,
                Some(bollard::query_parameters::RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        cp::stop(cp1).await;
        wait_line(&mut rx, &mut lines, "reconnecting").await;
        let cp2 = cp::start(&env.cfg).await.unwrap();
        assert_eq!(cp2.admin_api_addr, admin);
        let seen2 = record(&cp2.bus);
        let connects =
            |lines: &Vec<String>| lines.iter().filter(|l| l.starts_with("connected")).count();
        let deadline = Instant::now() + Duration::from_secs(30);
        while connects(&lines) < 2 {
            assert!(Instant::now() < deadline, "no reconnect: {lines:?}");
            if let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                lines.push(l);
            }
        }
        let mut spec = env.spec("eve", "e2e");
        spec.mint_for_container = Some("0000000000000000cafef00d".into());
        let eve = cp::agent::run(&docker, &env.material(), &spec)
            .await
            .unwrap();
        wait_event(&seen2, &eve, "agent.untrusted", 1, 60).await;
        wait_line(&mut rx, &mut lines, "e2e/eve").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !paused(docker.clone(), eve.clone()).await {
            assert!(Instant::now() < deadline, "eve not paused: {lines:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        example.abort();
        cp::stop(cp2).await;
    });
}
