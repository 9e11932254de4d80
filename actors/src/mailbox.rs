//! Bounded, drop-oldest subscriber mailbox.
//!
//! Each subscriber owns one [`Mailbox`]. The bus actor pushes into it and the
//! subscriber pops from it through a [`MailboxReceiver`] (an async `Stream`).
//!
//! Why drop-oldest: the bus must never wait for a subscriber. A stalled
//! subscriber therefore loses its *oldest* pending events (which are the
//! least relevant for state-tracking consumers) instead of slowing the
//! publisher or the other subscribers. Every eviction is counted.
//!
//! Why a `Mutex<VecDeque>` and not a lock-free queue: the critical sections
//! are a handful of instructions, the lock is almost never contended (one
//! producer, one consumer, and the consumer takes the *whole* buffer in one
//! `swap`, see [`MailboxReceiver::poll_recv`]), and it keeps the crate free of
//! `unsafe` and extra dependencies.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Lock a mutex, ignoring poisoning: every critical section in this crate
/// leaves the protected data consistent, so a panic elsewhere while holding
/// the lock cannot have corrupted it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Inner<T> {
    buf: VecDeque<T>,
    waker: Option<Waker>,
    closed: bool,
}

/// Producer side of a bounded drop-oldest mailbox (shared with the receiver).
pub(crate) struct Mailbox<T> {
    inner: Mutex<Inner<T>>,
    capacity: usize,
    dropped: AtomicU64,
}

/// Result of [`Mailbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Stored without eviction.
    Stored,
    /// Stored, the oldest pending item was evicted to make room.
    StoredEvicting,
    /// The mailbox is closed; the item was discarded.
    Closed,
}

impl<T> Mailbox<T> {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Self {
            inner: Mutex::new(Inner {
                buf: VecDeque::with_capacity(capacity.min(1024)),
                waker: None,
                closed: false,
            }),
            capacity,
            dropped: AtomicU64::new(0),
        })
    }

    /// Push an item, evicting the oldest one when full. Never blocks beyond
    /// the (uncontended) lock.
    pub(crate) fn push(&self, item: T) -> Push {
        let (waker, res) = {
            let mut g = lock(&self.inner);
            if g.closed {
                return Push::Closed;
            }
            let mut res = Push::Stored;
            if g.buf.len() >= self.capacity {
                g.buf.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
                res = Push::StoredEvicting;
            }
            g.buf.push_back(item);
            // Only the first push after the consumer parked pays for a wake-up:
            // the waker is taken, later pushes see `None`.
            (g.waker.take(), res)
        };
        if let Some(w) = waker {
            w.wake();
        }
        res
    }

    /// Close the mailbox: pending items can still be drained, then the
    /// receiver sees end-of-stream. Idempotent.
    pub(crate) fn close(&self) {
        let waker = {
            let mut g = lock(&self.inner);
            g.closed = true;
            g.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.inner).closed
    }

    /// Number of events evicted because the subscriber was too slow.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Number of events waiting in the mailbox.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.inner).buf.len()
    }
}

/// Consumer side of a [`Mailbox`].
pub(crate) struct MailboxReceiver<T> {
    shared: Arc<Mailbox<T>>,
    /// Items already taken from the shared buffer in one batch. Why: the
    /// consumer swaps the whole shared buffer out in O(1) under the lock and
    /// then pops locally without touching the lock again, so the bus and the
    /// consumer contend at most once per batch instead of once per event.
    local: VecDeque<T>,
}

impl<T> MailboxReceiver<T> {
    pub(crate) fn new(shared: Arc<Mailbox<T>>) -> Self {
        Self {
            shared,
            local: VecDeque::new(),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Mailbox<T>> {
        &self.shared
    }

    /// Take the next item without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        if let Some(x) = self.local.pop_front() {
            return Some(x);
        }
        let mut g = lock(&self.shared.inner);
        if g.buf.is_empty() {
            return None;
        }
        std::mem::swap(&mut g.buf, &mut self.local);
        drop(g);
        self.local.pop_front()
    }

    /// Poll for the next item; `Ready(None)` once closed and drained.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(x) = self.local.pop_front() {
            return Poll::Ready(Some(x));
        }
        let mut g = lock(&self.shared.inner);
        if !g.buf.is_empty() {
            std::mem::swap(&mut g.buf, &mut self.local);
            drop(g);
            return Poll::Ready(self.local.pop_front());
        }
        if g.closed {
            return Poll::Ready(None);
        }
        match &g.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => g.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> futures_core::Stream for MailboxReceiver<T>
where
    T: Unpin,
{
    type Item = T;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.get_mut().poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_mailbox_drops_oldest_and_counts() {
        let mb = Mailbox::new(2);
        let mut rx = MailboxReceiver::new(mb.clone());
        assert_eq!(mb.push(1), Push::Stored);
        assert_eq!(mb.push(2), Push::Stored);
        assert_eq!(mb.push(3), Push::StoredEvicting);
        assert_eq!(mb.dropped(), 1);
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn closed_mailbox_rejects_pushes_but_drains_pending() {
        let mb = Mailbox::new(4);
        let mut rx = MailboxReceiver::new(mb.clone());
        mb.push(1);
        mb.close();
        assert_eq!(mb.push(2), Push::Closed);
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.try_recv(), None);
        assert!(mb.is_closed());
    }
}
