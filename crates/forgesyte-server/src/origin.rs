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
//! - **A server listening on a loopback address answers loopback names
//!   only**: `Host` must be `localhost`, `127.0.0.1` (or any `127.x`) or
//!   `[::1]`, with any port, or one of the `--public-host` names (a proxy's
//!   public name, when the proxy passes the client's `Host` on); a rebound
//!   name is refused (403).
//!
//! An `Origin` is also this server's when its host is a `--public-host`
//! name (a proxy that rewrites `Host` to the server's own address leaves
//! `Origin` as the browser sent it). Checked where each connection's
//! requests enter (`conn::WithPeer`), before routing. Knows nothing of
//! plugins or routes.

use axum::http::{HeaderMap, Method, header};

/// What a connection's requests are checked against.
#[derive(Debug, Clone, Default)]
pub(crate) struct Guard {
    /// The server listens on a loopback address.
    pub(crate) loopback: bool,
    /// `--public-host` names: lowercase, without port or trailing dot.
    pub(crate) public_hosts: std::sync::Arc<[String]>,
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

/// Why a request is refused (the answer's detail), or `None`.
pub(crate) fn refusal(method: &Method, headers: &HeaderMap, guard: &Guard) -> Option<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if guard.loopback
        && !host.is_empty()
        && !is_loopback_name(host)
        && !guard.is_public(host_name(host))
    {
        return Some(format!(
            "Host '{}' is not this server's: a server listening on a loopback address answers \
             localhost, 127.0.0.1, [::1] and its --public-host names only",
            host.escape_debug()
        ));
    }
    let upgrade = headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
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

/// Whether a `Host` value names the loopback interface.
fn is_loopback_name(host: &str) -> bool {
    let name = host_name(host);
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name)
        .trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn guard(loopback: bool, public: &[&str]) -> Guard {
        Guard {
            loopback,
            public_hosts: public.iter().map(|p| (*p).to_owned()).collect(),
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
        // A server on another address answers any name (a proxy's, a
        // Service's).
        assert_eq!(
            refusal(
                &get,
                &headers(&[("host", "forgesyte.svc.cluster.local")]),
                &guard(false, &[])
            ),
            None
        );
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
