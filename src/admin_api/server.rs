//! The admin listener: TLS 1.3 only, client certificate required, and only
//! the CLI's identity accepted — decided inside the TLS handshake by
//! [`tls::PinnedClientVerifier`] pinned to `clawker-cli`, so a rejected peer never reaches a gRPC handler.
//!
//! The checks, in order:
//! 1. the chain verifies to our CA, within its validity period (rustls'
//!    `WebPkiClientVerifier`, which also applies webpki's EKU rule);
//! 2. the leaf's Subject CN is `clawker-cli` (constant-time compare). This
//!    is what shuts out the CP's own client certificate and every agent
//!    leaf: they are signed by the same CA;
//! 3. the leaf explicitly lists the ClientAuth EKU.
//!
//! Why our own accept loop (TCP accept → cap check → handshake with a
//! deadline → tonic `serve_with_incoming`) instead of tonic's TLS:
//! handshakes run concurrently, a silent peer cannot hold the accept loop,
//! connections are capped and closed when idle ([`crate::listen`]), and
//! every refused peer is logged (rate-limited) with its address and the
//! reason.
//!
//! Besides AdminService the listener serves `grpc.health.v1.Health`
//! (`SERVING` for the whole server and for `clawker.admin.v1.AdminService`)
//! and server reflection (v1 and v1alpha: older `grpcurl` builds only speak
//! v1alpha), so `grpcurl` works with the CLI certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::service::AdminApi;
use super::{AdminConfig, SERVICE_NAME};
use crate::listen::{self, AcceptConfig, InFlightLayer};
use crate::pki::CLI_CN;
use crate::tls;

/// Largest gRPC request the admin API decodes (the CLI's requests are a
/// few bytes).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Largest gRPC response it encodes (and the CLI decodes): the worldview
/// of a large fleet is one message (see [`crate::admin_api::client`]).
pub const MAX_RESPONSE_BYTES: usize = crate::admin_api::MAX_RESPONSE_BYTES;

/// Why the admin API could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum AdminServerError {
    #[error("admin API: loading TLS material: {0}")]
    Material(String),
    #[error("admin API: TLS config: {0}")]
    Tls(String),
    #[error(
        "admin API: refusing to listen on non-loopback address {0} (the admin API is loopback-only)"
    )]
    NotLoopback(SocketAddr),
    #[error("admin API: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin API: reflection: {0}")]
    Reflection(String),
    #[error("admin API: server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The listener's rustls config: TLS 1.3, CP server certificate, ALPN h2,
/// [`tls::PinnedClientVerifier`] pinned to `clawker-cli` for clients.
pub fn server_tls_config(cfg: &AdminConfig) -> Result<rustls::ServerConfig, AdminServerError> {
    let provider = tls::provider();
    let roots = tls::root_store("CA certificate", &cfg.ca_pem)
        .map_err(|e| AdminServerError::Material(e.to_string()))?;
    let verifier = tls::PinnedClientVerifier::new(roots, CLI_CN, "admin API")
        .map_err(|e| AdminServerError::Tls(format!("client verifier: {e}")))?;
    let certs = tls::load_certs("CP server certificate", &cfg.server_cert_pem)
        .map_err(|e| AdminServerError::Material(e.to_string()))?;
    let key = tls::load_key("CP server key", &cfg.server_key_pem)
        .map_err(|e| AdminServerError::Material(e.to_string()))?;
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AdminServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| AdminServerError::Tls(format!("server keypair: {e}")))?;
    sc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(sc)
}

