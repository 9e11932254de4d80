//! The DER leaf a TLS peer presents: identity extraction and the pin check.
//! The body lives in `clawker::fuzz_harness`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| clawker::fuzz_harness::peer_leaf(data));
