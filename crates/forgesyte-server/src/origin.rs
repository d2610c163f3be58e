//! What a web page the user visits may not make this server do.
//!
//! A browser sends a cross-site `POST` of a "simple" type (`text/plain`,
//! `multipart/form-data`, a form) without asking first, and opens a
//! WebSocket to any origin: without a check, any page could run tools on a
//! server on `127.0.0.1` and read a stream's answers. And a page whose
//! domain name is rebound to `127.0.0.1` (DNS rebinding) is same-origin
//! with the server it reaches, so it could read every answer. Two rules:
//!
//! - **Writes and upgrades come from this server's own pages** (or from no
//!   page: curl, SDKs send no `Origin`): a request that is not `GET`,
//!   `HEAD` or `OPTIONS`, or that asks for a WebSocket, is refused (403)
//!   when its `Origin` is not the request's own `Host`, or when
//!   `Sec-Fetch-Site` says `cross-site`.
//! - **A connection to a loopback address is answered for loopback names
//!   only**: `Host` must be `localhost`, `127.0.0.1` (or any `127.x`) or
//!   `[::1]`, with any port, or one of the `--public-host` names (a proxy's
//!   public name, when the proxy passes the client's `Host` on); a rebound
//!   name is refused (403).
//!
//! Before either rule, a request whose `Host` is malformed is a bad request
//! (400, RFC 9112 §3.2): two `Host` headers, or none in HTTP/1.1; a target
//! in absolute form (`GET http://host/path`) names the host instead of
//! `Host`.
//!
//! An `Origin` is also this server's when its host is a `--public-host`
//! name (a proxy that rewrites `Host` to the server's own address leaves
//! `Origin` as the browser sent it). The loopback rule is each
//! connection's: one that arrived on a loopback address, also at a server
//! bound to `0.0.0.0` (a rebound page reaches it on 127.0.0.1). Each
//! connection's [`Guard`] travels in its requests' extensions
//! (`conn::WithPeer`); [`GuardLayer`], innermost in the router's stack,
//! refuses, so a refused request has its id, its log line and its count
//! like any other answer. Knows nothing of plugins or routes.

use std::task::{Context, Poll};

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri, Version, header};
use axum::response::Response;
use tower::{Layer, Service};

/// At most one warning per 10 s for refused requests (any page the user
/// visits can send them in a loop); the others are debug lines.
static WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::new(10);

/// What a connection's requests are checked against; and its
/// [`crate::unread::Linger`], carried here so that a request holds one
/// extension of its connection's besides its address, not two (a third
/// entry grew the extensions' table on every request: 6% of the health
/// route's rate).
#[derive(Debug, Clone, Default)]
pub(crate) struct Guard {
    /// The connection came to a loopback address.
    pub(crate) loopback: bool,
    /// `--public-host` names: lowercase, without port or trailing dot.
    pub(crate) public_hosts: std::sync::Arc<[String]>,
    /// Set when an answer leaves its request's body unread.
    pub(crate) linger: crate::unread::Linger,
}

impl Guard {
    /// Whether `name` (a host, no port) is a `--public-host` name.
    fn is_public(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        self.public_hosts
            .iter()
            .any(|public| public.eq_ignore_ascii_case(name))
    }
}

/// The router's layer that refuses what [`refusal`] names (403), for the
/// requests that carry their connection's [`Guard`] (all that came in
/// over a connection; none in tests that call the router directly).
/// A plain tower layer, as `metrics::http::TrackLayer`: it is on the path
/// of every request.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GuardLayer;

impl<S> Layer<S> for GuardLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded { inner }
    }
}

/// The service of [`GuardLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Guarded<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Guarded<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future =
        futures_util::future::Either<std::future::Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(guard) = request.extensions().get::<Guard>() else {
            return futures_util::future::Either::Right(self.inner.call(request));
        };
        if let Some(detail) = bad_host(request.version(), request.uri(), request.headers()) {
            return futures_util::future::Either::Left(std::future::ready(Ok(
                crate::respond::closing(StatusCode::BAD_REQUEST, detail),
            )));
        }
        // The target's host and port: userinfo (`user@`) is no part of
        // the host (`http://localhost@evil.example/` asks for evil.example).
        let target = request.uri().authority().map(|a| {
            a.as_str()
                .rsplit_once('@')
                .map_or(a.as_str(), |(_, host)| host)
        });
        let detail = refusal_at(request.method(), target, request.headers(), guard);
        match detail {
            None => futures_util::future::Either::Right(self.inner.call(request)),
            Some(detail) => {
                let peer = request
                    .extensions()
                    .get::<ConnectInfo<std::net::SocketAddr>>()
                    .map(|ConnectInfo(peer)| peer.to_string())
                    .unwrap_or_default();
                if WARNINGS.warn_now() {
                    tracing::warn!(%peer, "{detail} (one such line per {} s)", WARNINGS.period_s);
                } else {
                    tracing::debug!(%peer, "{detail}");
                }
                futures_util::future::Either::Left(std::future::ready(Ok(crate::respond::closing(
                    StatusCode::FORBIDDEN,
                    &detail,
                ))))
            }
        }
    }
}

