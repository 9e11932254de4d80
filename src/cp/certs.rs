//! The CP's own certificates over time: a `cp.cert.expiring` warning when
//! one of them (server, CP client, CLI client, or the CA itself) expires
//! within [`WARN_BEFORE`], checked at start and then daily. The fix is
//! `clawker ca renew` (the CA: a new `clawker ca init`, which re-mints every
//! agent) and a CP restart.

use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::events::{CpCertExpiring, Publish};
use crate::pki::{self, AuthPaths};

/// How early the warning starts.
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// How often the check runs after the first one.
pub const CHECK_EVERY: Duration = Duration::from_secs(86_400);

/// The certificates the CP depends on, by name and file.
fn watched(paths: &AuthPaths) -> [(&'static str, std::path::PathBuf); 4] {
    [
        ("server certificate", paths.server_cert()),
        ("CP client certificate", paths.cp_client_cert()),
        ("CLI client certificate", paths.cli_cert()),
        ("CA certificate", paths.ca_cert()),
    ]
}

/// Pure: the warnings due at `now` for certificates expiring at the given
/// times (within `warn_before`, or already expired).
pub fn expiring(
    now: OffsetDateTime,
    certs: &[(&str, String, OffsetDateTime)],
    warn_before: Duration,
) -> Vec<CpCertExpiring> {
    certs
        .iter()
        .filter(|(_, _, not_after)| *not_after - now <= warn_before)
        .map(|(cert, path, not_after)| CpCertExpiring {
            cert: (*cert).to_owned(),
            path: path.clone(),
            not_after: *not_after,
            days_left: (*not_after - now).whole_days(),
            at: now,
        })
        .collect()
}

/// Reads the watched certificates and publishes a warning for each one that
/// expires soon. An unreadable certificate is logged, not fatal (the CP
/// started with it, so it was readable then).
pub fn check<P: Publish>(paths: &AuthPaths, sink: &P, now: OffsetDateTime) -> usize {
    let mut certs = Vec::new();
    for (name, path) in watched(paths) {
        match pki::read_file(&path).and_then(|pem| pki::cert_not_after(name, &pem)) {
            Ok(not_after) => certs.push((name, path.display().to_string(), not_after)),
            Err(e) => {
                tracing::warn!(cert = name, error = %e, "cannot read a CP certificate's expiry")
            }
        }
    }
    let due = expiring(now, &certs, WARN_BEFORE);
    for w in &due {
        tracing::warn!(
            event = "cp_cert_expiring",
            cert = %w.cert,
            not_after = %w.not_after,
            days_left = w.days_left,
            "a CP certificate expires soon: run `clawker ca renew`, then restart the CP"
        );
    }
    let n = due.len();
    for w in due {
        sink.publish(w);
    }
    n
}

/// Checks now, then every [`CHECK_EVERY`], until `shutdown`.
pub async fn watch<P: Publish>(paths: AuthPaths, sink: P, shutdown: CancellationToken) {
    loop {
        check(&paths, &sink, OffsetDateTime::now_utc());
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::RecordingSink;

    fn t(days: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap() + time::Duration::days(days)
    }

    #[test]
    fn warns_within_thirty_days_and_after_expiry_only() {
        let certs = [
            ("server certificate", "s".to_owned(), t(31)),
            ("CP client certificate", "c".to_owned(), t(30)),
            ("CLI client certificate", "l".to_owned(), t(-2)),
            ("CA certificate", "a".to_owned(), t(1000)),
        ];
        let w = expiring(t(0), &certs, WARN_BEFORE);
        let got: Vec<(&str, i64)> = w.iter().map(|w| (w.cert.as_str(), w.days_left)).collect();
        assert_eq!(
            got,
            vec![
                ("CP client certificate", 30),
                ("CLI client certificate", -2)
            ]
        );
    }

    #[test]
    fn check_reads_the_state_dir_and_publishes() {
        let dir = tempfile::tempdir().unwrap();
        pki::AuthMaterial::ensure(dir.path()).unwrap();
        let paths = AuthPaths::new(dir.path());
        let sink = RecordingSink::default();
        // Fresh certificates: one year left, nothing to say.
        assert_eq!(check(&paths, &sink, OffsetDateTime::now_utc()), 0);
        // 340 days later every one-year certificate is due; the CA is not.
        let later = OffsetDateTime::now_utc() + time::Duration::days(340);
        assert_eq!(check(&paths, &sink, later), 3);
        let ev = sink.of("cp.cert.expiring");
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0]["cert"], "server certificate");
        assert!(ev[0]["days_left"].as_i64().unwrap() <= 30);
        assert!(ev[0]["path"].as_str().unwrap().ends_with("tls/server.pem"));
    }
}
