//! The CP's session mux fed an arbitrary Response sequence.
//! The body lives in `clawker::fuzz_harness`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| clawker::fuzz_harness::session_mux(data));