/// Why a request's `Host` makes it malformed (400, RFC 9112 §3.2), or
/// `None`: more than one `Host` header, none in an HTTP/1.1 request whose
/// target is not in absolute form (`GET http://host/path`), or one that is
/// no host with an optional port where the target does not name the host
/// ([`is_malformed_host`]; a target that names one is held to the same). Which host a well-formed request names is
/// [`refusal_at`]'s question.
pub(crate) fn bad_host(version: Version, uri: &Uri, headers: &HeaderMap) -> Option<&'static str> {
    if crate::respond::repeated(headers, &header::HOST) {
        return Some("Bad request: more than one Host header");
    }
    let first = headers.get(header::HOST);
    if let Some(authority) = uri.authority() {
        // The target names the host; `Host` is ignored (RFC 9112 §3.2.2),
        // and the target's host is held to the same form (the `http`
        // crate reads `localhost:abc` as an authority). Userinfo is no
        // part of the host ([`refusal_at`] reads what follows it).
        let host = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, host)| host);
        return is_malformed_host(host.as_bytes()).then_some(
            "Bad request: the request target's host is no host name or address with an \
             optional port",
        );
    }
    match first {
        None => (version == Version::HTTP_11)
            .then_some("Bad request: an HTTP/1.1 request needs a Host header"),
        Some(host) => is_malformed_host(host.as_bytes()).then_some(
            "Bad request: the Host header is no host name or address with an optional port \
             (RFC 9110 §7.2)",
        ),
    }
}

/// Whether a `Host` value is no `host[:port]` (RFC 9110 §7.2, RFC 3986
/// §3.2.2): not an authority as the `http` crate reads one (spaces, an
/// unclosed `[`), user information (`user@host`), or a port that is not a
/// number up to 65535 (`localhost:abc`, which named localhost before). An
/// empty value is well formed (RFC 9112 §3.2: a target without a host).
fn is_malformed_host(value: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return true;
    };
    if text.is_empty() {
        return false;
    }
    if text.contains('@') {
        return true;
    }
    let Ok(authority) = text.parse::<axum::http::uri::Authority>() else {
        return true;
    };
    match text
        .get(authority.host().len()..)
        .and_then(|rest| rest.strip_prefix(':'))
    {
        None => text.len() != authority.host().len(),
        Some("") => false,
        Some(port) => !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err(),
    }
}

/// Why a request is refused (the answer's detail), or `None`: the request's
/// `Host` header names the host it asks for.
#[cfg(test)]
pub(crate) fn refusal(method: &Method, headers: &HeaderMap, guard: &Guard) -> Option<String> {
    refusal_at(method, None, headers, guard)
}

