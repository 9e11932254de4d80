//! IdentityInterceptor: resolves the caller's leaf certificate to its
//! registry row on every identity-required AgentService call (reference
//! `identity.md` §8), after the AuthInterceptor.
//!
//! The lookup is the lock-free [`RegistryReader`] path, so this runs on
//! every per-agent RPC without queueing behind registry writes. Every
//! failure is the same `PermissionDenied "registration rejected"`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tonic::codegen::http;
use tonic::server::NamedService;
use tower_layer::Layer;
use tower_service::Service;

use super::auth::reject;
use super::peer;
use super::scopes::{self, IdentityDecision, PolicyError};
use crate::registry::{Entry, RegistryError, RegistryReader};

/// The registered identity of the caller, attached to request extensions
/// by this layer. Only this module can construct it, so a handler that
/// finds one knows the interceptor put it there.
#[derive(Debug, Clone)]
pub struct AgentIdentity(Arc<Entry>);

impl AgentIdentity {
    pub fn entry(&self) -> &Entry {
        &self.0
    }
}

#[derive(Clone)]
pub struct IdentityLayer {
    reader: RegistryReader,
    policy: Arc<HashMap<String, IdentityDecision>>,
}

impl IdentityLayer {
    /// Refuses (at startup) a policy with a key that names no AgentService
    /// method: a renamed RPC must not silently lose its opt-out. Methods
    /// absent from the policy require identity (fail secure).
    pub fn new(
        reader: RegistryReader,
        policy: HashMap<String, IdentityDecision>,
    ) -> Result<Self, PolicyError> {
        scopes::check_no_stale_keys(scopes::AGENT_SERVICE, policy.keys())?;
        Ok(Self {
            reader,
            policy: Arc::new(policy),
        })
    }

    fn resolve(&self, path: &str, ext: &http::Extensions) -> Result<Option<AgentIdentity>, Status> {
        if self.policy.get(path) == Some(&IdentityDecision::OptedOut) {
            return Ok(None);
        }
        let rejected = || Status::permission_denied("registration rejected");
        // Peer-triggered refusals: rate-limited, the path bounded.
        let loud = || crate::log_limit::admit("agent_identity_rejected");
        let method = || crate::peer_text::bound(path);
        let leaf = match peer::peer_leaf(ext) {
            Ok(l) => l,
            Err(error) => {
                if loud() {
                    tracing::warn!(method = %method(), %error, "agent identity: missing peer auth info");
                }
                return Err(rejected());
            }
        };
        match self.reader.lookup(&leaf.thumbprint, &leaf.cn) {
            Ok(entry) => Ok(Some(AgentIdentity(entry))),
            Err(RegistryError::UnknownAgent) => {
                if loud() {
                    tracing::warn!(method = %method(), "agent identity: thumbprint not registered");
                }
                Err(rejected())
            }
            Err(error) => {
                tracing::error!(method = %method(), %error, "agent identity: registry lookup failed");
                Err(rejected())
            }
        }
    }
}

impl<S> Layer<S> for IdentityLayer {
    type Service = IdentityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdentityService {
            inner,
            cfg: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct IdentityService<S> {
    inner: S,
    cfg: IdentityLayer,
}

impl<S: NamedService> NamedService for IdentityService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<http::Request<B>> for IdentityService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let decision = self.cfg.resolve(req.uri().path(), req.extensions());
        match decision {
            Ok(identity) => {
                if let Some(id) = identity {
                    req.extensions_mut().insert(id);
                }
                // The inner service was polled ready; call it directly.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await })
            }
            Err(status) => Box::pin(async move { Ok(reject(status)) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_opt_out_key_is_a_startup_error() {
        let reader = crate::registry::actor::tests_support::empty_reader();
        let mut policy = scopes::agent_identity_policy();
        policy.insert(
            "/clawker.agent.v1.AgentService/Connect".into(),
            IdentityDecision::OptedOut,
        );
        let err = IdentityLayer::new(reader.clone(), policy).err().unwrap();
        assert!(matches!(err, PolicyError::StaleKey { .. }), "{err}");
        assert!(IdentityLayer::new(reader, scopes::agent_identity_policy()).is_ok());
    }
}
