//! PEM loading of certs/keys read from the state dir and bootstrap files.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clawker::tls::load_certs("fuzz", data);
    let _ = clawker::tls::load_key("fuzz", data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = clawker::pki::single_pem_block("fuzz", text, "CERTIFICATE");
        let _ = clawker::pki::load_p256_key("fuzz", text);
    }
});
