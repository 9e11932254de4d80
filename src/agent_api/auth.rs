//! AuthInterceptor: bearer token + per-method scope, as a tower layer in
//! front of the gRPC services (reference `identity.md` §5.5).
//!
//! It is a layer on `http::Request` rather than a tonic `Interceptor`
//! because the decision depends on the method path, which tonic's simple
//! interceptors do not see. Algorithm, codes and messages are the
//! reference's; one addition: since the token endpoint shares the listener
//! and clawkerd calls it without a client certificate, the TLS layer only
//! *verifies* client certificates, and this layer is where a gRPC call
//! without one is refused.

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

use super::peer;

/// What a token validator says about a bearer token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Introspection {
    pub active: bool,
    /// Space-separated granted scopes.
    pub scope: String,
    pub client_id: String,
    pub sub: String,
    pub exp: i64,
    /// The client assertion the token was issued for (embedded issuer
    /// only; empty from an external introspection endpoint). Register
    /// redeems its grant on success.
    pub jti: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("introspection failed: {0}")]
pub struct IntrospectError(pub String);

/// Validates bearer tokens: the embedded issuer's token table, or an
/// external RFC 7662 endpoint. Like Hydra with a `scope` parameter, a token
/// that lacks `required_scope` may be reported inactive.
pub trait TokenIntrospector: Send + Sync + 'static {
    fn introspect<'a>(
        &'a self,
        token: &'a str,
        required_scope: &'a str,
    ) -> BoxFuture<'a, Result<Introspection, IntrospectError>>;
}

/// Configuration of one listener's AuthInterceptor.
#[derive(Clone)]
pub struct AuthLayer {
    introspector: Arc<dyn TokenIntrospector>,
    scopes: Arc<HashMap<String, String>>,
    required_client_id: Option<Arc<str>>,
    require_client_cert: bool,
}

impl AuthLayer {
    /// `scopes`: full method path → required scope (`""` = public).
    pub fn new(introspector: Arc<dyn TokenIntrospector>, scopes: HashMap<String, String>) -> Self {
        Self {
            introspector,
            scopes: Arc::new(scopes),
            required_client_id: None,
            require_client_cert: true,
        }
    }

    /// Pins the token's `client_id` (the agent listener pins `clawker-agent`).
    pub fn require_client_id(mut self, client_id: &str) -> Self {
        self.required_client_id = Some(client_id.into());
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            cfg: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    cfg: AuthLayer,
}

impl<S: NamedService> NamedService for AuthService<S> {
    const NAME: &'static str = S::NAME;
}

/// A gRPC error response without running the service.
pub(crate) fn reject<B: Default>(status: Status) -> http::Response<B> {
    status.into_http()
}

impl AuthLayer {
    /// The reference algorithm; `Err` is the refusal to send. `Ok` carries
    /// what the token validator said (none for a public method), which the
    /// handler finds in the request's extensions.
    async fn authorize(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        has_cert: bool,
    ) -> Result<Option<Introspection>, Status> {
        if self.require_client_cert && !has_cert {
            tracing::warn!(method = path, "authz: no client certificate");
            return Err(Status::unauthenticated("client certificate required"));
        }
        // 1. Fail closed on methods without a policy.
        let Some(required) = self.scopes.get(path) else {
            tracing::warn!(method = path, "authz: unmapped method denied");
            return Err(Status::unauthenticated("unauthorized"));
        };
        // 2. Public method.
        if required.is_empty() {
            return Ok(None);
        }
        // 3. First `authorization` value, exact case-sensitive "Bearer ".
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = token else {
            tracing::debug!(method = path, "authz: no bearer token");
            return Err(Status::unauthenticated("missing bearer token"));
        };
        // 4–5.
        let result = match self.introspector.introspect(token, required).await {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(method = path, %error, "authz: introspection failed");
                return Err(Status::unauthenticated("token validation failed"));
            }
        };
        if !result.active {
            tracing::debug!(method = path, "authz: token inactive or invalid");
            return Err(Status::unauthenticated("token inactive or invalid"));
        }
        // 6. Exact scope element.
        let missing =
            || Status::permission_denied(format!("token missing required scope {required:?}"));
        if !result.scope.split_whitespace().any(|s| s == required) {
            tracing::warn!(
                method = path,
                required_scope = %required,
                token_scope = %result.scope,
                "authz: token missing required scope"
            );
            return Err(missing());
        }
        // 7. Client pin: same message as a missing scope.
        if let Some(pinned) = &self.required_client_id
            && result.client_id != **pinned
        {
            tracing::warn!(
                method = path,
                required_client_id = %pinned,
                token_client_id = %result.client_id,
                "authz: token client_id does not match required client_id"
            );
            return Err(missing());
        }
        tracing::debug!(client_id = %result.client_id, scope = %result.scope, "authz: access granted");
        Ok(Some(result))
    }
}

impl<S, B, RB> Service<http::Request<B>> for AuthService<S>
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
        // The clone is the one we polled ready; keep it for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let has_cert = peer::has_client_cert(req.extensions());
            match cfg
                .authorize(req.uri().path(), req.headers(), has_cert)
                .await
            {
                Ok(granted) => {
                    if let Some(g) = granted {
                        req.extensions_mut().insert(g);
                    }
                    inner.call(req).await
                }
                Err(status) => Ok(reject(status)),
            }
        })
    }
}
