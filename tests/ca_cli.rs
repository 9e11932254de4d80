//! `clawker ca init` and `clawker ca mint-agent` as a user runs them.

use std::path::Path;
use std::process::Command;

fn clawker(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clawker"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("CLAWKER_STATE_DIR")
        .output()
        .expect("run clawker")
}

fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn ca_init_twice_changes_nothing_and_mint_agent_chains_to_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let first = clawker(&state, &["ca", "init"]);
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("created CA certificate"));
    let ca_before = std::fs::read(state.join("auth/ca/ca.pem")).unwrap();
    let key_before = std::fs::read(state.join("auth/cli/signing.key")).unwrap();

    let second = clawker(&state, &["ca", "init"]);
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("already present"));
    assert_eq!(
        ca_before,
        std::fs::read(state.join("auth/ca/ca.pem")).unwrap()
    );
    assert_eq!(
        key_before,
        std::fs::read(state.join("auth/cli/signing.key")).unwrap()
    );

    let out = dir.path().join("bundle");
    let mint = clawker(
        &state,
        &[
            "ca",
            "mint-agent",
            "--project",
            "web",
            "--agent",
            "dev",
            "--container-id",
            "0123abcd",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(mint.status.success(), "{mint:?}");
    for f in ["cert.pem", "key.pem", "ca.pem", "assertion.jwt"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The assertion verifies with the published CLI JWK and names the
    // default audience.
    let jwk: clawker::pki::Jwk = serde_json::from_str(
        &std::fs::read_to_string(state.join("auth/cli/signing-jwk.json")).unwrap(),
    )
    .unwrap();
    let jwt = std::fs::read_to_string(out.join("assertion.jwt")).unwrap();
    let (_, claims) =
        clawker::agent_api::assertion::verify_es256(&jwt, &jwk.public_point().unwrap()).unwrap();
    assert_eq!(claims.iss.as_deref(), Some("clawker-agent"));
    assert_eq!(
        claims.aud,
        Some(clawker::agent_api::assertion::Audience::One(
            clawker::defaults::token_audience(clawker::defaults::AGENT_PORT)
        ))
    );

    if !openssl_available() {
        eprintln!(
            "openssl not installed: chain check by openssl skipped (scripts/ensure-deps.sh installs it)"
        );
        return;
    }
    let ca = state.join("auth/ca/ca.pem");
    for (cert, purpose) in [
        (out.join("cert.pem"), "sslclient"),
        (out.join("cert.pem"), "sslserver"),
        (state.join("auth/tls/server.pem"), "sslserver"),
        (state.join("auth/cp/client.pem"), "sslclient"),
        (state.join("auth/cli/client.pem"), "sslclient"),
    ] {
        let v = Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(&ca)
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "openssl verify {} ({purpose}): {}{}",
            cert.display(),
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // The CP's client cert must not pass as a server cert (EKU is ClientAuth only).
    let v = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(&ca)
        .arg(state.join("auth/cp/client.pem"))
        .output()
        .unwrap();
    assert!(!v.status.success());
}

#[test]
fn mint_agent_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("bundle");
    // No CA yet.
    let o = clawker(
        &state,
        &[
            "ca",
            "mint-agent",
            "--agent",
            "dev",
            "--container-id",
            "ab",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("clawker ca init"),
        "{o:?}"
    );
    assert!(clawker(&state, &["ca", "init"]).status.success());
    for (args, needle) in [
        (vec!["--agent", "a.b", "--container-id", "ab"], "must match"),
        (
            vec!["--agent", "dev", "--container-id", "XYZ"],
            "lowercase letters and digits",
        ),
        (
            vec![
                "--agent",
                "dev",
                "--project",
                "clawker.x",
                "--container-id",
                "ab",
            ],
            "canonical",
        ),
    ] {
        let mut full = vec!["ca", "mint-agent", "--out", out.to_str().unwrap()];
        full.extend(args);
        let o = clawker(&state, &full);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // A corrupted CA key is a clear error, not a panic.
    std::fs::write(state.join("auth/ca/ca.key"), "garbage").unwrap();
    let o = clawker(
        &state,
        &[
            "ca",
            "mint-agent",
            "--agent",
            "dev",
            "--container-id",
            "ab",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no PEM block"),
        "{o:?}"
    );
}
