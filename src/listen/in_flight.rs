//! The tower layer that tells a [`GuardedConn`](super::GuardedConn) which
//! requests are in flight: a request counts from the moment the server
//! calls the service (its headers are complete) until its response body is
//! dropped (the response is fully sent, or the stream was reset). A
//! server-streaming call (`WatchEvents`, clawkerd's `Session`) is in flight
//! for as long as its stream lives, so a quiet session is never idle.
//!
//! It also swaps the [`ConnInfo`] wrapper in the request's extensions for
//! the inner connection info, so everything behind it (tonic's
//! `peer_certs()`, the agent API's peer extraction, clawkerd's
//! `PeerIdentity`) finds exactly the type it found before.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::conn::{ConnInfo, InFlight};

/// Apply with `Server::builder().layer(InFlightLayer::<I>::new())`, where
/// `I` is the `ConnectInfo` of the connection the guard wraps.
pub struct InFlightLayer<I>(PhantomData<fn() -> I>);

impl<I> InFlightLayer<I> {
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<I> Default for InFlightLayer<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I> Clone for InFlightLayer<I> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<S, I> Layer<S> for InFlightLayer<I> {
    type Service = InFlightService<S, I>;
    fn layer(&self, inner: S) -> Self::Service {
        InFlightService {
            inner,
            _info: PhantomData,
        }
    }
}

pub struct InFlightService<S, I> {
    inner: S,
    _info: PhantomData<fn() -> I>,
}

impl<S: Clone, I> Clone for InFlightService<S, I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _info: PhantomData,
        }
    }
}

impl<S, I, B, RB> Service<http::Request<B>> for InFlightService<S, I>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    type Response = http::Response<InFlightBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let guard = match req.extensions_mut().remove::<ConnInfo<I>>() {
            Some(info) => {
                let guard = info.activity.begin();
                req.extensions_mut().insert(info.inner);
                Some(guard)
            }
            None => {
                // A wiring mistake (the layer's `I` is not the guarded
                // connection's info): requests would not count and a quiet
                // stream would be cut at the idle timeout. Say so loudly.
                if crate::log_limit::admit("in_flight_untracked") {
                    tracing::error!(
                        event = "in_flight_untracked",
                        expected = std::any::type_name::<ConnInfo<I>>(),
                        "request without guarded connection info; it does not count as activity"
                    );
                }
                None
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| InFlightBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

pin_project! {
    /// A response body that keeps its request in flight until dropped.
    pub struct InFlightBody<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B: Body> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
