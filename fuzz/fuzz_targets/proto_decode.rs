//! Every wire message clawkerd/CP decode from a peer: arbitrary bytes must be
//! a decode error or a message that survives an encode/decode round trip.
#![no_main]
use clawker::proto::{agent::v1 as agent, clawkerd::v1 as clawkerd};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::decode(data) {
        let bytes = m.encode_to_vec();
        assert_eq!(bytes.len(), m.encoded_len());
        let again = M::decode(bytes.as_slice()).expect("re-decode of our own encoding");
        assert_eq!(m, again);
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte picks the message so one corpus covers all of them.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => roundtrip::<clawkerd::Command>(rest),
        1 => roundtrip::<clawkerd::Response>(rest),
        _ => roundtrip::<agent::RegisterRequest>(rest),
    }
});
