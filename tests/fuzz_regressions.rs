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
