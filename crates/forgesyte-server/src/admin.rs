//! The admin token that guards the reload routes, and the check of a
//! request's `Authorization` header against it.
//!
//! The routes are disabled unless a token is configured
//! (`FORGESYTE_ADMIN_TOKEN`, or `--admin-token-file`). A request then needs
//! `Authorization: Bearer <token>`; the comparison is `subtle`'s
//! constant-time equality, which takes the same time wherever the first
//! differing byte is, so response times do not leak the token byte by byte.
//!
//! [`AdminGate`] adds a brake on guessing: an address that presented
//! [`MAX_FAILURES`] wrong tokens within [`FAILURE_WINDOW`] is answered 429
//! (with `Retry-After`) until that window has passed, its attempts not even
//! checked, unless the configured token looks random and long
//! ([`AdminToken::is_strong`]: [`STRONG_TOKEN_LEN`] characters or more, of
//! 8 different ones at least, none of them a quarter of the token): then
//! the right token still passes, so wrong tokens from one client cannot
//! lock the operator out (every loopback client is one client), and
//! guessing such a token is hopeless at any rate. Length alone is no
//! strength (`aaaa…`, `adminadmin…`): such a token keeps the brake. The
//! bookkeeping is a small map by address, hand-written: the rate-limiting
//! crates count requests, not failures, and cannot refuse an address
//! without charging it.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Wrong tokens an address may present within [`FAILURE_WINDOW`].
pub(crate) const MAX_FAILURES: u32 = 5;
/// The window over which wrong tokens are counted, from the first one.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most: beyond it, expired ones are forgotten
/// first, then the one whose window started first.
const MAX_TRACKED: usize = 4096;

