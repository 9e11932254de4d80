//! Bounding the strings a peer sends us.
//!
//! Agents are untrusted, and so is every string that arrives from one: a
//! clawkerd's `RegisterDone.error` or `Error.message`, the stderr an init
//! step captured, the CN of a certificate it presented, the text of a
//! stream error, a token request's parameters echoed in a refusal. Each of
//! them ends up in an event (and so the worldview, the audit log, every
//! `WatchEvents` subscriber) or a log line. [`bound`] is the one place that
//! makes such a string safe to keep: at most [`MAX_PEER_TEXT`] bytes of it,
//! cut on a character boundary, with a marker saying how much was dropped.
//!
//! Call it where the string enters our code (the decode site), not where it
//! is printed: a value bounded once stays bounded wherever it travels.

/// Longest peer-supplied string we keep, in bytes (marker excluded).
pub const MAX_PEER_TEXT: usize = 4096;

/// `s`, or its first [`MAX_PEER_TEXT`] bytes (on a character boundary)
/// followed by `…[truncated N bytes]`. Takes ownership so the common case
/// (short text) neither copies nor allocates.
pub fn bound(s: impl Into<String>) -> String {
    bound_to(s.into(), MAX_PEER_TEXT)
}

fn bound_to(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = s.len() - cut;
    s.truncate(cut);
    s.push_str(&format!("…[truncated {dropped} bytes]"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_text_is_kept_verbatim() {
        assert_eq!(bound("token exchange failed"), "token exchange failed");
        assert_eq!(bound(String::new()), "");
        let exact = "x".repeat(MAX_PEER_TEXT);
        assert_eq!(bound(exact.clone()), exact);
    }

    #[test]
    fn long_text_is_cut_with_a_marker_naming_the_dropped_bytes() {
        let got = bound("a".repeat(MAX_PEER_TEXT + 10));
        assert!(got.starts_with(&"a".repeat(MAX_PEER_TEXT)));
        assert!(got.ends_with("…[truncated 10 bytes]"), "{got}");
        assert_eq!(got.len(), MAX_PEER_TEXT + "…[truncated 10 bytes]".len());
    }

    #[test]
    fn cuts_on_a_character_boundary() {
        // 'é' is two bytes; a cut at an odd offset must back off.
        let got = bound_to("éééé".into(), 3);
        assert_eq!(got, "é…[truncated 6 bytes]");
    }

    proptest! {
        #[test]
        fn never_longer_than_the_cap_plus_marker(s in ".{0,200}", max in 0usize..64) {
            let got = bound_to(s.clone(), max);
            if s.len() <= max {
                prop_assert_eq!(got, s);
            } else {
                let at = got.rfind("…[truncated ");
                prop_assert!(at.is_some());
                let kept = &got[..at.unwrap_or(0)];
                prop_assert!(kept.len() <= max);
                prop_assert!(s.starts_with(kept));
            }
        }
    }
}