/// [`refusal`] for a request whose target may be in absolute form: then
/// its authority (`target`) is the host asked for and `Host` is ignored
/// (RFC 9112 §3.2.2).
pub(crate) fn refusal_at(
    method: &Method,
    target: Option<&str>,
    headers: &HeaderMap,
    guard: &Guard,
) -> Option<String> {
    // A Host that is there but not readable (not ASCII) is no name this
    // server answers to: it is refused as any other name is (it counted as
    // no Host before). A request with no Host at all (HTTP/1.0) passes.
    let host = target.unwrap_or_else(|| {
        headers
            .get(header::HOST)
            .map(|v| v.to_str().unwrap_or("\u{fffd}"))
            .unwrap_or("")
    });
    // On another address the rule applies once the operator named the
    // server's names (`--public-host`): then only those, IP addresses
    // (which no page can rebind) and localhost (a container's published
    // port) are answered; a DNS-rebound page's own name is not.
    let foreign = !host.is_empty() && !is_loopback_name(host) && !guard.is_public(host_name(host));
    if foreign && !guard.loopback && !guard.public_hosts.is_empty() && !is_ip_literal(host) {
        return Some(format!(
            "Host '{}' is not this server's: with --public-host it answers those names, \
             IP addresses and localhost only",
            host.escape_debug()
        ));
    }
    if foreign && guard.loopback {
        return Some(format!(
            "Host '{}' is not this server's: on a loopback address it answers localhost, \
             127.0.0.1, [::1] and its --public-host names only (a proxy that passes its own Host \
             on needs that name in --public-host)",
            host.escape_debug()
        ));
    }
    // As the stream route reads it: `websocket` among any `Upgrade` value.
    let upgrade = crate::respond::has_token(headers, &header::UPGRADE, "websocket");
    let writes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !writes && !upgrade {
        return None;
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return Some(
            "refused: a request another site's page sent (Sec-Fetch-Site: cross-site)".into(),
        );
    }
    // Only the first was judged: `Origin: <own>` then `Origin: <another>`
    // passed. A browser sends one.
    if crate::respond::repeated(headers, &header::ORIGIN) {
        return Some("refused: Origin given more than once".into());
    }
    let origin = headers.get(header::ORIGIN)?;
    let same = origin
        .to_str()
        .ok()
        .and_then(authority)
        .is_some_and(|(authority, https)| {
            same_authority(authority, https, host) || guard.is_public(host_name(authority))
        });
    (!same).then(|| {
        format!(
            "refused: a request from the page of another origin ({}); only this server's own \
             pages (and those of its --public-host names), or clients that are no web page, \
             may run tools and reload",
            String::from_utf8_lossy(origin.as_bytes()).escape_debug()
        )
    })
}

/// The host of `HOST[:PORT]` (`[::1]:8000` → `[::1]`).
fn host_name(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(rest) => rest
            .find(']')
            .map_or(authority, |end| &authority[..end + 2]),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(name, _)| name),
    }
}

/// `http://HOST[:PORT]` → (`HOST[:PORT]`, false); `https://…` → (…, true);
/// anything else (`null`, a path) → `None`.
fn authority(origin: &str) -> Option<(&str, bool)> {
    let (rest, https) = if let Some(rest) = origin.strip_prefix("http://") {
        (rest, false)
    } else {
        (origin.strip_prefix("https://")?, true)
    };
    (!rest.is_empty() && !rest.contains('/')).then_some((rest, https))
}

/// Whether an origin's authority names the request's `Host` (case aside,
/// a default port written or not). The scheme is not compared: behind a
/// proxy that ends TLS, the page is `https` and the request plain.
fn same_authority(authority: &str, https: bool, host: &str) -> bool {
    let default = if https { ":443" } else { ":80" };
    let strip = |s: &str| -> String {
        let s = s.to_ascii_lowercase();
        s.strip_suffix(default).map(str::to_owned).unwrap_or(s)
    };
    !host.is_empty() && strip(authority) == strip(host)
}

/// A `Host` value's name, without port, brackets or trailing dot.
fn bare_name(host: &str) -> &str {
    let name = host_name(host);
    name.strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name)
        .trim_end_matches('.')
}