/// Tokens shorter than this are accepted, with a warning at startup.
pub(crate) const RECOMMENDED_TOKEN_LEN: usize = 16;
/// Tokens this long or longer, and varied ([`AdminToken::is_strong`];
/// `openssl rand -hex 32` makes 64 characters), pass through a lockout: a
/// random token that long is not guessed at any request rate, so the
/// lockout need not refuse the right one.
pub(crate) const STRONG_TOKEN_LEN: usize = 32;
/// The fewest different characters of a strong token.
const STRONG_TOKEN_DISTINCT: usize = 8;

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

    /// Whether the token is long and varied enough to be accepted from a
    /// client that is locked out: 32 characters or more, at least 8
    /// different ones, none of them more than a quarter of the token. (A
    /// random hex token of 32 characters fails this about once in 600;
    /// one of 64 about once in 200,000.)
    pub fn is_strong(&self) -> bool {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() < STRONG_TOKEN_LEN {
            return false;
        }
        let mut counts: HashMap<char, usize> = HashMap::new();
        for c in &chars {
            *counts.entry(*c).or_default() += 1;
        }
        counts.len() >= STRONG_TOKEN_DISTINCT && counts.values().all(|&n| n <= chars.len() / 4)
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

/// Whose wrong tokens an address's are: an IPv4 address's own (an
/// IPv4-mapped IPv6 address is its IPv4 address); an IPv6 address's /64,
/// since one client holds a whole /64 and could try 5 tokens a minute from
/// each of its addresses; every loopback address one key, for the same
/// reason (any local process can send from all of 127.0.0.0/8 and `::1`).
fn client_key(ip: IpAddr) -> IpAddr {
    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    if ip.is_loopback() || ip.to_canonical().is_loopback() {
        return LOOPBACK;
    }
    crate::conn::client_of(ip)
}

/// The admin routes' gate: the token and the count of wrong tokens per
/// client (an IPv4 address, an IPv6 /64).
#[derive(Debug)]
pub(crate) struct AdminGate {
    token: Option<AdminToken>,
    failures: Mutex<HashMap<Option<IpAddr>, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

impl AdminGate {
    pub(crate) fn new(token: Option<AdminToken>) -> AdminGate {
        AdminGate {
            token,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// [`authorize`], unless `peer` (the client's address; `None` when
    /// unknown, one bucket for all such clients) presented too many wrong
    /// tokens lately: then [`ApiError::TooManyAttempts`]. A wrong token
    /// counts against its address; the right one clears the count.
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), ApiError> {
        if self.token.is_none() {
            return Err(ApiError::AdminDisabled);
        }
        let peer = peer.map(client_key);
        // One critical section from the look-up to the count: concurrent
        // guesses from one address cannot all pass the look-up before any
        // of them is counted (the comparison is a few hundred nanoseconds).
        let mut failures = self.failures();
        if !failures.contains_key(&peer) && failures.len() >= MAX_TRACKED {
            let expired = |f: &Failures| now.saturating_duration_since(f.since) >= FAILURE_WINDOW;
            failures.retain(|_, f| !expired(f));
            // Every client remembered is locked: a new one is refused as
            // locked until the first lock ends (forgetting a locked one
            // would unlock it; not counting the new one would let it guess
            // freely). Fails closed, for the right token too.
            if failures.len() >= MAX_TRACKED
                && let Some(first) = failures.values().map(|f| f.since).min()
                && failures.values().all(|f| f.count >= MAX_FAILURES)
            {
                let left = FAILURE_WINDOW.saturating_sub(now.saturating_duration_since(first));
                return self.locked(headers, left);
            }
        }
        if let Some(f) = failures.get(&peer) {
            let elapsed = now.saturating_duration_since(f.since);
            if f.count >= MAX_FAILURES && elapsed < FAILURE_WINDOW {
                return self.locked(headers, FAILURE_WINDOW - elapsed);
            }
        }
        match authorize(self.token.as_ref(), headers) {
            Ok(()) => {
                failures.remove(&peer);
                Ok(())
            }
            Err(ApiError::Forbidden) => {
                record_failure(&mut failures, peer, now);
                Err(ApiError::Forbidden)
            }
            Err(other) => Err(other),
        }
    }

    /// The answer to a client that is locked out for `left` more: 429,
    /// unless the token is strong and the request presents it. (A wrong
    /// token is not counted again: the lock stands as it is.)
    fn locked(&self, headers: &HeaderMap, left: Duration) -> Result<(), ApiError> {
        if let Some(token) = &self.token
            && token.is_strong()
            && authorize(Some(token), headers).is_ok()
        {
            return Ok(());
        }
        Err(ApiError::TooManyAttempts {
            retry_after_s: crate::respond::seconds_up(left),
        })
    }

    /// The wrong tokens `peer`'s client presented in its current window.
    pub(crate) fn failures_of(&self, peer: Option<IpAddr>, now: Instant) -> u32 {
        self.failures()
            .get(&peer.map(client_key))
            .filter(|f| now.saturating_duration_since(f.since) < FAILURE_WINDOW)
            .map_or(0, |f| f.count)
    }

    /// The map (a panic while it was held leaves it usable: its entries
    /// are only counts).
    fn failures(&self) -> MutexGuard<'_, HashMap<Option<IpAddr>, Failures>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a wrong token against `peer`, in the map the caller holds.
fn record_failure(
    failures: &mut HashMap<Option<IpAddr>, Failures>,
    peer: Option<IpAddr>,
    now: Instant,
) {
    let expired = |f: &Failures| now.saturating_duration_since(f.since) >= FAILURE_WINDOW;
    if !failures.contains_key(&peer) && failures.len() >= MAX_TRACKED {
        failures.retain(|_, f| !expired(f));
        // The oldest address not locked goes: forgetting a locked one would
        // unlock it (`check` refuses a new client when all are locked).
        if failures.len() >= MAX_TRACKED
            && let Some(oldest) = failures
                .iter()
                .min_by_key(|(_, f)| (f.count >= MAX_FAILURES, f.since))
                .map(|(k, _)| *k)
        {
            failures.remove(&oldest);
        }
    }
    let entry = failures.entry(peer).or_insert(Failures {
        count: 0,
        since: now,
    });
    if expired(entry) {
        *entry = Failures {
            count: 0,
            since: now,
        };
    }
    entry.count += 1;
}

#[cfg(test)]
mod gate_tests {
    use axum::http::HeaderValue;

    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        map
    }

    fn gate() -> AdminGate {
        AdminGate::new(AdminToken::new("the-right-token-123"))
    }

    #[test]
    fn wrong_tokens_lock_an_address_out_for_the_rest_of_the_window() {
        let gate = gate();
        let t0 = Instant::now();
        let attacker = Some(IpAddr::from([10, 0, 0, 1]));
        let other = Some(IpAddr::from([10, 0, 0, 2]));
        for i in 0..MAX_FAILURES {
            let at = t0 + Duration::from_secs(u64::from(i));
            assert!(matches!(
                gate.check(&bearer("guess"), attacker, at),
                Err(ApiError::Forbidden)
            ));
        }
        // Locked: even the right token is not checked, until the window
        // that began with the first failure ends.
        let at = t0 + Duration::from_secs(10);
        match gate.check(&bearer("the-right-token-123"), attacker, at) {
            Err(ApiError::TooManyAttempts { retry_after_s }) => assert_eq!(retry_after_s, 50),
            other => panic!("{other:?}"),
        }
        // Another address is not affected.
        assert!(
            gate.check(&bearer("the-right-token-123"), other, at)
                .is_ok()
        );
        // After the window, the right token works and clears the count.
        let later = t0 + FAILURE_WINDOW;
        assert!(
            gate.check(&bearer("the-right-token-123"), attacker, later)
                .is_ok()
        );
        assert!(matches!(
            gate.check(&bearer("guess"), attacker, later),
            Err(ApiError::Forbidden)
        ));
    }

    #[test]
    fn a_strong_token_passes_a_lockout_that_still_refuses_guesses() {
        let strong = "0123456789abcdef0123456789abcdef";
        assert_eq!(strong.len(), STRONG_TOKEN_LEN);
        let gate = AdminGate::new(AdminToken::new(strong));
        let now = Instant::now();
        // Every loopback address is one client: a local process's guesses
        // lock out the operator's own loopback client.
        let guesser = Some(IpAddr::from([127, 0, 0, 2]));
        let operator = Some(IpAddr::from([127, 0, 0, 1]));
        for _ in 0..MAX_FAILURES {
            let _ = gate.check(&bearer("guess"), guesser, now);
        }
        let at = now + Duration::from_secs(1);
        assert!(matches!(
            gate.check(&bearer("guess"), guesser, at),
            Err(ApiError::TooManyAttempts { retry_after_s: 59 })
        ));
        assert!(matches!(
            gate.check(&bearer(&strong[1..]), operator, at),
            Err(ApiError::TooManyAttempts { .. })
        ));
        assert!(gate.check(&bearer(strong), operator, at).is_ok());
        // The right token does not lift the lock: the guesses stay refused
        // (429, not even checked) until the window ends.
        assert!(matches!(
            gate.check(&bearer("guess"), guesser, at),
            Err(ApiError::TooManyAttempts { .. })
        ));
        assert_eq!(gate.failures_of(guesser, at), MAX_FAILURES);
        // One character shorter is not strong, nor is length without
        // variety: the lock refuses them too.
        let repeated = "a".repeat(64);
        let words = "adminadminadminadminadminadminadmin";
        for weaker in [&strong[1..], repeated.as_str(), words] {
            assert!(!AdminToken::new(weaker).unwrap().is_strong(), "{weaker}");
            let gate = AdminGate::new(AdminToken::new(weaker));
            for _ in 0..MAX_FAILURES {
                let _ = gate.check(&bearer("guess"), guesser, now);
            }
            assert!(matches!(
                gate.check(&bearer(weaker), operator, at),
                Err(ApiError::TooManyAttempts { .. })
            ));
        }
    }

    #[test]
    fn a_strong_token_passes_while_every_client_remembered_is_locked() {
        let strong = "correct horse battery staple, stapled twice";
        let gate = AdminGate::new(AdminToken::new(strong));
        let now = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            let peer = Some(IpAddr::from((0x0b00_0000 + i).to_be_bytes()));
            for _ in 0..MAX_FAILURES {
                let _ = gate.check(&bearer("guess"), peer, now);
            }
        }
        let new = Some(IpAddr::from([10, 9, 9, 9]));
        assert!(matches!(
            gate.check(&bearer("guess"), new, now),
            Err(ApiError::TooManyAttempts { .. })
        ));
        assert!(gate.check(&bearer(strong), new, now).is_ok());
    }

    #[test]
    fn an_ipv6_clients_addresses_share_its_64_and_a_mapped_ipv4_its_address() {
        let gate = gate();
        let now = Instant::now();
        // One client, a new address of its /64 for every guess.
        for i in 0..MAX_FAILURES {
            let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, 1 + i as u16);
            let _ = gate.check(&bearer("guess"), Some(IpAddr::V6(ip)), now);
        }
        let next = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0xffff, 1, 2, 3);
        assert!(matches!(
            gate.check(&bearer("guess"), Some(IpAddr::V6(next)), now),
            Err(ApiError::TooManyAttempts { .. })
        ));
        // Another /64 is another client.
        let elsewhere = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 8, 0, 0, 0, 1);
        assert!(
            gate.check(
                &bearer("the-right-token-123"),
                Some(IpAddr::V6(elsewhere)),
                now
            )
            .is_ok()
        );
        // An IPv4 address is the same client over IPv6 (mapped).
        let v4 = std::net::Ipv4Addr::new(192, 0, 2, 9);
        for _ in 0..MAX_FAILURES {
            let _ = gate.check(&bearer("guess"), Some(IpAddr::V4(v4)), now);
        }
        assert!(matches!(
            gate.check(&bearer("guess"), Some(IpAddr::V6(v4.to_ipv6_mapped())), now),
            Err(ApiError::TooManyAttempts { .. })
        ));
    }

    #[test]
    fn failures_spread_over_more_than_a_window_never_lock() {
        let gate = gate();
        let t0 = Instant::now();
        let peer = Some(IpAddr::from([10, 0, 0, 3]));
        for i in 0..(3 * MAX_FAILURES) {
            let at = t0 + Duration::from_secs(u64::from(i) * 20);
            assert!(
                matches!(
                    gate.check(&bearer("guess"), peer, at),
                    Err(ApiError::Forbidden)
                ),
                "attempt {i}"
            );
        }
    }

    #[test]
    fn concurrent_guesses_from_one_address_get_no_more_than_their_share() {
        // Guesses that arrive together must not all pass the look-up
        // before any of them is counted. Many rounds, since each is a race.
        const THREADS: usize = 16;
        let now = Instant::now();
        for round in 0..200u32 {
            let gate = gate();
            let peer = Some(IpAddr::from(round.to_be_bytes()));
            let start = std::sync::Barrier::new(THREADS);
            let checked = std::thread::scope(|scope| {
                let threads: Vec<_> = (0..THREADS)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            gate.check(&bearer("guess"), peer, now)
                        })
                    })
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.join().unwrap())
                    .filter(|answer| matches!(answer, Err(ApiError::Forbidden)))
                    .count()
            });
            assert_eq!(checked, MAX_FAILURES as usize, "round {round}");
        }
    }

    #[test]
    fn a_missing_header_is_not_a_guess_and_no_token_disables() {
        let gate = gate();
        let now = Instant::now();
        for _ in 0..(2 * MAX_FAILURES) {
            assert!(matches!(
                gate.check(&HeaderMap::new(), None, now),
                Err(ApiError::Unauthorized { .. })
            ));
        }
        assert!(
            gate.check(&bearer("the-right-token-123"), None, now)
                .is_ok()
        );
        assert!(matches!(
            AdminGate::new(None).check(&bearer("x"), None, now),
            Err(ApiError::AdminDisabled)
        ));
    }

    /// Any local process sends from all of 127.0.0.0/8 and `::1`: one
    /// client (1,000 guesses from 200 loopback addresses got no 429).
    #[test]
    fn every_loopback_address_is_one_client() {
        let gate = gate();
        let now = Instant::now();
        for i in 0..MAX_FAILURES {
            let ip = IpAddr::from([127, 9, i as u8, 1]);
            let _ = gate.check(&bearer("guess"), Some(ip), now);
        }
        for local in [IpAddr::from([127, 200, 0, 7]), "::1".parse().unwrap()] {
            assert!(
                matches!(
                    gate.check(&bearer("guess"), Some(local), now),
                    Err(ApiError::TooManyAttempts { .. })
                ),
                "{local}"
            );
        }
        assert!(
            gate.check(
                &bearer("the-right-token-123"),
                Some(IpAddr::from([10, 0, 0, 9])),
                now
            )
            .is_ok()
        );
    }

    /// Room for a new address is never made by forgetting a locked one
    /// (which would unlock it).
    #[test]
    fn a_locked_address_is_not_forgotten_to_make_room() {
        let gate = gate();
        let t0 = Instant::now();
        let locked = Some(IpAddr::from([10, 1, 1, 1]));
        for _ in 0..MAX_FAILURES {
            let _ = gate.check(&bearer("guess"), locked, t0);
        }
        let later = t0 + Duration::from_secs(1);
        for i in 0..(MAX_TRACKED as u32 + 100) {
            let peer = Some(IpAddr::from((0x0b00_0000 + i).to_be_bytes()));
            let _ = gate.check(&bearer("guess"), peer, later);
        }
        assert!(matches!(
            gate.check(&bearer("the-right-token-123"), locked, later),
            Err(ApiError::TooManyAttempts { .. })
        ));
    }

    /// With every client remembered locked, a new one is refused as
    /// locked (the right token too) rather than one of them forgotten.
    #[test]
    fn a_new_client_is_refused_while_every_client_remembered_is_locked() {
        let gate = gate();
        let now = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            let peer = Some(IpAddr::from((0x0b00_0000 + i).to_be_bytes()));
            for _ in 0..MAX_FAILURES {
                let _ = gate.check(&bearer("guess"), peer, now);
            }
        }
        let first = Some(IpAddr::from(0x0b00_0000_u32.to_be_bytes()));
        let new = Some(IpAddr::from([10, 9, 9, 9]));
        let later = now + Duration::from_secs(1);
        match gate.check(&bearer("the-right-token-123"), new, later) {
            Err(ApiError::TooManyAttempts { retry_after_s }) => assert_eq!(retry_after_s, 59),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            gate.check(&bearer("the-right-token-123"), first, later),
            Err(ApiError::TooManyAttempts { .. })
        ));
        // Once the locks end, the new client is served.
        assert!(
            gate.check(&bearer("the-right-token-123"), new, now + FAILURE_WINDOW)
                .is_ok()
        );
    }

    #[test]
    fn the_map_of_addresses_stays_bounded() {
        let gate = gate();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 100) {
            let peer = Some(IpAddr::from(i.to_be_bytes()));
            let _ = gate.check(&bearer("guess"), peer, now);
        }
        assert_eq!(gate.failures().len(), MAX_TRACKED);
    }
}
