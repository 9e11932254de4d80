//! A `WatchEvents` subscription that outlives the CP process: the
//! building block of policy programs that run *outside* the CP
//! (`examples/quarantine_untrusted.rs`, `examples/webhook_forwarder.rs`).
//!
//! [`EventWatch::next`] yields, in order: `Connected` (a fresh client:
//! the bus keeps no history, so this is the moment to look at the current
//! worldview), then the live events, then `Disconnected` when the stream
//! ends (CP restart, network) — after which the next call reconnects with
//! jittered exponential backoff ([`clawker_actors::Backoff`]), for ever.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clawker_actors::{Backoff, Retry};
use tonic::Streaming;

use super::client::{AdminClient, ClientError};
use crate::proto::admin::v1 as pb;

/// Reconnect delays: 100 ms doubling to 5 s, full jitter.
pub const RECONNECT: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).full_jitter();

/// One step of an [`EventWatch`].
#[derive(Debug)]
pub enum WatchItem {
    /// (Re)connected and subscribed; the client can be used for calls.
    Connected(Box<AdminClient>),
    Event(pb::Event),
    /// The stream ended; the next call reconnects.
    Disconnected(String),
}

/// See the module doc.
pub struct EventWatch {
    state_dir: PathBuf,
    addr: SocketAddr,
    prefixes: Vec<String>,
    retry: Retry,
    stream: Option<Streaming<pb::Event>>,
    /// Whether the previous attempt failed (sleep before the next).
    failing: bool,
}

impl EventWatch {
    /// Events whose names start with one of `prefixes` (all when empty),
    /// from the CP at `addr`, with the CLI credentials in `state_dir`.
    pub fn new(state_dir: PathBuf, addr: SocketAddr, prefixes: Vec<String>) -> Self {
        Self {
            state_dir,
            addr,
            prefixes,
            retry: RECONNECT.retry(),
            stream: None,
            failing: false,
        }
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.retry = backoff.retry();
        self
    }

    async fn connect(&mut self) -> Result<(AdminClient, Streaming<pb::Event>), ClientError> {
        let client = AdminClient::connect(&self.state_dir, self.addr).await?;
        let stream = client.watch_events(self.prefixes.clone()).await?;
        Ok((client, stream))
    }

    /// The next item (see the module doc). Credentials that cannot be
    /// loaded are the only error: retrying cannot fix them.
    pub async fn next(&mut self) -> Result<WatchItem, ClientError> {
        loop {
            if let Some(stream) = self.stream.as_mut() {
                return Ok(match stream.message().await {
                    Ok(Some(ev)) => WatchItem::Event(ev),
                    Ok(None) => {
                        self.stream = None;
                        self.failing = true;
                        WatchItem::Disconnected("the control plane ended the stream".into())
                    }
                    Err(status) => {
                        self.stream = None;
                        self.failing = true;
                        WatchItem::Disconnected(format!(
                            "{} ({:?})",
                            status.message(),
                            status.code()
                        ))
                    }
                });
            }
            if self.failing {
                tokio::time::sleep(self.retry.next_delay()).await;
            }
            match self.connect().await {
                Ok((client, stream)) => {
                    self.retry.reset();
                    self.failing = false;
                    self.stream = Some(stream);
                    return Ok(WatchItem::Connected(Box::new(client)));
                }
                Err(e @ ClientError::Credentials(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, attempt = self.retry.attempts() + 1, "control plane unreachable; retrying");
                    self.failing = true;
                }
            }
        }
    }
}
