//! The admin token that guards the reload routes, and the check of a
//! request's `Authorization` header against it.
//!
//! The routes are disabled unless a token is configured
//! (`FORGESYTE_ADMIN_TOKEN`, or `--admin-token-file`). A request then needs
//! `Authorization: Bearer <token>`; the comparison is `subtle`'s
//! constant-time equality, which takes the same time wherever the first
//! differing byte is, so response times do not leak the token byte by byte.

use std::fmt;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Tokens shorter than this are accepted, with a warning at startup.
pub(crate) const RECOMMENDED_TOKEN_LEN: usize = 16;

/// The secret that unlocks the admin routes. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token from its text, trimmed of surrounding whitespace (a token
    /// file usually ends with a newline); `None` when nothing is left, since
    /// an empty token would unlock the routes for anyone.
    pub fn new(text: &str) -> Option<AdminToken> {
        let text = text.trim();
        (!text.is_empty()).then(|| AdminToken(text.to_owned()))
    }

    /// Whether the token is shorter than recommended (16 characters).
    pub fn is_short(&self) -> bool {
        self.0.chars().count() < RECOMMENDED_TOKEN_LEN
    }

    /// Whether `presented` is this token ([`subtle::ConstantTimeEq`]): the
    /// time depends on the lengths only, never on where a difference is.
    /// (A length mismatch answers at once; the length of a token is not
    /// what protects it.)
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.as_bytes().ct_eq(presented))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Checks the request's credentials for an admin route.
///
/// - no token configured: [`ApiError::AdminDisabled`] (403);
/// - no `Authorization` header, or not `Bearer <token>`:
///   [`ApiError::Unauthorized`] (401, with `WWW-Authenticate: Bearer`);
/// - a token that does not match: [`ApiError::Forbidden`] (403).
pub(crate) fn authorize(token: Option<&AdminToken>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = token else {
        return Err(ApiError::AdminDisabled);
    };
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(ApiError::Unauthorized {
            detail:
                "Missing or repeated Authorization header; send 'Authorization: Bearer <token>'"
                    .into(),
        });
    };
    let value = value.as_bytes();
    let scheme_len = b"Bearer ".len();
    let credentials = match value.get(..scheme_len) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"Bearer ") => value[scheme_len..].trim_ascii(),
        _ => {
            return Err(ApiError::Unauthorized {
                detail: "Malformed Authorization header: expected 'Bearer <token>'".into(),
            });
        }
    };
    if credentials.is_empty() {
        return Err(ApiError::Unauthorized {
            detail: "Malformed Authorization header: the bearer token is empty".into(),
        });
    }
    if token.matches(credentials) {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn equal_means_same_bytes_and_same_length() {
        let token = AdminToken::new("secret-token").unwrap();
        assert!(token.matches(b"secret-token"));
        assert!(!token.matches(b"secret-tokem"));
        assert!(!token.matches(b"Secret-token"));
        assert!(!token.matches(b"secret-token2"));
        assert!(!token.matches(b"secret-toke"));
        assert!(!token.matches(b""));
        assert!(!token.matches(b" secret-token"));
        // A presented prefix or extension never matches, whatever the
        // byte in the differing position.
        let one = AdminToken::new("a").unwrap();
        for b in 0..=255u8 {
            assert_eq!(one.matches(&[b]), b == b'a', "{b}");
            assert!(!one.matches(&[b'a', b]), "{b}");
        }
        // Multi-byte text is compared as bytes.
        let unicode = AdminToken::new("tök€n").unwrap();
        assert!(unicode.matches("tök€n".as_bytes()));
        assert!(!unicode.matches("tok€n".as_bytes()));
    }

    #[test]
    fn tokens_are_trimmed_never_empty_and_never_printed() {
        assert_eq!(AdminToken::new(""), None);
        assert_eq!(AdminToken::new(" \n\t"), None);
        let token = AdminToken::new("  s3cr3t-but-short\n").unwrap();
        assert!(token.matches(b"s3cr3t-but-short"));
        assert!(!token.is_short());
        assert!(AdminToken::new("short").unwrap().is_short());
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn status(token: Option<&AdminToken>, values: &[&str]) -> u16 {
        match authorize(token, &headers(values)) {
            Ok(()) => 200,
            Err(e) => e.status().as_u16(),
        }
    }

    #[test]
    fn the_auth_matrix() {
        let token = AdminToken::new("correct horse battery staple").unwrap();
        let t = Some(&token);
        // Disabled whatever is sent.
        assert_eq!(status(None, &[]), 403);
        assert_eq!(status(None, &["Bearer correct horse battery staple"]), 403);
        assert!(matches!(
            authorize(None, &headers(&[])),
            Err(ApiError::AdminDisabled)
        ));
        // Missing or malformed: 401.
        assert_eq!(status(t, &[]), 401);
        assert_eq!(status(t, &["Basic dXNlcjpwYXNz"]), 401);
        assert_eq!(status(t, &["Bearer"]), 401);
        assert_eq!(status(t, &["Bearer "]), 401);
        assert_eq!(status(t, &["Bearer    "]), 401);
        assert_eq!(status(t, &["correct horse battery staple"]), 401);
        assert_eq!(
            status(
                t,
                &[
                    "Bearer correct horse battery staple",
                    "Bearer correct horse battery staple"
                ]
            ),
            401
        );
        // Wrong token: 403.
        assert_eq!(status(t, &["Bearer wrong"]), 403);
        assert_eq!(status(t, &["Bearer correct horse battery stapl"]), 403);
        assert_eq!(status(t, &["Bearer correct horse battery staple!"]), 403);
        assert!(matches!(
            authorize(t, &headers(&["Bearer nope"])),
            Err(ApiError::Forbidden)
        ));
        // Right token; the scheme is case-insensitive (RFC 7235).
        assert_eq!(status(t, &["Bearer correct horse battery staple"]), 200);
        assert_eq!(status(t, &["bearer correct horse battery staple"]), 200);
        assert_eq!(status(t, &["BEARER correct horse battery staple  "]), 200);
    }

    #[test]
    fn non_text_header_bytes_are_just_wrong() {
        let token = AdminToken::new("tok").unwrap();
        let mut map = HeaderMap::new();
        map.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        );
        assert!(matches!(
            authorize(Some(&token), &map),
            Err(ApiError::Forbidden)
        ));
    }
}
