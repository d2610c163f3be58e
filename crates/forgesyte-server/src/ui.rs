//! The dashboard, `GET /` and `GET /ui`: one self-contained HTML page
//! (markup, style and script from `ui/` beside this crate, embedded at
//! build time) that shows every plugin's state and updates live from
//! `GET /v1/events`.
//!
//! This module owns only the page and its headers. It must not know the
//! API's data: the page's script reads the public JSON routes like any
//! client (`/v1/plugins`, per-plugin health and tools, the run route). The
//! page loads nothing from anywhere else (the machine may be offline), and
//! its Content-Security-Policy forbids it to.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, X_CONTENT_TYPE_OPTIONS};
use axum::response::{Html, IntoResponse};

/// The text of the page's `<style>` element (a macro: `concat!` takes
/// literals, not constants, and the page and its digest must hold the
/// same text).
macro_rules! style {
    () => {
        concat!("\n", include_str!("../ui/dashboard.css"))
    };
}

/// The text of the page's `<script>` element (as [`style!`]).
macro_rules! script {
    () => {
        concat!("\n", include_str!("../ui/dashboard.js"))
    };
}

/// The text of the page's `<style>` element.
const STYLE: &str = style!();

/// The text of the page's `<script>` element.
const SCRIPT: &str = script!();

/// The page: markup, then its style and script inlined.
const PAGE: &str = concat!(
    include_str!("../ui/dashboard.html"),
    "<style>",
    style!(),
    "</style>\n<script>",
    script!(),
    "</script>\n</body>\n</html>\n"
);

/// Only this origin's routes, and only the page's own style and script,
/// by their digests (`'unsafe-inline'` would let a script injected into
/// the page run too).
static CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "default-src 'none'; connect-src 'self'; img-src 'self' data:; \
         style-src 'sha256-{}'; script-src 'sha256-{}'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        digest(STYLE),
        digest(SCRIPT)
    )
});

/// A CSP source's digest of `text`: its SHA-256, in base64.
fn digest(text: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()))
}

fn page() -> impl IntoResponse {
    (
        [
            (CONTENT_SECURITY_POLICY, CSP.as_str()),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (CACHE_CONTROL, "no-cache"),
        ],
        Html(PAGE),
    )
}

/// The dashboard: every plugin's state, live (self-contained HTML).
#[utoipa::path(
    get,
    path = "/",
    tag = "server",
    responses((status = 200, description = "The dashboard page (the same as `/ui`)", content_type = "text/html"))
)]
pub(crate) async fn dashboard_root() -> impl IntoResponse {
    page()
}

/// The dashboard: every plugin's state, live (self-contained HTML).
#[utoipa::path(
    get,
    path = "/ui",
    tag = "server",
    responses((status = 200, description = "The dashboard page", content_type = "text/html"))
)]
pub(crate) async fn dashboard_ui() -> impl IntoResponse {
    page()
}

/// What browsers ask for beside every page (the dashboard, `/docs`): no
/// icon, answered 204 and cached for a day, so a visit leaves no 404 in
/// the log and the metrics.
#[utoipa::path(
    get,
    path = "/favicon.ico",
    tag = "server",
    responses((status = 204, description = "No icon (asked for by browsers beside every page)"))
)]
pub(crate) async fn favicon() -> impl IntoResponse {
    (
        axum::http::StatusCode::NO_CONTENT,
        [(CACHE_CONTROL, "public, max-age=86400")],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy's digests are those of the page's very style and script
    /// (a browser refuses anything else), and nothing inline is allowed
    /// otherwise.
    #[test]
    fn the_policy_allows_the_page_s_own_style_and_script_only() {
        let style = PAGE.find("<style>").unwrap() + "<style>".len();
        let script = PAGE.find("<script>").unwrap() + "<script>".len();
        assert_eq!(&PAGE[style..PAGE.find("</style>").unwrap()], STYLE);
        assert_eq!(&PAGE[script..PAGE.find("</script>").unwrap()], SCRIPT);
        assert!(CSP.contains(&format!("script-src 'sha256-{}'", digest(SCRIPT))));
        assert!(CSP.contains(&format!("style-src 'sha256-{}'", digest(STYLE))));
        assert!(!CSP.contains("unsafe"), "{}", *CSP);
        // The digest of a known text (RFC 6234's "abc").
        assert_eq!(
            digest("abc"),
            "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    #[test]
    fn the_page_is_whole_and_loads_nothing_from_elsewhere() {
        assert!(PAGE.starts_with("<!DOCTYPE html>"));
        assert!(PAGE.trim_end().ends_with("</html>"));
        assert_eq!(PAGE.matches("<script").count(), 1, "one inline script");
        assert!(!PAGE.contains(" src="), "no external script or image");
        assert!(!PAGE.contains("<link"), "no external stylesheet");
        // The SVG namespace name is an identifier, never fetched.
        let urls = PAGE.replace("'http://www.w3.org/2000/svg'", "");
        assert!(!urls.contains("http://") && !urls.contains("https://"));
        assert!(!PAGE.contains("//cdn") && !PAGE.contains("@import"));
        for route in ["/v1/events", "/v1/plugins", "/health", "/tools", "/run"] {
            assert!(PAGE.contains(route), "the page never uses {route}");
        }
        // Text from the server is never parsed as HTML.
        assert!(!PAGE.contains("innerHTML") && !PAGE.contains("outerHTML"));
        assert!(!PAGE.contains("insertAdjacentHTML") && !PAGE.contains("document.write"));
    }
}