/// Whether a `Host` value names the loopback interface.
fn is_loopback_name(host: &str) -> bool {
    let name = bare_name(host);
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a `Host` value is an IP address (with or without a port).
fn is_ip_literal(host: &str) -> bool {
    bare_name(host).parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn guard(loopback: bool, public: &[&str]) -> Guard {
        Guard {
            loopback,
            public_hosts: public.iter().map(|p| (*p).to_owned()).collect(),
            ..Guard::default()
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn writes_from_another_origin_are_refused_and_reads_are_not() {
        let post = Method::POST;
        let from = |origin| headers(&[("host", "127.0.0.1:8000"), ("origin", origin)]);
        // No Origin: curl, SDKs.
        assert_eq!(
            refusal(
                &post,
                &headers(&[("host", "127.0.0.1:8000")]),
                &guard(true, &[])
            ),
            None
        );
        // The server's own pages.
        assert_eq!(
            refusal(&post, &from("http://127.0.0.1:8000"), &guard(true, &[])),
            None
        );
        // Behind a proxy that ends TLS, the page is https and the Host the
        // same name: one origin (the scheme is the proxy's).
        assert_eq!(
            refusal(&post, &from("https://127.0.0.1:8000"), &guard(true, &[])),
            None
        );
        for other in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:9000",
            "http://127.0.0.1:8000/x",
        ] {
            let why = refusal(&post, &from(other), &guard(true, &[])).expect(other);
            assert!(why.contains("another origin"), "{why}");
        }
        // A read from another origin: the browser does not let it read the
        // answer (no CORS), and it changes nothing.
        assert_eq!(
            refusal(
                &Method::GET,
                &from("http://evil.example"),
                &guard(true, &[])
            ),
            None
        );
        // A WebSocket is a read by method and refused all the same.
        let mut upgrade = from("http://evil.example");
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(refusal(&Method::GET, &upgrade, &guard(true, &[])).is_some());
        // However the request names it among its Upgrade values, as the
        // stream route accepts it.
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("foo, WebSocket"));
        assert!(refusal(&Method::GET, &upgrade, &guard(true, &[])).is_some());
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("foo"));
        upgrade.append(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(refusal(&Method::GET, &upgrade, &guard(true, &[])).is_some());
        // Two Origins, the first the server's own: refused (only the
        // first was judged).
        let mut twice = from("http://127.0.0.1:8000");
        twice.append(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        let why = refusal(&post, &twice, &guard(true, &[])).expect("two Origins");
        assert!(why.contains("more than once"), "{why}");
        // A fetch that says it is cross-site, Origin or not.
        let cross = headers(&[("host", "127.0.0.1:8000"), ("sec-fetch-site", "cross-site")]);
        assert!(refusal(&post, &cross, &guard(true, &[])).is_some());
        let same = headers(&[
            ("host", "127.0.0.1:8000"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(refusal(&post, &same, &guard(true, &[])), None);
        // Default ports written or not, names in any case.
        let host = |h| headers(&[("host", h), ("origin", "http://LocalHost")]);
        assert_eq!(
            refusal(&post, &host("localhost:80"), &guard(true, &[])),
            None
        );
        assert_eq!(refusal(&post, &host("localhost"), &guard(true, &[])), None);
    }

    #[test]
    fn a_request_needs_exactly_one_host_unless_its_target_names_it() {
        let origin_form: Uri = "/v1/plugins".parse().unwrap();
        let absolute: Uri = "http://localhost:8000/v1/plugins".parse().unwrap();
        let one = headers(&[("host", "localhost")]);
        let mut two = headers(&[("host", "localhost")]);
        two.append(header::HOST, HeaderValue::from_static("evil.example"));
        let none = HeaderMap::new();
        assert_eq!(bad_host(Version::HTTP_11, &origin_form, &one), None);
        assert_eq!(bad_host(Version::HTTP_11, &absolute, &none), None);
        // HTTP/1.0 had no Host.
        assert_eq!(bad_host(Version::HTTP_10, &origin_form, &none), None);
        let why = bad_host(Version::HTTP_11, &origin_form, &none).expect("no Host");
        assert!(why.contains("needs a Host"), "{why}");
        for version in [Version::HTTP_10, Version::HTTP_11] {
            let why = bad_host(version, &absolute, &two).expect("two Hosts");
            assert!(why.contains("more than one Host"), "{why}");
        }
    }

    /// A `Host` value must be a host with an optional port; a target in
    /// absolute form names the host, and then `Host` is not read.
    #[test]
    fn a_host_that_is_no_host_and_port_is_a_bad_request() {
        let origin_form: Uri = "/v1/plugins".parse().unwrap();
        let absolute: Uri = "http://localhost:8000/v1/plugins".parse().unwrap();
        for good in [
            "localhost",
            "localhost:8000",
            "localhost:",
            "127.0.0.1:080",
            "[::1]",
            "[::1]:65535",
            "forgesyte.example.",
            "",
        ] {
            let host = headers(&[("host", good)]);
            assert_eq!(
                bad_host(Version::HTTP_11, &origin_form, &host),
                None,
                "{good}"
            );
        }
        for bad in [
            "localhost:abc",
            "localhost:65536",
            "localhost:-1",
            "localhost:1:2",
            "user@localhost",
            "local host",
            "[::1",
            "[::1]x",
            "localhost/x",
        ] {
            let host = headers(&[("host", bad)]);
            let why = bad_host(Version::HTTP_11, &origin_form, &host).expect(bad);
            assert!(why.contains("no host name"), "{bad}: {why}");
            assert_eq!(bad_host(Version::HTTP_11, &absolute, &host), None, "{bad}");
        }
        // A target in absolute form is held to the same form; userinfo
        // before its host is left to the refusal, which reads past it.
        let none = HeaderMap::new();
        for (target, bad) in [
            ("http://localhost:abc/v1/plugins", true),
            ("http://localhost:65536/v1/plugins", true),
            ("http://[::1]:8000/v1/plugins", false),
            ("http://localhost:80@rebind.example/v1/plugins", false),
        ] {
            let uri: Uri = target.parse().unwrap();
            let why = bad_host(Version::HTTP_11, &uri, &none);
            assert_eq!(why.is_some(), bad, "{target}: {why:?}");
        }
        let mut odd = HeaderMap::new();
        odd.insert(header::HOST, HeaderValue::from_bytes(b"h\xe9te").unwrap());
        assert!(bad_host(Version::HTTP_10, &origin_form, &odd).is_some());
    }

    #[test]
    fn an_absolute_target_names_the_host_and_host_is_ignored() {
        let get = Method::GET;
        let localhost = headers(&[("host", "localhost:8000")]);
        let why = refusal_at(
            &get,
            Some("rebind.attacker.example:8000"),
            &localhost,
            &guard(true, &[]),
        )
        .expect("a rebound name in the target");
        assert!(why.contains("rebind.attacker.example"), "{why}");
        let rebound = headers(&[("host", "rebind.attacker.example")]);
        assert_eq!(
            refusal_at(&get, Some("127.0.0.1:8000"), &rebound, &guard(true, &[])),
            None
        );
    }

    #[test]
    fn a_loopback_server_answers_loopback_names_only() {
        let get = Method::GET;
        for ok in [
            "127.0.0.1:8000",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8000",
            "127.1.2.3",
            "[::1]",
        ] {
            assert_eq!(
                refusal(&get, &headers(&[("host", ok)]), &guard(true, &[])),
                None,
                "{ok}"
            );
        }
        for rebound in [
            "rebind.attacker.example:8000",
            "10.0.0.5:8000",
            "[::2]:80",
            "evil",
        ] {
            let why =
                refusal(&get, &headers(&[("host", rebound)]), &guard(true, &[])).expect(rebound);
            assert!(why.contains("is not this server's"), "{why}");
        }
        // A Host that is not ASCII is no name this server answers to (it
        // passed as no Host at all); no Host (HTTP/1.0) passes.
        let mut odd = HeaderMap::new();
        odd.insert(
            header::HOST,
            HeaderValue::from_bytes(b"evil\xe9.com").unwrap(),
        );
        let why = refusal(&get, &odd, &guard(true, &[])).expect("an unreadable Host");
        assert!(why.contains("is not this server's"), "{why}");
        assert_eq!(refusal(&get, &HeaderMap::new(), &guard(true, &[])), None);
        // A server on another address answers any name (a proxy's, a
        // Service's)...
        assert_eq!(
            refusal(
                &get,
                &headers(&[("host", "forgesyte.svc.cluster.local")]),
                &guard(false, &[])
            ),
            None
        );
        // ... until the operator names its names: then those, IP
        // addresses and localhost only (a container's published port,
        // which a rebound page reaches under its own name).
        let named = guard(false, &["forgesyte.example"]);
        for ok in [
            "forgesyte.example:8000",
            "FORGESYTE.example",
            "10.0.0.5:8000",
            "[2001:db8::1]:80",
            "localhost:8000",
        ] {
            assert_eq!(
                refusal(&get, &headers(&[("host", ok)]), &named),
                None,
                "{ok}"
            );
        }
        for rebound in [
            "rebind.attacker.example:8000",
            "forgesyte.svc.cluster.local",
        ] {
            let why = refusal(&get, &headers(&[("host", rebound)]), &named).expect(rebound);
            assert!(why.contains("with --public-host"), "{why}");
        }
    }

    #[test]
    fn public_host_names_are_this_servers_behind_a_proxy() {
        let post = Method::POST;
        let behind = guard(true, &["forgesyte.example.com"]);
        // A proxy that passes the client's Host on.
        let passed = headers(&[
            ("host", "forgesyte.example.com"),
            ("origin", "https://forgesyte.example.com"),
        ]);
        assert_eq!(refusal(&post, &passed, &behind), None);
        assert!(refusal(&post, &passed, &guard(true, &[])).is_some());
        // A proxy that rewrites Host to the server's own address.
        let rewritten = headers(&[
            ("host", "127.0.0.1:8000"),
            ("origin", "https://FORGESYTE.example.com."),
        ]);
        assert_eq!(refusal(&post, &rewritten, &behind), None);
        // Another name, behind the same proxy, is not.
        let other = headers(&[
            ("host", "127.0.0.1:8000"),
            ("origin", "https://evil.example"),
        ]);
        assert!(refusal(&post, &other, &behind).is_some());
        assert!(refusal(&Method::GET, &headers(&[("host", "evil.example")]), &behind).is_some());
        assert_eq!(host_name("[::1]:8000"), "[::1]");
        assert_eq!(host_name("a.example:1"), "a.example");
        assert_eq!(host_name("a.example"), "a.example");
    }
}
