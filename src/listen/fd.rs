//! The CP's file-descriptor budget.
//!
//! Every connection, session, Docker call and open file takes one
//! descriptor, and when the table is full everything fails at once: the
//! issue that introduced this module saw `clawker status` time out, Docker
//! inspects fail and an agent's dial give up while a flood held 20,000/20,000
//! descriptors. Two measures:
//!
//! 1. [`raise_nofile`]: at start the CP raises its soft `RLIMIT_NOFILE` to
//!    the hard limit (the soft default is often 1,024) and logs both.
//! 2. [`fit_caps`]: the listeners that take connections from untrusted
//!    peers may together hold at most [`LISTENER_SHARE`] of the table; if the
//!    configured caps do not fit, they are scaled down (and the CP says so).
//!    The rest stays for what the CP itself opens — one descriptor per agent
//!    session, the Docker socket, redb, logs — so a listener at its cap can
//!    never starve them.

/// The soft and hard `RLIMIT_NOFILE`, before and after raising.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Why the limit could not be read or raised.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("getrlimit(RLIMIT_NOFILE): {0}")]
    Get(std::io::Error),
    #[error("setrlimit(RLIMIT_NOFILE, {soft}): {source}")]
    Set { soft: u64, source: std::io::Error },
}

/// The current limits (no change).
pub fn nofile() -> Result<NofileLimits, FdError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(FdError::Get(std::io::Error::last_os_error()));
    }
    Ok(NofileLimits {
        soft_before: lim.rlim_cur,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Raises the soft limit to the hard limit and logs both.
pub fn raise_nofile() -> Result<NofileLimits, FdError> {
    let mut l = nofile()?;
    if l.soft < l.hard {
        let lim = libc::rlimit {
            rlim_cur: l.hard,
            rlim_max: l.hard,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(FdError::Set {
                soft: l.hard,
                source: std::io::Error::last_os_error(),
            });
        }
        l.soft = l.hard;
    }
    tracing::info!(
        event = "nofile_limit",
        soft_before = l.soft_before,
        soft = l.soft,
        hard = l.hard,
        "file-descriptor limit"
    );
    Ok(l)
}

/// The share of the descriptor table that listeners of untrusted peers
/// may hold together (numerator / denominator).
pub const LISTENER_SHARE: (u64, u64) = (1, 4);

/// `caps` (one listener's max connections each), scaled down
/// proportionally so their sum fits [`LISTENER_SHARE`] of `soft_limit`;
/// unchanged when they fit. Each stays at least 1.
pub fn fit_caps(caps: &[usize], soft_limit: u64) -> Vec<usize> {
    let budget = (soft_limit.saturating_mul(LISTENER_SHARE.0) / LISTENER_SHARE.1).max(1);
    let sum: u64 = caps.iter().map(|&c| c as u64).sum();
    if sum <= budget {
        return caps.to_vec();
    }
    caps.iter()
        .map(|&c| ((c as u64).saturating_mul(budget) / sum).max(1) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_that_fit_are_unchanged() {
        assert_eq!(fit_caps(&[1024, 128], 20_000), vec![1024, 128]);
        assert_eq!(fit_caps(&[1024, 128], 1 << 20), vec![1024, 128]);
    }

    #[test]
    fn caps_that_do_not_fit_shrink_to_a_quarter_of_the_table() {
        let got = fit_caps(&[1024, 128], 1024);
        assert!(got.iter().sum::<usize>() <= 256, "{got:?}");
        assert!(got[0] > got[1] && got[1] >= 1, "{got:?}");
        assert_eq!(fit_caps(&[1024, 128], 0), vec![1, 1]);
    }

    #[test]
    fn the_limit_is_readable_and_raising_it_never_lowers_it() {
        let before = nofile().unwrap();
        let after = raise_nofile().unwrap();
        assert!(after.soft >= before.soft);
        assert_eq!(after.soft, after.hard);
    }
}
