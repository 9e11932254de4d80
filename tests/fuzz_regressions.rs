//! Replays every committed fuzz input through the fuzz targets' bodies
//! (`clawker::fuzz_harness`): the seed corpus (`fuzz/seeds/<target>/`) and
//! every crash the fuzzer ever found (`fuzz/regressions/<target>/`, one file
//! per crash, named after what it broke). Coverage-guided runs are
//! `scripts/fuzz.sh TARGET SECONDS`; this keeps their findings fixed.

use std::path::Path;

use clawker::fuzz_harness::TARGETS;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn every_seed_and_regression_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for (name, body) in TARGETS {
        let seeds = inputs(&root.join("seeds").join(name));
        assert!(!seeds.is_empty(), "target {name} has no seed corpus");
        for (path, data) in seeds
            .iter()
            .chain(inputs(&root.join("regressions").join(name)).iter())
        {
            let r = std::panic::catch_unwind(|| body(data));
            assert!(r.is_ok(), "{name}: {path} panicked");
            ran += 1;
        }
    }
    assert!(ran >= TARGETS.len());
}

#[test]
fn every_fuzz_target_has_a_binary_in_the_fuzz_crate() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .unwrap();
    for (name, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] for {name}"
        );
    }
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn token_body_seeds_are_what_their_names_say() {
    use clawker::fuzz_harness::token_body::{VALID_JTIS, authenticate};
    let run = |name: &str| authenticate(&seed("token_body", name)).unwrap();
    let ok = run("valid_agent").unwrap();
    assert_eq!(
        (ok.client_id.as_str(), ok.jti.as_str()),
        ("clawker-agent", VALID_JTIS[0])
    );
    assert_eq!(ok.scope, "agent:self:register");
    let ok = run("valid_cli_scoped").unwrap();
    assert_eq!(
        (ok.jti.as_str(), ok.scope.as_str()),
        (VALID_JTIS[1], "admin")
    );
    assert_eq!(run("percent_encoded_valid").unwrap().jti, VALID_JTIS[0]);

    let refused = |name: &str, error: &str, says: &str| {
        let e = run(name).unwrap_err();
        assert_eq!(e.error, error, "{name}: {e:?}");
        assert!(e.description.contains(says), "{name}: {e:?}");
    };
    refused("expired", "invalid_client", "expired");
    refused("lifetime_48h", "invalid_client", "lifetime exceeds");
    refused("wrong_alg_hs256", "invalid_client", "client_assertion");
    refused("alg_none", "invalid_client", "client_assertion");
    refused("replayed_param", "invalid_request", "repeated");
    refused("valid_as_json", "invalid_request", "content type");
    refused("valid_no_content_type", "invalid_request", "content type");
    refused("percent_heavy_16k", "invalid_request", "too large");
    // 12 KiB of grant type echoed back: cut to the peer-text bound.
    refused("huge_grant_type", "unsupported_grant_type", "…[truncated");
}

#[test]
fn clawkerd_dispatch_seeds_are_the_generated_scenarios() {
    for (name, input) in clawker::fuzz_harness::clawkerd_dispatch::seed_inputs() {
        assert!(
            seed("clawkerd_dispatch", name) == input,
            "fuzz/seeds/clawkerd_dispatch/{name} differs from seed_inputs(); run `cargo run --example fuzz_seeds`"
        );
    }
}

#[test]
fn clawkerd_dispatch_seeds_reach_running_commands() {
    use clawker::proto::clawkerd::v1::response::Payload;
    let run = |name: &str| {
        clawker::fuzz_harness::clawkerd_dispatch::run(&seed("clawkerd_dispatch", name)).unwrap()
    };
    let said = |rs: &[clawker::proto::clawkerd::v1::Response], id: &str| -> Vec<String> {
        rs.iter()
            .filter(|r| r.command_id == id)
            .map(|r| match &r.payload {
                Some(Payload::Stdout(c)) => format!("stdout {}", String::from_utf8_lossy(&c.data)),
                Some(Payload::Done(d)) => format!("done {}", d.final_exit_code),
                Some(Payload::Error(e)) => format!("error {}", e.message),
                Some(p) => format!("{p:?}").split('(').next().unwrap().to_owned(),
                None => "none".into(),
            })
            .collect()
    };
    let rs = run("shell_stdin_flow");
    let c1 = said(&rs, "c1");
    assert!(c1.contains(&"Started".to_owned()), "{c1:?}");
    assert_eq!(
        c1.iter()
            .filter(|s| s.starts_with("stdout"))
            .map(|s| &s[7..])
            .collect::<String>(),
        "hello world\n",
        "{c1:?}"
    );
    assert_eq!(c1.last().unwrap(), "done 0", "{c1:?}");
    assert!(said(&rs, "h1").contains(&"HelloAck".to_owned()));

    assert_eq!(said(&rs, "e1").last().unwrap(), "done 0", "{rs:?}");

    let rs = run("pipeline_signals");
    let p1 = said(&rs, "p1");
    assert!(
        p1.contains(&"error signal: signo must be a positive integer".to_owned()),
        "{p1:?}"
    );

    let rs = run("lifecycle");
    assert!(
        said(&rs, "register")
            .iter()
            .any(|s| s.starts_with("RegisterDone"))
    );
    assert_eq!(said(&rs, "ready"), ["done 0", "done 0"]);
    assert!(said(&rs, "init").contains(&"done 0".to_owned()));
    assert_eq!(said(&rs, "logs").last().unwrap(), "done 0", "{rs:?}");

    let rs = run("copy");
    assert_eq!(said(&rs, "to").last().unwrap(), "done 0", "{rs:?}");
    let escape = said(&rs, "escape");
    assert!(escape.last().unwrap().starts_with("error"), "{escape:?}");

    let rs = run("renew");
    assert!(said(&rs, "rc1").contains(&"Csr".to_owned()), "{rs:?}");
    assert!(
        said(&rs, "rc1").last().unwrap().starts_with("error"),
        "{rs:?}"
    );
}
