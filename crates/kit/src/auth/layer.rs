//! The authentication layer of every process: verifies the access token of each call that
//! needs one and hands the handler the caller as a [`Principal`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::{Principal, Verifier, bearer_token};
use crate::error::ApiError;

/// What the authentication layer checks: tokens, with `verifier`, on every CRM call except the
/// public ones (those that hand out or give back tokens, declared by the role that serves them).
/// Health, reflection, `/healthz`, `/readyz`, `/metrics` and the published keys are open.
#[derive(Clone, Debug)]
pub struct Authenticator {
    verifier: Verifier,
    public: Arc<[&'static str]>,
}

impl Authenticator {
    /// Checks tokens with `verifier`, except on `public_methods` (full paths,
    /// `/crm.auth.v1.AuthService/SignIn`).
    pub fn new(verifier: Verifier, public_methods: impl IntoIterator<Item = &'static str>) -> Authenticator {
        Authenticator { verifier, public: public_methods.into_iter().collect() }
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Whether a request path needs an access token: every CRM call but the public ones.
    pub fn needs_token(&self, path: &str) -> bool {
        path.starts_with("/crm.") && !self.public.contains(&path)
    }

    /// The caller of the call at gRPC `path` with `headers`: `None` when the call needs no
    /// token; UNAUTHENTICATED when it needs one and has no valid one. Every edge that takes
    /// calls (this layer, the gateway's REST transcoder) decides with it.
    pub async fn caller(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Principal>, ApiError> {
        if !self.needs_token(path) {
            return Ok(None);
        }
        match bearer_token(headers) {
            None => {
                Err(ApiError::unauthenticated("this call needs an access token: send `authorization: Bearer <token>`"))
            }
            Some(token) => self.verifier.verify(token).await.map(Some),
        }
    }
}

/// Tower layer: verifies the access token of every call that needs one and puts the
/// [`Principal`] into the request's extensions; refuses the rest with UNAUTHENTICATED.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    authenticator: Authenticator,
}

impl AuthLayer {
    pub fn new(authenticator: Authenticator) -> AuthLayer {
        AuthLayer { authenticator }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate { inner, authenticator: self.authenticator.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Authenticate<S> {
    inner: S,
    authenticator: Authenticator,
}

impl<S, B> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The polled service handles this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !self.authenticator.needs_token(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        let authenticator = self.authenticator.clone();
        Box::pin(async move {
            match authenticator.caller(req.uri().path(), req.headers()).await {
                Ok(principal) => {
                    if let Some(principal) = principal {
                        req.extensions_mut().insert(principal);
                    }
                    inner.call(req).await
                }
                Err(err) => Ok(tonic::Status::from(err).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use crm_proto::auth::v1::{Jwk, Jwks};
    use futures_util::future::BoxFuture;

    use super::*;
    use crate::auth::KeySource;

    struct OneKey(Jwk);

    impl KeySource for OneKey {
        fn fetch(&self) -> BoxFuture<'_, Result<Jwks, String>> {
            let jwks = Jwks { keys: vec![self.0.clone()] };
            Box::pin(async move { Ok(jwks) })
        }
    }

    #[test]
    fn token_paths_and_headers() {
        let key = crate::auth::SigningKey::generate();
        let verifier = Verifier::new(Arc::new(OneKey(key.jwk())));
        let authenticator = Authenticator::new(verifier, ["/crm.auth.v1.AuthService/SignIn"]);
        let needs_token = |path: &str| authenticator.needs_token(path);
        assert!(needs_token("/crm.contacts.v1.ContactsService/GetPerson"));
        assert!(needs_token("/crm.auth.v1.OrgService/CreateUser"));
        assert!(!needs_token("/crm.auth.v1.AuthService/SignIn"));
        assert!(!needs_token("/grpc.health.v1.Health/Check"));
        assert!(!needs_token("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!needs_token("/metrics"));
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(http::header::AUTHORIZATION, "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("abc.def"));
        headers.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }
}
