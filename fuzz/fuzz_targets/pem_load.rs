//! PEM loading of certificates and keys.
//! The body lives in `clawker::fuzz_harness`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| clawker::fuzz_harness::pem_load(data));
