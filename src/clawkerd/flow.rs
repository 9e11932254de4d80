//! Per-command flow control (ours; `FlowGrant` / `StdinConsumed` on the
//! wire).
//!
//! Every command shares one Session stream, so HTTP/2's per-stream window
//! cannot slow one command down without stalling all of them. An operator
//! `exec` whose reader is slow (a paused `clawker agent logs -f`, a slow
//! terminal) would otherwise make the CP buffer without bound. So a
//! command may opt in, by a `FlowGrant` sent *before* it: its output is
//! then read from the child only while it has credit ([`Credit`]), and the
//! CP tops the credit up as its own reader takes the data; in the other
//! direction clawkerd reports the stdin bytes the child consumed
//! ([`StdinAcks`]) so the CP never has more than its window unwritten
//! here. A command without a preceding grant behaves as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use super::session::Outbound;
use crate::proto::clawkerd::v1::{self as pb, Response, response::Payload};

/// Output credit of one command: bytes it may still send.
#[derive(Debug, Default)]
pub struct Credit {
    avail: AtomicU64,
    changed: Notify,
}

impl Credit {
    pub fn new(initial: u64) -> Arc<Self> {
        Arc::new(Self {
            avail: AtomicU64::new(initial),
            changed: Notify::new(),
        })
    }

    /// Adds credit (a `FlowGrant`) and wakes every waiting reader.
    pub fn grant(&self, bytes: u64) {
        self.avail.fetch_add(bytes, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Takes up to `max` bytes of credit, waiting while there is none.
    /// Several readers (stdout and each stderr) may wait at once.
    pub async fn take(&self, max: usize) -> usize {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let cur = self.avail.load(Ordering::Acquire);
            if cur > 0 {
                let n = cur.min(max as u64);
                if self
                    .avail
                    .compare_exchange(cur, cur - n, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return n as usize;
                }
                continue;
            }
            notified.await;
        }
    }

    /// Returns credit taken but not used (a read shorter than asked for).
    pub fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.grant(bytes as u64);
        }
    }

    pub fn available(&self) -> u64 {
        self.avail.load(Ordering::Acquire)
    }
}

/// Reports stdin the child consumed, coalesced: one `StdinConsumed` per
/// [`ACK_EVERY`] bytes, or when the queue ran dry (so the CP's window
/// reopens even for small interactive writes).
pub struct StdinAcks {
    id: String,
    out: Outbound,
    pending: u64,
}

/// Coalescing threshold for `StdinConsumed`.
pub const ACK_EVERY: u64 = 256 * 1024;

impl StdinAcks {
    pub fn new(id: &str, out: Outbound) -> Self {
        Self {
            id: id.to_owned(),
            out,
            pending: 0,
        }
    }

    /// Records `n` bytes written to the child; sends when due (`idle`: the
    /// queue is empty now).
    pub async fn consumed(&mut self, n: usize, idle: bool) {
        self.pending += n as u64;
        if self.pending >= ACK_EVERY || (idle && self.pending > 0) {
            let bytes = std::mem::take(&mut self.pending);
            let _ = self.out.send(Ok(consumed(&self.id, bytes))).await;
        }
    }
}

impl StdinAcks {
    /// Sends whatever is still unreported (stdin closed: nothing follows
    /// that would trigger it).
    pub async fn flush(&mut self) {
        if self.pending > 0 {
            let bytes = std::mem::take(&mut self.pending);
            let _ = self.out.send(Ok(consumed(&self.id, bytes))).await;
        }
    }
}

/// A `StdinConsumed` response (`bytes` = 0 accepts a `FlowGrant`).
pub fn consumed(id: &str, bytes: u64) -> Response {
    Response {
        command_id: id.to_owned(),
        payload: Some(Payload::StdinConsumed(pb::StdinConsumed { bytes })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn take_waits_for_a_grant_and_never_exceeds_it() {
        let c = Credit::new(10);
        assert_eq!(c.take(4).await, 4);
        assert_eq!(c.take(100).await, 6);
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.take(100).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no credit, no read");
        c.grant(7);
        assert_eq!(waiter.await.unwrap(), 7);
        c.give_back(3);
        assert_eq!(c.available(), 3);
    }
}
