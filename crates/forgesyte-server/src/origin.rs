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
//!   `[::1]`, with any port; a rebound name is refused (403).
//!
//! Checked where each connection's requests enter (`conn::WithPeer`),
//! before routing. Knows nothing of plugins or routes.

use axum::http::{HeaderMap, Method, header};

/// Why `request` is refused (the answer's detail), or `None`.
/// `loopback`: whether the server listens on a loopback address.
pub(crate) fn refusal(method: &Method, headers: &HeaderMap, loopback: bool) -> Option<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if loopback && !host.is_empty() && !is_loopback_name(host) {
        return Some(format!(
            "Host '{}' is not this server's: a server listening on a loopback address answers \
             localhost, 127.0.0.1 and [::1] only",
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
        .is_some_and(|(authority, https)| same_authority(authority, https, host));
    (!same).then(|| {
        format!(
            "refused: a request from the page of another origin ({}); only this server's own \
             pages, or clients that are no web page, may run tools and reload",
            String::from_utf8_lossy(origin.as_bytes()).escape_debug()
        )
    })
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
    let name = match host.strip_prefix('[') {
        // `[::1]:8000`
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

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
            refusal(&post, &headers(&[("host", "127.0.0.1:8000")]), true),
            None
        );
        // The server's own pages.
        assert_eq!(refusal(&post, &from("http://127.0.0.1:8000"), true), None);
        // Behind a proxy that ends TLS, the page is https and the Host the
        // same name: one origin (the scheme is the proxy's).
        assert_eq!(refusal(&post, &from("https://127.0.0.1:8000"), true), None);
        for other in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:9000",
            "http://127.0.0.1:8000/x",
        ] {
            let why = refusal(&post, &from(other), true).expect(other);
            assert!(why.contains("another origin"), "{why}");
        }
        // A read from another origin: the browser does not let it read the
        // answer (no CORS), and it changes nothing.
        assert_eq!(
            refusal(&Method::GET, &from("http://evil.example"), true),
            None
        );
        // A WebSocket is a read by method and refused all the same.
        let mut upgrade = from("http://evil.example");
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(refusal(&Method::GET, &upgrade, true).is_some());
        // A fetch that says it is cross-site, Origin or not.
        let cross = headers(&[("host", "127.0.0.1:8000"), ("sec-fetch-site", "cross-site")]);
        assert!(refusal(&post, &cross, true).is_some());
        let same = headers(&[
            ("host", "127.0.0.1:8000"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(refusal(&post, &same, true), None);
        // Default ports written or not, names in any case.
        let host = |h| headers(&[("host", h), ("origin", "http://LocalHost")]);
        assert_eq!(refusal(&post, &host("localhost:80"), true), None);
        assert_eq!(refusal(&post, &host("localhost"), true), None);
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
            assert_eq!(refusal(&get, &headers(&[("host", ok)]), true), None, "{ok}");
        }
        for rebound in [
            "rebind.attacker.example:8000",
            "10.0.0.5:8000",
            "[::2]:80",
            "evil",
        ] {
            let why = refusal(&get, &headers(&[("host", rebound)]), true).expect(rebound);
            assert!(why.contains("is not this server's"), "{why}");
        }
        // A server on another address answers any name (a proxy's, a
        // Service's).
        assert_eq!(
            refusal(
                &get,
                &headers(&[("host", "forgesyte.svc.cluster.local")]),
                false
            ),
            None
        );
    }
}
