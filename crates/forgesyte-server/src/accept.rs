//! The media ranges of a request's `Accept` header and their weights (RFC
//! 9110 §12.5.1), for the routes that answer in more than one
//! representation: a tool run's success ([`crate::answer`]) and `/metrics`.
//! A leaf: it knows the header's syntax, nothing of what a route makes.

use axum::http::HeaderMap;
use axum::http::header::ACCEPT;

/// A range's weight (`q`, 0 to 1) and its position in the header.
pub(crate) type Weight = (f32, usize);

/// The media ranges of every `Accept` header of a request, in order, each
/// with its weight; `q=0` ranges included: they exclude what they match.
#[derive(Debug, Default)]
pub(crate) struct Accept {
    /// (essence in lower case, weight, position)
    ranges: Vec<(String, f32, usize)>,
}

impl Accept {
    /// The ranges of `headers`' `Accept` values. A value that is not text,
    /// a range with no type, or a weight that is not a number from 0 to 1
    /// is left out.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut ranges: Vec<(String, f32, usize)> = Vec::new();
        for value in headers.get_all(ACCEPT) {
            let Ok(text) = value.to_str() else { continue };
            for range in split_unquoted(text, ',') {
                let mut params = split_unquoted(range, ';');
                let essence = params
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase();
                // The weight, `q` or `Q` (parameter names are
                // case-insensitive).
                let q = params
                    .filter_map(|p| p.split_once('='))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                    .map_or(Some(1.0), |(_, q)| {
                        q.trim()
                            .parse::<f32>()
                            .ok()
                            .filter(|q| (0.0..=1.0).contains(q))
                    });
                if let Some(q) = q
                    && !essence.is_empty()
                {
                    ranges.push((essence, q, ranges.len()));
                }
            }
        }
        Accept { ranges }
    }

    /// The weight of a representation that `types` match, most specific
    /// first (`["text/plain", "text/*", "*/*"]`): the most specific range
    /// that names one of them, of equal ones the first given (RFC 9110:
    /// `text/plain;q=0` excludes it whatever `*/*` says). `None`: no range
    /// matches it.
    pub(crate) fn weight(&self, types: &[&str]) -> Option<Weight> {
        self.ranges
            .iter()
            .filter_map(|(essence, q, at)| {
                let specific = types.iter().position(|t| t == essence)?;
                Some((specific, *q, *at))
            })
            .min_by_key(|(specific, _, at)| (*specific, *at))
            .map(|(_, q, at)| (q, at))
    }
}

/// Whether `weight` refuses its representation (`q=0`).
pub(crate) fn refused(weight: Option<Weight>) -> bool {
    weight.is_some_and(|(q, _)| q == 0.0)
}

/// Of `candidates`, the one with the highest weight above 0; of equal
/// ones, the one whose range was given first. `None`: none is acceptable.
pub(crate) fn preferred<T>(candidates: impl IntoIterator<Item = (T, Option<Weight>)>) -> Option<T> {
    candidates
        .into_iter()
        .filter_map(|(candidate, weight)| weight.map(|(q, at)| (candidate, q, at)))
        .filter(|(_, q, _)| *q > 0.0)
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.2.cmp(&a.2)))
        .map(|(candidate, _, _)| candidate)
}

/// `text` split at `separator` where it is not inside a quoted string (a
/// media range's parameter may quote a comma or a semicolon).
fn split_unquoted(text: &str, separator: char) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut escaped = false;
    text.split(move |c: char| {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == separator && !quoted {
            return true;
        }
        false
    })
}

/// Headers of one `Accept` value each of `values`, for tests.
#[cfg(test)]
pub(crate) fn accept_headers(values: &[&str]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for value in values {
        headers.append(
            ACCEPT,
            axum::http::HeaderValue::from_str(value).expect("a test's header value"),
        );
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(values: &[&str]) -> Accept {
        Accept::of(&accept_headers(values))
    }

    #[test]
    fn the_most_specific_range_weighs_and_quotes_hide_separators() {
        let a = accept(&[
            r#"text/*;q=0.2, Text/Plain;foo="a,b;q=0";Q=0.7"#,
            "*/*;q=0.1",
        ]);
        assert_eq!(a.weight(&["text/plain", "text/*", "*/*"]), Some((0.7, 1)));
        assert_eq!(a.weight(&["text/html", "text/*", "*/*"]), Some((0.2, 0)));
        assert_eq!(a.weight(&["image/png", "image/*", "*/*"]), Some((0.1, 2)));
        assert_eq!(a.weight(&["image/png", "image/*"]), None);
        // A weight that is not a number from 0 to 1 drops its range.
        let a = accept(&["text/plain;q=2, text/plain;q=x, text/plain;q=0.3"]);
        assert_eq!(a.weight(&["text/plain"]), Some((0.3, 0)));
    }

    #[test]
    fn preferred_is_the_heaviest_then_the_first_and_never_a_refused_one() {
        let a = accept(&["b;q=0.5, a;q=0.5, c;q=0"]);
        let pick = |names: &[&'static str]| preferred(names.iter().map(|n| (*n, a.weight(&[n]))));
        assert_eq!(pick(&["a", "b"]), Some("b"));
        assert_eq!(pick(&["c", "a"]), Some("a"));
        assert_eq!(pick(&["c", "d"]), None);
        assert!(refused(a.weight(&["c"])));
        assert!(!refused(a.weight(&["d"])));
    }
}
