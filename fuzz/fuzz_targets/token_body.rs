//! The token endpoint's authentication step fed an arbitrary request body
//! under one of a few content types. The body lives in
//! `clawker::fuzz_harness::token_body`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| clawker::fuzz_harness::token_body::token_body(data));