/// Binds `config.listen` and serves the admin API (plus health and
/// reflection) until `shutdown` is cancelled.
///
/// Returns the bound address (useful with port 0) and the server task; the
/// task resolves once the server has stopped (after `shutdown`, in-flight
/// unary calls finish; open `WatchEvents` streams are cut). Configuration
/// and bind errors are returned here, before anything is spawned. Must be
/// called within a tokio runtime (the actix System's is fine).
pub async fn serve_admin_api(
    config: AdminConfig,
    service: AdminApi,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<(), AdminServerError>>), AdminServerError> {
    check_listen(&config)?;
    let acceptor = TlsAcceptor::from(Arc::new(server_tls_config(&config)?));
    let tcp = TcpListener::bind(config.listen)
        .await
        .map_err(|source| AdminServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = tcp.local_addr().map_err(|source| AdminServerError::Bind {
        addr: config.listen,
        source,
    })?;

    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AdminServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| AdminServerError::Reflection(e.to_string()))?;

    let limits = config.limits;
    let (rx, _connections) = listen::accept_loop(
        tcp,
        acceptor,
        AcceptConfig {
            listener: "admin_api",
            reject_event: "admin_tls_rejected",
            refused_event: "admin_connection_refused",
            limits,
            reserved: None,
        },
        shutdown.clone(),
    );
    tracing::info!(event = "admin_api_listening", addr = %local);

    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .layer(InFlightLayer::<TlsConnectInfo<TcpConnectInfo>>::new())
        .add_service(
            service
                .with_stream_shutdown(shutdown.clone())
                .into_server()
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        )
        .add_service(
            health_svc
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            reflection_v1
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            reflection_v1alpha
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            ReceiverStream::new(rx).map(|accepted| Ok::<_, std::io::Error>(accepted.into_conn())),
            shutdown.cancelled_owned(),
        );
    let task = tokio::spawn(async move {
        let res = server.await.map_err(AdminServerError::from);
        // Keep the reporter alive as long as the server: dropping it does
        // not change statuses, but holding it documents the ownership.
        drop(health);
        tracing::info!(event = "admin_api_stopped", addr = %local);
        res
    });
    Ok((local, task))
}

fn check_listen(cfg: &AdminConfig) -> Result<(), AdminServerError> {
    if cfg.listen.ip().is_loopback() || cfg.allow_non_loopback {
        Ok(())
    } else {
        Err(AdminServerError::NotLoopback(cfg.listen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CONTROL_PLANE_CN;
    use crate::pki::{Ca, LeafSpec};
    use rcgen::ExtendedKeyUsagePurpose as Eku;

    fn leaf(ca: &Ca, cn: &str, ekus: Vec<Eku>) -> Vec<u8> {
        let mut spec = LeafSpec::new(cn, time::Duration::hours(1));
        spec.ekus = ekus;
        ca.issue(&spec).unwrap().cert_der
    }

    #[test]
    fn only_the_cli_identity_with_client_auth_passes() {
        let ca = Ca::generate().unwrap();
        let check_cli_leaf = |der: &[u8]| tls::check_pinned_leaf(der, CLI_CN);
        assert!(check_cli_leaf(&ca.mint_cli_client().unwrap().cert_der).is_ok());
        let e = check_cli_leaf(&ca.mint_cp_client().unwrap().cert_der).unwrap_err();
        assert!(e.contains("CN not authorized"), "{e}");
        let e = check_cli_leaf(&leaf(&ca, CONTROL_PLANE_CN, vec![Eku::ClientAuth])).unwrap_err();
        assert!(e.contains("CN not authorized"), "{e}");
        let e = check_cli_leaf(&leaf(&ca, CLI_CN, vec![Eku::ServerAuth])).unwrap_err();
        assert!(e.contains("ClientAuth"), "{e}");
        assert!(check_cli_leaf(b"junk").is_err());
    }

    #[test]
    fn non_loopback_listen_address_is_refused() {
        let ca = Ca::generate().unwrap();
        let server = ca.mint_cp_server(&[]).unwrap();
        let cfg = AdminConfig {
            listen: "0.0.0.0:0".parse().unwrap(),
            server_cert_pem: server.cert_pem.into_bytes(),
            server_key_pem: server.key_pem.into_bytes(),
            ca_pem: ca.cert_pem().as_bytes().to_vec(),
            allow_non_loopback: false,
            limits: crate::listen::ListenerLimits::ADMIN_API,
        };
        assert!(server_tls_config(&cfg).is_ok());
        assert!(matches!(
            check_listen(&cfg),
            Err(AdminServerError::NotLoopback(_))
        ));
        let cfg = AdminConfig {
            allow_non_loopback: true,
            ..cfg
        };
        assert!(check_listen(&cfg).is_ok());
    }
}
