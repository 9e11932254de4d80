//! The CLI's side of the admin API: dial the CP with the CLI client
//! certificate (`<state>/auth/cli/client.pem|key`) and verify the CP's
//! server certificate the standard way (WebPKI, against our CA, for the
//! server name `clawker-controlplane`, one of the server cert's SANs).
//!
//! The connection is made eagerly in [`AdminClient::connect`] so "the CP is
//! not running" surfaces there, as [`ClientError::Unreachable`], with a
//! message that says what to do.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::pki::{self, AuthPaths};
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::admin_service_client::AdminServiceClient;
use crate::tls;

/// How long to wait for TCP connect plus the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to the admin API, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("loading CLI credentials: {0} (run `clawker ca init`)")]
    Credentials(String),
    #[error("cannot reach the control plane at {addr}: is `clawker cp serve` running?")]
    Unreachable { addr: SocketAddr },
    #[error("connecting to the control plane at {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("{what}: {} ({:?})", status.message(), status.code())]
    Rpc {
        what: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("{what}: malformed reply: {detail}")]
    BadReply { what: &'static str, detail: String },
}

fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
    move |status| ClientError::Rpc {
        what,
        status: Box::new(status),
    }
}

/// A connected admin API client (AdminService + health). Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminClient {
    addr: SocketAddr,
    admin: AdminServiceClient<Channel>,
    health: HealthClient<Channel>,
}

impl AdminClient {
    /// Dials `addr` with the CLI credentials from `state_dir`.
    pub async fn connect(state_dir: &Path, addr: SocketAddr) -> Result<Self, ClientError> {
        let paths = AuthPaths::new(state_dir);
        let read = |p: std::path::PathBuf| {
            pki::read_file(&p)
                .map(String::into_bytes)
                .map_err(|e| ClientError::Credentials(e.to_string()))
        };
        let ca = read(paths.ca_cert())?;
        let cert = read(paths.cli_cert())?;
        let key = read(paths.cli_key())?;
        Self::connect_with(addr, &ca, &cert, &key).await
    }

    /// Dials `addr` with explicit PEM material.
    pub async fn connect_with(
        addr: SocketAddr,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, ClientError> {
        let cfg = Arc::new(client_tls_config(ca_pem, cert_pem, key_pem)?);
        let connector = tls::connector(addr, cfg, CONNECT_TIMEOUT);
        let channel = Endpoint::from_static("http://clawker-controlplane")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(connector)
            .await
            .map_err(|e| classify_connect_error(addr, &e))?;
        Ok(Self {
            addr,
            admin: AdminServiceClient::new(channel.clone())
                .max_encoding_message_size(super::server::MAX_REQUEST_BYTES)
                .max_decoding_message_size(super::MAX_RESPONSE_BYTES),
            health: HealthClient::new(channel)
                .max_encoding_message_size(super::server::MAX_REQUEST_BYTES)
                .max_decoding_message_size(super::server::MAX_REQUEST_BYTES),
        })
    }

    /// The address this client dialed.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The raw generated client, for calls not wrapped here.
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        self.admin.clone()
    }

    /// `ListAgents`: registered agents, sorted by (project, agent).
    pub async fn list_agents(&self) -> Result<Vec<pb::Agent>, ClientError> {
        let res = self
            .admin
            .clone()
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map_err(rpc("ListAgents"))?;
        Ok(res.into_inner().agents)
    }

    /// `GetWorldview`, parsed.
    pub async fn worldview(&self) -> Result<serde_json::Value, ClientError> {
        let res = self
            .admin
            .clone()
            .get_worldview(pb::GetWorldviewRequest {})
            .await
            .map_err(rpc("GetWorldview"))?;
        serde_json::from_str(&res.into_inner().json).map_err(|e| ClientError::BadReply {
            what: "GetWorldview",
            detail: e.to_string(),
        })
    }

    /// `WatchEvents`: live events whose name starts with one of `prefixes`
    /// (all when empty). Dropping the stream ends the subscription.
    pub async fn watch_events(
        &self,
        prefixes: Vec<String>,
    ) -> Result<Streaming<pb::Event>, ClientError> {
        let res = self
            .admin
            .clone()
            .watch_events(pb::WatchEventsRequest {
                name_prefixes: prefixes,
            })
            .await
            .map_err(rpc("WatchEvents"))?;
        Ok(res.into_inner())
    }

