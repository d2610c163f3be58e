//! Request extractors whose rejections answer in the API's error shape.
//!
//! [`ApiPath`] wraps axum's [`Path`]: the route's parameters are
//! deserialised by name into a typed struct ([`PluginPath`],
//! [`ToolPath`]), percent-decoded by axum, and a rejection becomes an
//! [`ApiError`] (`{"detail": "..."}`), never axum's `text/plain` answer.
//!
//! A parameter that is not UTF-8 once decoded (`%FF`) cannot be a registry
//! key, but the health routes answer 200 or 404 whatever the path holds
//! (SPEC §5): such a parameter is decoded lossily (invalid bytes become
//! U+FFFD, with `percent-encoding`) and the handler answers "not found" for
//! that name. Other mistakes answer 400 with axum's message (`Invalid URL:
//! ...`), or 500 (logged) where axum calls them the server's own (a tuple
//! of the wrong length for the route); `every_route_is_documented_and_answers`
//! in the router's tests catches a route whose template does not fit its
//! extractor.
//!
//! This module is a leaf: it knows [`ApiError`] and nothing of the
//! handlers, the state or the router.

use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Path};
use axum::http::request::Parts;
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The parameter of the routes under `/v1/plugins/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct PluginPath {
    /// The plugin's name, percent-decoded.
    pub(crate) name: String,
}

/// The parameters of `/v1/plugins/{name}/tools/{tool}/run`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ToolPath {
    /// The plugin's name, percent-decoded.
    pub(crate) name: String,
    /// The tool's id, percent-decoded.
    pub(crate) tool: String,
}

/// Typed path parameters whose rejection is an [`ApiError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => {
                if is_invalid_utf8(&rejection)
                    && let Some(value) = lossy_params(parts)
                {
                    return Ok(ApiPath(value));
                }
                Err(rejection_error(&rejection))
            }
        }
    }
}

fn is_invalid_utf8(rejection: &PathRejection) -> bool {
    matches!(
        rejection,
        PathRejection::FailedToDeserializePathParams(e)
            if matches!(e.kind(), ErrorKind::InvalidUtf8InPathParam { .. })
    )
}

/// The route's parameters decoded lossily: each `{key}` segment of the
/// matched route template paired with the request path's segment at the
/// same place. `None` when the template is unknown or does not line up
/// (a wildcard), or when `T` does not take the result.
fn lossy_params<T: DeserializeOwned>(parts: &Parts) -> Option<T> {
    let template = parts.extensions.get::<MatchedPath>()?.as_str();
    let (keys, segments) = (template.split('/'), parts.uri.path().split('/'));
    if keys.clone().count() != segments.clone().count() {
        return None;
    }
    let mut params = Map::new();
    for (key, segment) in keys.zip(segments) {
        if let Some(key) = key.strip_prefix('{').and_then(|k| k.strip_suffix('}')) {
            let value = percent_decode_str(segment).decode_utf8_lossy();
            params.insert(key.to_owned(), Value::String(value.into_owned()));
        }
    }
    serde_json::from_value(Value::Object(params)).ok()
}

/// What a rejection answers: 400 with axum's message for the client's
/// mistakes, 500 (logged) for the ones axum calls the server's.
fn rejection_error(rejection: &PathRejection) -> ApiError {
    if rejection.status().is_client_error() {
        ApiError::BadPath {
            detail: rejection.body_text(),
        }
    } else {
        ApiError::Internal {
            context: format!("path parameters: {}", rejection.body_text()),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::http::{Request, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    async fn plugin(ApiPath(path): ApiPath<PluginPath>) -> String {
        path.name
    }

    async fn tool(ApiPath(path): ApiPath<ToolPath>) -> String {
        format!("{}|{}", path.name, path.tool)
    }

    /// Takes a number, to see a client error that is not about UTF-8.
    #[derive(Debug, Deserialize)]
    struct Numbered {
        n: u32,
    }

    async fn numbered(ApiPath(path): ApiPath<Numbered>) -> String {
        path.n.to_string()
    }

    async fn pair(ApiPath((a, b)): ApiPath<(String, String)>) -> String {
        format!("{a}{b}")
    }

    fn router() -> Router {
        Router::new()
            .route("/p/{name}/health", get(plugin))
            .route("/p/{name}/tools/{tool}/run", get(tool))
            .route("/n/{n}", get(numbered))
            // Templates that do not fit their extractors: bugs.
            .route("/missing", get(plugin))
            .route("/pair/{a}", get(pair))
    }

    async fn answer(uri: &str) -> (StatusCode, String) {
        let request = Request::get(uri).body(Body::empty()).unwrap();
        let response = router().oneshot(request).await.unwrap().into_response();
        let status = response.status();
        let body = to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn detail(body: &str) -> String {
        let value: Value = serde_json::from_str(body).unwrap();
        value["detail"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn parameters_are_percent_decoded_by_name() {
        assert_eq!(
            answer("/p/oc%72/health").await,
            (StatusCode::OK, "ocr".into())
        );
        assert_eq!(answer("/p/a%2Fb/health").await.1, "a/b");
        assert_eq!(answer("/p/%e2%9c%93/health").await.1, "✓");
        // Not an escape: kept as text.
        assert_eq!(answer("/p/%25zz%4/health").await.1, "%zz%4");
        assert_eq!(answer("/p/%/health").await.1, "%");
        assert_eq!(answer("/p/a%2Fb/tools/t%20x/run").await.1, "a/b|t x");
    }

    #[tokio::test]
    async fn invalid_utf8_is_decoded_lossily() {
        assert_eq!(
            answer("/p/%FF%fe/health").await,
            (StatusCode::OK, "\u{FFFD}\u{FFFD}".into())
        );
        assert_eq!(
            answer("/p/ok%C0/tools/%FFx/run").await.1,
            "ok\u{FFFD}|\u{FFFD}x"
        );
    }

    #[tokio::test]
    async fn other_client_mistakes_are_400_with_a_detail() {
        let (status, body) = answer("/n/seven").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let detail = detail(&body);
        assert!(detail.starts_with("Invalid URL"), "{detail}");
        assert!(detail.contains("seven"), "{detail}");
        assert_eq!(answer("/n/7").await, (StatusCode::OK, "7".into()));
    }

    #[tokio::test]
    async fn routes_that_do_not_fit_their_extractor_never_answer_plain_text() {
        let (status, body) = answer("/missing").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let detail_text = detail(&body);
        assert!(detail_text.contains("name"), "{detail_text}");
        let (status, body) = answer("/pair/x").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(detail(&body), "Internal Server Error");
    }
}

/// The client's address, when the connection layer recorded it
/// ([`crate::conn`] does, as axum's `ConnectInfo`); a router driven
/// in-process (tests) has none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) Option<std::net::SocketAddr>);

impl Peer {
    /// The client's IP address, if known.
    pub(crate) fn ip(self) -> Option<std::net::IpAddr> {
        self.0.map(|a| a.ip())
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("an unknown address"),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}
