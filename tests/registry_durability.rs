//! A process that is SIGKILLed in the middle of a loop of Adds leaves a redb
//! file that opens and holds every Add that returned Ok.
//!
//! The test re-executes its own binary as the writer (selected by an env
//! var): the child prints each container id after `add` returned Ok and
//! flushes, the parent kills it at a random point and then checks the file.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use clawker::identity::Thumbprint;
use clawker::registry::RegistryStore;
use clawker::registry::store::NewEntry;

const WRITER_ENV: &str = "CLAWKER_TEST_REGISTRY_WRITER";

/// Child mode: add rows forever, announcing each committed one.
#[test]
fn writer_child() {
    let Ok(path) = std::env::var(WRITER_ENV) else {
        return; // normal test run: nothing to do in this entry point
    };
    let store = RegistryStore::open(std::path::Path::new(&path)).expect("open");
    let start = store.snapshot().expect("snapshot").len() as u64;
    let mut out = std::io::stdout().lock();
    for i in start.. {
        let id = format!("{i:x}");
        let mut tp = [0u8; 32];
        tp[..8].copy_from_slice(&(i + 1).to_be_bytes());
        store
            .add(NewEntry {
                agent_name: format!("a{i}"),
                project: "p".into(),
                container_id: id.clone(),
                thumbprint: Thumbprint(tp),
                registered_at_unix: 1_700_000_000,
                last_seen_unix: 0,
            })
            .expect("add");
        use std::io::Write;
        writeln!(out, "{id}").expect("stdout");
        out.flush().expect("flush");
    }
}

#[test]
fn sigkill_mid_add_loses_no_committed_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cp.redb");
    let exe = std::env::current_exe().unwrap();
    let mut committed: Vec<String> = Vec::new();
    for round in 0..20u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(WRITER_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Vary the kill point: after 1..=8 committed rows plus a short,
        // varying delay so the kill lands inside a commit some of the time.
        let want = 1 + (round % 8) as usize;
        let mut seen = 0;
        while seen < want {
            let line = lines.next().expect("child ended early").unwrap();
            if line.chars().all(|c| c.is_ascii_hexdigit()) && !line.is_empty() {
                committed.push(line);
                seen += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(round * 137 % 3000));
        child.kill().unwrap(); // SIGKILL
        // Rows announced after our last read were committed too; collect them.
        for line in lines.map_while(Result::ok) {
            if !line.is_empty() && line.chars().all(|c| c.is_ascii_hexdigit()) {
                committed.push(line);
            }
        }
        child.wait().unwrap();

        let store = RegistryStore::open(&path).expect("file opens after SIGKILL");
        for id in &committed {
            store
                .lookup_by_container_id(id)
                .unwrap_or_else(|e| panic!("round {round}: committed row {id} lost: {e}"));
        }
    }
    assert!(
        committed.len() >= 20,
        "every round commits at least one row"
    );
}