    /// `GetSupervisionTree`: JSON and the rendered text.
    pub async fn tree(&self) -> Result<pb::GetSupervisionTreeResult, ClientError> {
        let res = self
            .admin
            .clone()
            .get_supervision_tree(pb::GetSupervisionTreeRequest {})
            .await
            .map_err(rpc("GetSupervisionTree"))?;
        Ok(res.into_inner())
    }

    /// `Exec`: `requests` must start with an `ExecStart` frame.
    pub async fn exec(
        &self,
        requests: impl tonic::IntoStreamingRequest<Message = pb::ExecRequest>,
    ) -> Result<Streaming<pb::ExecResponse>, ClientError> {
        let res = self
            .admin
            .clone()
            .exec(requests)
            .await
            .map_err(rpc("Exec"))?;
        Ok(res.into_inner())
    }

    /// `CopyFrom`: the tar stream of a path in the container.
    pub async fn copy_from(
        &self,
        req: pb::CopyFromRequest,
    ) -> Result<Streaming<pb::CopyFromResponse>, ClientError> {
        let res = self
            .admin
            .clone()
            .copy_from(req)
            .await
            .map_err(rpc("CopyFrom"))?;
        Ok(res.into_inner())
    }

    /// `CopyTo`: `requests` must start with a `CopyToStart` frame.
    pub async fn copy_to(
        &self,
        requests: impl tonic::IntoStreamingRequest<Message = pb::CopyToRequest>,
    ) -> Result<Streaming<pb::CopyToResponse>, ClientError> {
        let res = self
            .admin
            .clone()
            .copy_to(requests)
            .await
            .map_err(rpc("CopyTo"))?;
        Ok(res.into_inner())
    }

    /// `Logs`: the user command's output.
    pub async fn logs(
        &self,
        req: pb::LogsRequest,
    ) -> Result<Streaming<pb::LogsResponse>, ClientError> {
        let res = self.admin.clone().logs(req).await.map_err(rpc("Logs"))?;
        Ok(res.into_inner())
    }

    /// `ReleaseAgent`: back from quarantine to the agent network.
    pub async fn release_agent(
        &self,
        agent: &str,
        project: &str,
    ) -> Result<pb::ReleaseAgentResult, ClientError> {
        let res = self
            .admin
            .clone()
            .release_agent(pb::ReleaseAgentRequest {
                agent_name: agent.to_owned(),
                project: project.to_owned(),
            })
            .await
            .map_err(rpc("ReleaseAgent"))?;
        Ok(res.into_inner())
    }

    /// `UnlockAgent`: remove the namespace lock.
    pub async fn unlock_agent(
        &self,
        agent: &str,
        project: &str,
    ) -> Result<pb::UnlockAgentResult, ClientError> {
        let res = self
            .admin
            .clone()
            .unlock_agent(pb::UnlockAgentRequest {
                agent_name: agent.to_owned(),
                project: project.to_owned(),
            })
            .await
            .map_err(rpc("UnlockAgent"))?;
        Ok(res.into_inner())
    }

    /// `grpc.health.v1.Health/Check` for `service` (`""` = whole server).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, ClientError> {
        let res = self
            .health
            .clone()
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(rpc("health check"))?;
        Ok(res.into_inner().status())
    }
}

/// TLS 1.3, ALPN h2, the CLI client certificate, WebPKI server
/// verification against the CA.
pub fn client_tls_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ClientConfig, ClientError> {
    let cred = |e: tls::TlsError| ClientError::Credentials(e.to_string());
    let roots = tls::root_store("CA certificate", ca_pem).map_err(cred)?;
    let certs = tls::load_certs("CLI client certificate", cert_pem).map_err(cred)?;
    let key = tls::load_key("CLI client key", key_pem).map_err(cred)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Credentials(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| ClientError::Credentials(format!("CLI client keypair: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Nothing listening (refused, or no answer within the timeout) is
/// [`ClientError::Unreachable`]; anything else (TLS failures above all)
/// keeps its cause.
fn classify_connect_error(addr: SocketAddr, err: &tonic::transport::Error) -> ClientError {
    use std::io::ErrorKind;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut detail = Vec::new();
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::TimedOut
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
            )
        {
            return ClientError::Unreachable { addr };
        }
        let s = e.to_string();
        if detail.last() != Some(&s) {
            detail.push(s);
        }
        cur = e.source();
    }
    ClientError::Connect {
        addr,
        detail: detail.join(": "),
    }
}
