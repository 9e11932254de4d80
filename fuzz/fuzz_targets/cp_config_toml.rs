//! `clawker cp serve --config FILE`: the TOML layer and its resolution.
//! The body lives in `clawker::fuzz_harness`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| clawker::fuzz_harness::cp_config_toml(data));
