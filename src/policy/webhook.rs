//! Forwards selected bus events as JSON POSTs to a webhook (plain
//! `http://` only; put a TLS-terminating proxy in front for https).
//!
//! Each event is POSTed as the audit record
//! `{"name": …, "at": …, "event": {…}}`, one request per event, in bus
//! order. A failed POST is retried with a doubling delay up to
//! `max_attempts`, then dropped and logged: a slow or dead webhook must
//! never back up into the CP (the subscription is drop-oldest anyway).

use std::time::Duration;

use actix::fut::wrap_future;
use actix::prelude::*;
use bytes::Bytes;
use clawker_actors::{
    AuditSubscription, BusError, BusState, ChildLink, ChildSpec, EventBus, Restart,
};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use super::audit::AuditRecord;

/// Webhook settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host:port/path`.
    pub url: String,
    /// Event names to forward (exact, or a prefix ending in `*` such as
    /// `agent.*`); empty = every event.
    pub events: Vec<String>,
    pub timeout_ms: u64,
    pub max_attempts: u32,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            events: vec![
                "agent.untrusted".into(),
                "policy.containment.applied".into(),
            ],
            timeout_ms: 5000,
            max_attempts: 3,
        }
    }
}

impl WebhookConfig {
    /// Whether an event name is selected.
    pub fn selects(&self, name: &str) -> bool {
        self.events.is_empty()
            || self.events.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => p == name,
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("unsupported webhook url {0:?} (expected http://host:port/path)")]
    BadUrl(String),
    #[error("connect {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("webhook answered {0}")]
    Status(u16),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The forwarder could not subscribe (the bus is closed).
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// POSTs one JSON body; `Ok` on a 2xx answer.
pub async fn post_json(
    url: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<(), WebhookError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| WebhookError::BadUrl(url.to_owned()))?;
    if uri.scheme_str() != Some("http") {
        return Err(WebhookError::BadUrl(url.to_owned()));
    }
    let host = uri
        .host()
        .ok_or_else(|| WebhookError::BadUrl(url.to_owned()))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let authority = format!("{host}:{port}");
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let bytes = serde_json::to_vec(body).map_err(|e| WebhookError::Http(e.to_string()))?;
    let fut = async move {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| WebhookError::Connect(authority.clone(), e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| WebhookError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::post(path)
            .header(http::header::HOST, &authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "clawker-webhook/0.1")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| WebhookError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| WebhookError::Http(e.to_string()))?;
        let status = resp.status();
        // Read the body so the connection closes cleanly.
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status(status.as_u16()))
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| WebhookError::Timeout(timeout))?
}

/// POSTs one audit record (`{"name", "at", "event"}`), retrying with
/// backoff up to `cfg.max_attempts`; whether it was delivered.
pub async fn deliver(cfg: &WebhookConfig, record: &AuditRecord) -> bool {
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let Ok(body) = serde_json::to_value(record) else {
        return false;
    };
    let name = record.name.as_str();
    let mut backoff = RETRY.retry();
    for attempt in 1..=cfg.max_attempts.max(1) {
        match post_json(&cfg.url, &body, timeout).await {
            Ok(()) => return true,
            Err(err) if attempt < cfg.max_attempts.max(1) => {
                tracing::debug!(event = "webhook_retry", name, attempt, error = %err);
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(err) => {
                tracing::warn!(event = "webhook_dropped", name, attempts = attempt, error = %err, "event not delivered to webhook");
            }
        }
    }
    false
}

/// Reads `sub` until it ends, POSTing selected events. Returns how many
/// were delivered.
pub async fn forward(mut sub: AuditSubscription, cfg: WebhookConfig) -> u64 {
    let mut delivered = 0;
    while let Some(e) = sub.recv().await {
        if !cfg.selects(e.name()) {
            continue;
        }
        if deliver(&cfg, &AuditRecord::of(&*e)).await {
            delivered += 1;
        }
    }
    delivered
}

/// Delays between delivery attempts of one event.
const RETRY: clawker_actors::Backoff =
    clawker_actors::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// The forwarder as a supervised actor: subscribes on start, forwards
/// until the bus closes (then stops normally).
pub struct WebhookForwarder {
    sub: Option<AuditSubscription>,
    cfg: WebhookConfig,
}

impl WebhookForwarder {
    pub fn new<S: BusState>(bus: &EventBus<S>, cfg: WebhookConfig) -> Result<Self, WebhookError> {
        if !cfg.url.starts_with("http://") {
            return Err(WebhookError::BadUrl(cfg.url.clone()));
        }
        let sub = bus.subscribe_all()?;
        Ok(Self {
            sub: Some(sub),
            cfg,
        })
    }

    /// Child spec (permanent worker `webhook`).
    pub fn spec<S: BusState>(bus: EventBus<S>, cfg: WebhookConfig) -> ChildSpec {
        ChildSpec::worker("webhook", move |link: ChildLink| {
            let actor = WebhookForwarder::new(&bus, cfg.clone()).map_err(|e| e.to_string())?;
            Ok(WebhookForwarder::create(move |ctx| {
                link.attach(ctx);
                actor
            }))
        })
        .restart(Restart::Permanent)
    }
}

impl Actor for WebhookForwarder {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(sub) = self.sub.take() {
            let cfg = self.cfg.clone();
            ctx.spawn(wrap_future::<_, Self>(forward(sub, cfg)).map(
                |n, _, ctx: &mut Context<Self>| {
                    tracing::info!(event = "webhook_finished", delivered = n);
                    ctx.stop();
                },
            ));
        }
    }
}
