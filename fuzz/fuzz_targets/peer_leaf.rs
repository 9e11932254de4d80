//! The DER leaf a TLS peer presents: identity extraction and the pin check.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = clawker::agent_api::peer::PeerLeaf::parse(data);
    let _ = clawker::tls::cert_cn(data);
    let _ = clawker::tls::check_pinned_leaf(data, "clawker-controlplane");
});
