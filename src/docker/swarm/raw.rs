//! A raw `GET` on the Engine API, for the one thing bollard's models drop:
//! a task's `NetworksAttachments` (its overlay addresses). bollard's `Task`
//! is generated from a swagger that lacks the field, so serde discards it;
//! we read `/tasks` ourselves and parse it into [`super::task::RawTask`].
//!
//! Same endpoint as bollard (`DOCKER_HOST`, unix socket or plain TCP), same
//! negotiated API version; every request is bounded in time and size.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// Where the engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`, plain HTTP.
    Tcp(String),
}

impl Endpoint {
    /// Parses a `DOCKER_HOST` value (`None`/empty: the default socket).
    pub fn parse(host: Option<&str>) -> Result<Self, RawError> {
        let host = host.map(str::trim).filter(|h| !h.is_empty());
        let Some(host) = host else {
            return Ok(Self::Unix("/var/run/docker.sock".into()));
        };
        if let Some(path) = host.strip_prefix("unix://") {
            return Ok(Self::Unix(path.into()));
        }
        if let Some(addr) = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("http://"))
        {
            return Ok(Self::Tcp(addr.trim_end_matches('/').to_owned()));
        }
        Err(RawError::Unsupported(host.to_owned()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error(
        "DOCKER_HOST={0:?}: Swarm mode reads tasks over unix:// or plain tcp:// only (TLS and ssh endpoints are not supported)"
    )]
    Unsupported(String),
    #[error("engine API {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("engine API {path}: {message}")]
    Http { path: String, message: String },
    #[error("engine API {path}: status {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("engine API {path}: no answer within {after:?}")]
    Timeout { path: String, after: Duration },
}

impl RawError {
    /// The engine answered 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RawError::Status { status: 404, .. })
    }
}

/// A raw client for one endpoint and API version.
#[derive(Debug, Clone)]
pub struct RawApi {
    endpoint: Endpoint,
    /// `1.41` (what bollard negotiated).
    version: String,
    timeout: Duration,
    max_body: usize,
}

impl RawApi {
    pub fn new(endpoint: Endpoint, version: &str) -> Self {
        Self {
            endpoint,
            version: version.to_owned(),
            timeout: Duration::from_secs(10),
            // A task list is a few KiB per task: room for thousands.
            max_body: 32 << 20,
        }
    }

    /// `GET /v<version><path_and_query>`; the body of a 2xx answer.
    pub async fn get(&self, path_and_query: &str) -> Result<Bytes, RawError> {
        let path = format!("/v{}{}", self.version, path_and_query);
        match tokio::time::timeout(self.timeout, self.get_inner(&path)).await {
            Ok(r) => r,
            Err(_) => Err(RawError::Timeout {
                path,
                after: self.timeout,
            }),
        }
    }

    async fn get_inner(&self, path: &str) -> Result<Bytes, RawError> {
        let io_err = |source| RawError::Io {
            path: path.to_owned(),
            source,
        };
        let http_err = |e: &dyn std::fmt::Display| RawError::Http {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| http_err(&e))?;
        let resp = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(io_err)?;
                send(TokioIo::new(s), req).await
            }
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await.map_err(io_err)?;
                send(TokioIo::new(s), req).await
            }
        }
        .map_err(|e| http_err(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| http_err(&e))?
            .to_bytes();
        if !status.is_success() {
            return Err(RawError::Status {
                path: path.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            });
        }
        Ok(body)
    }
}

async fn send<T>(
    io: TokioIo<T>,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    // The connection task ends when the response body is read and the
    // sender dropped.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "engine API connection ended with an error");
        }
    });
    sender.send_request(req).await
}

/// `?filters=<json>` for a task or service listing.
pub fn filters_query(filters: &[(&str, &[&str])]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = filters
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
        .collect();
    let json = serde_json::Value::Object(map).to_string();
    format!(
        "?{}",
        serde_urlencoded::to_string([("filters", json)]).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_from_docker_host() {
        assert_eq!(
            Endpoint::parse(None).unwrap(),
            Endpoint::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            Endpoint::parse(Some("")).unwrap(),
            Endpoint::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            Endpoint::parse(Some("unix:///run/x.sock")).unwrap(),
            Endpoint::Unix("/run/x.sock".into())
        );
        assert_eq!(
            Endpoint::parse(Some("tcp://10.0.0.1:2375")).unwrap(),
            Endpoint::Tcp("10.0.0.1:2375".into())
        );
        let e = Endpoint::parse(Some("ssh://me@host")).unwrap_err();
        assert!(e.to_string().contains("unix://"), "{e}");
    }

    #[test]
    fn filters_are_url_encoded_json() {
        let q = filters_query(&[("service", &["abc"]), ("desired-state", &["running"])]);
        let json = q.strip_prefix("?filters=").unwrap();
        let decoded: String = serde_urlencoded::from_str::<Vec<(String, String)>>(&q[1..])
            .unwrap()
            .remove(0)
            .1;
        assert!(!json.contains('{'), "encoded: {json}");
        let v: serde_json::Value = serde_json::from_str(&decoded).unwrap();
        assert_eq!(v["service"][0], "abc");
        assert_eq!(v["desired-state"][0], "running");
    }
}
