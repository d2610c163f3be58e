//! The admin token that guards the reload routes, and the check of a
//! request's `Authorization` header against it.
//!
//! The routes are disabled unless a token is configured
//! (`FORGESYTE_ADMIN_TOKEN`, or `--admin-token-file`). A request then needs
//! `Authorization: Bearer <token>`; the comparison takes the same time
//! wherever the first differing byte is, so response times do not leak the
//! token byte by byte.

use std::fmt;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

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

    /// Whether `presented` is this token, in time that depends only on the
    /// token's length, never on where a difference is.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// `expected == presented`, looking at every byte of `expected` whatever
/// `presented` holds: the time depends on `expected.len()` (fixed for a
/// server) only. A length difference is folded into the result, not
/// returned early.
pub(crate) fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != presented.len());
    for (i, &e) in expected.iter().enumerate() {
        // A missing byte compares as its complement: always different.
        let p = presented.get(i).copied().unwrap_or(!e);
        diff |= e ^ p;
    }
    // Keeps the compiler from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
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
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokem"));
        assert!(!constant_time_eq(b"secret-token", b"Secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-token2"));
        assert!(!constant_time_eq(b"secret-token", b"secret-toke"));
        assert!(!constant_time_eq(b"secret-token", b""));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
        // A prefix padded with the complement trick cannot collide: every
        // byte value in the missing position differs.
        for b in 0..=255u8 {
            assert!(!constant_time_eq(&[b, b], &[b]));
        }
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
