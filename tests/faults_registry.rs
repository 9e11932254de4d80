//! Fault: the registry's filesystem fills up (issue 15 §1). The state dir
//! is a small tmpfs mounted by the test (root is required, as for the
//! other fault tests): Register's write fails with a clear, retryable
//! error, lookups keep answering, nothing committed is lost or corrupted,
//! and writes work again — without a CP restart — once space returns.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use clawker::identity::Thumbprint;
use clawker::registry::store::NewEntry;
use clawker::registry::{Registry, RegistryError, RegistryStore};

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("mount(8)");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

/// Writes zeros to `path` until the filesystem refuses (ENOSPC).
fn fill(path: &Path) -> PathBuf {
    let filler = path.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    // Small writes too, until not even a page is left.
    while f.write_all(&[0u8; 512]).is_ok() {}
    let _ = f.sync_all();
    filler
}

fn entry(i: u64) -> NewEntry {
    let mut tp = [0u8; 32];
    tp[..8].copy_from_slice(&(i + 1).to_be_bytes());
    tp[31] = 0xaa;
    NewEntry {
        agent_name: format!("a{i}"),
        project: "p".into(),
        container_id: format!("{:064x}", i + 1),
        thumbprint: Thumbprint(tp),
        registered_at_unix: 1_700_000_000,
        last_seen_unix: 0,
    }
}

#[test]
fn full_registry_filesystem_refuses_writes_retryably_keeps_lookups_and_recovers() {
    let fs = Tmpfs::mount("2m");
    let db = fs.path().join("registry.redb");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let registry = Registry::start(RegistryStore::open(&db).unwrap()).unwrap();
        for i in 0..5 {
            registry.add(entry(i)).await.unwrap();
        }

        let filler = fill(fs.path());
        // Several writes while full: each fails with a storage error the
        // caller can tell apart from a verdict (retryable), none corrupts.
        let mut refused = 0;
        for i in 5..40 {
            match registry.add(entry(i)).await {
                Ok(_) => {} // a page freed by an earlier commit may still fit one
                Err(e) => {
                    assert!(e.is_retryable(), "a full disk is retryable: {e}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 0, "the full filesystem refused no write");
        // Lookups keep answering from the published index.
        for i in 0..5 {
            let e = entry(i);
            let row = registry.lookup_by_container_id(&e.container_id).unwrap();
            assert_eq!(row.agent_name, e.agent_name);
        }
        let rows_while_full: Vec<String> = registry
            .snapshot()
            .into_iter()
            .map(|r| r.container_id)
            .collect();

        // Space returns: the next write succeeds, no restart.
        std::fs::remove_file(&filler).unwrap();
        let after = entry(100);
        registry
            .add(after.clone())
            .await
            .expect("Register works again once space returns");
        assert!(registry.lookup_by_container_id(&after.container_id).is_ok());
        registry.shutdown().await;

        // Nothing corrupted: the file reopens with every row that was
        // acknowledged, and only those.
        let store = RegistryStore::open(&db).expect("the file reopens");
        let mut on_disk: Vec<String> = store
            .snapshot()
            .unwrap()
            .into_iter()
            .map(|r| r.container_id)
            .collect();
        on_disk.sort();
        let mut want = rows_while_full;
        want.push(after.container_id);
        want.sort();
        assert_eq!(on_disk, want);
    });
}

#[test]
fn storage_errors_are_retryable_and_verdicts_are_not() {
    assert!(RegistryError::Unavailable("x".into()).is_retryable());
    assert!(!RegistryError::UnknownAgent.is_retryable());
    assert!(!RegistryError::DuplicateContainer("c".into()).is_retryable());
}

/// The same fault through the agent API, as clawkerd meets it: the token
/// endpoint answers 503 `temporarily_unavailable` (the assertion is not
/// spent), Register answers UNAVAILABLE; both work again once space
/// returns, and the agent registered before the fault still matches.
#[tokio::test]
async fn full_disk_makes_token_and_register_unavailable_then_both_recover() {
    let fs = Tmpfs::mount("2m");
    let mut h = common::agent_api::Harness::start().await;
    h.db_path = fs.path().join("cp.redb");
    h.restart().await;

    let c1 = format!("{:064x}", 1);
    let leaf1 = h.agent("p", "one", &c1);
    let token = h.agent_token().await;
    h.register(Some(&leaf1), Some(&token), "p", "one")
        .await
        .unwrap();

    let filler = fill(fs.path());
    // Token endpoint: retryable, and the assertion is not burnt.
    let assertion = h.agent_assertion();
    let mut status = 0;
    for _ in 0..20 {
        let (s, body) = h.exchange(&assertion, Some("agent:self:register")).await;
        status = s;
        if s == 503 {
            assert_eq!(body["error"], "temporarily_unavailable", "{body}");
            break;
        }
        assert_eq!(s, 200, "{body}"); // a freed page may still take one
    }
    assert_eq!(status, 503, "a full disk never reached the token endpoint");
    // Register: UNAVAILABLE (retryable), with a token minted before.
    let c2 = format!("{:064x}", 2);
    let leaf2 = h.agent("p", "two", &c2);
    let err = h
        .register(Some(&leaf2), Some(&token), "p", "two")
        .await
        .expect_err("no space: Register cannot persist");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // Lookups keep answering.
    assert!(h.registry.lookup_by_container_id(&c1).is_ok());

    std::fs::remove_file(&filler).unwrap();
    let (s, body) = h.exchange(&assertion, Some("agent:self:register")).await;
    assert_eq!(
        s, 200,
        "the same assertion works once space returns: {body}"
    );
    h.register(Some(&leaf2), Some(&token), "p", "two")
        .await
        .expect("Register works again once space returns");
    assert!(h.registry.lookup_by_container_id(&c2).is_ok());
    h.stop().await;
}
