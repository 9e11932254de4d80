//! The CP's API for agents: one TLS listener serving AgentService (gRPC)
//! and the OAuth2 token endpoint that hands out its bearer tokens.
//!
//! - [`server`]: the listener, TLS config and wiring ([`serve_agent_api`]).
//! - [`token`]: `POST /oauth2/token` (client_credentials + ES256
//!   private_key_jwt, single-use JTIs spent durably in redb).
//! - [`token_auth`]: the pure half of a token request (form, assertion,
//!   claims, scope → the authenticated client or an OAuth error).
//! - [`assertion`]: minting and verifying the client-assertion JWTs.
//! - [`auth`]: AuthInterceptor (bearer token, per-method scope, client pin).
//! - [`identity_interceptor`]: IdentityInterceptor (registry lookup of the
//!   peer certificate, entry attached to the request).
//! - [`scopes`]: the per-method policy maps, checked against the proto
//!   descriptor.
//! - [`register`]: the Register handler and its 11 checks.
//! - [`peer`]: reading the verified client leaf and address off a request.

pub mod assertion;
pub mod auth;
pub mod identity_interceptor;
pub mod peer;
pub mod register;
pub mod scopes;
pub mod server;
pub mod token;
pub mod token_auth;

pub use server::{AgentApi, AgentApiConfig, AgentApiError, serve_agent_api};
