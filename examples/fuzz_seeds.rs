//! Writes the seed corpora of the fuzz targets that build theirs in code:
//! `cargo run --example fuzz_seeds` → `fuzz/seeds/token_body/` (assertions
//! signed with the target's fixed key) and `fuzz/seeds/clawkerd_dispatch/`
//! (framed `Command` scenarios). A one-off: ECDSA signatures are
//! randomised, so a re-run changes the token seeds' bytes but not what each
//! one is; the dispatch seeds come out identical. `tests/fuzz_regressions.rs`
//! checks both.

use clawker::fuzz_harness::{clawkerd_dispatch, token_body};

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let sets = [
        ("token_body", token_body::seed_bodies()),
        ("clawkerd_dispatch", clawkerd_dispatch::seed_inputs()),
    ];
    for (target, seeds) in sets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, input) in seeds {
            std::fs::write(dir.join(name), input)?;
        }
        println!("wrote {}", dir.display());
    }
    Ok(())
}
