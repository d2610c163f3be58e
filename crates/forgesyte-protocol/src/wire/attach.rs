//! Attachments in JSON: a message names, for each attachment, the JSON
//! Pointer (RFC 6901) of the place its bytes belong to in the payload.
//! A runtime whose plugins take bytes puts them there as bytes; one whose
//! plugins take JSON only (the native ABI 1) puts them there as base64
//! strings, which is also what the host does for HTTP answers.

use serde_json::Value;

/// Why an attachment could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerError {
    /// The pointer.
    pub pointer: String,
    /// What is wrong.
    pub detail: &'static str,
}

impl std::fmt::Display for PointerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "attachment pointer {:?}: {}", self.pointer, self.detail)
    }
}

impl std::error::Error for PointerError {}

/// Puts `value` at `pointer` in `root`: the empty pointer replaces the
/// root; otherwise the parent must exist and be an object (the key is
/// inserted or replaced) or an array (an existing index is replaced).
pub fn place(root: &mut Value, pointer: &str, value: Value) -> Result<(), PointerError> {
    let err = |detail| PointerError {
        pointer: pointer.to_owned(),
        detail,
    };
    if pointer.is_empty() {
        *root = value;
        return Ok(());
    }
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return Err(err("does not start with '/'"));
    };
    let key = last.replace("~1", "/").replace("~0", "~");
    let parent = if parent.is_empty() {
        Some(root)
    } else {
        root.pointer_mut(parent)
    };
    match parent {
        Some(Value::Object(map)) => {
            map.insert(key, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            // RFC 6901: an index is "0" or digits without a leading zero.
            let canonical = key == "0"
                || (!key.is_empty()
                    && !key.starts_with('0')
                    && key.bytes().all(|b| b.is_ascii_digit()));
            let slot = canonical
                .then(|| key.parse::<usize>().ok())
                .flatten()
                .and_then(|i| items.get_mut(i))
                .ok_or_else(|| err("names no element of its array"))?;
            *slot = value;
            Ok(())
        }
        Some(_) => Err(err("its parent is neither an object nor an array")),
        None => Err(err("its parent does not exist")),
    }
}

/// The most tokens a binary result's pointer may have: one more than the
/// deepest JSON a result can be read as (`serde_json` nests at most 128
/// levels), so a deeper pointer names no place in any result.
pub const MAX_POINTER_TOKENS: usize = 129;

/// Why two binary results cannot both be placed, or one cannot at all,
/// found before any is placed ([`conflict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaceConflict<'a> {
    /// This pointer names the place of another, or lies inside it: their
    /// bytes would overwrite each other.
    Overlapping(&'a str),
    /// This pointer has more than [`MAX_POINTER_TOKENS`] tokens.
    TooDeep(&'a str),
}

impl std::fmt::Display for PlaceConflict<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlaceConflict::Overlapping(pointer) => write!(
                f,
                "two binary results at {pointer:?} (one in the place of another)"
            ),
            PlaceConflict::TooDeep(pointer) => write!(
                f,
                "a binary result's pointer {:?} has more than {MAX_POINTER_TOKENS} tokens",
                Prefix(pointer)
            ),
        }
    }
}

/// The start of a pointer too long to quote whole.
struct Prefix<'a>(&'a str);

impl std::fmt::Debug for Prefix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 64;
        match self.0.char_indices().nth(SHOWN) {
            Some((end, _)) => write!(f, "{:?}…", &self.0[..end]),
            None => write!(f, "{:?}", self.0),
        }
    }
}

/// A pointer of `binary` (binary results, by JSON pointer) that another
/// one names too, or lies inside (their bytes would overwrite each other),
/// or one too deep to name any place. Pointers are compared as the places
/// they name (each token decoded as [`place`] decodes it: `/~2` and `/~02`
/// both name the key `~2`). The host refuses such results; the SDK finds
/// them first. Of two pointers in one place, the later one is named; of a
/// place and one inside it, the one inside.
///
/// Sorted, the places inside a place follow it at once, so comparing
/// neighbours finds every overlap: the work is that of the sort, whatever
/// the pointers hold.
pub fn conflict<B>(binary: &[(String, B)]) -> Option<PlaceConflict<'_>> {
    use std::borrow::Cow;
    if let Some((pointer, _)) = binary
        .iter()
        .find(|(p, _)| p.bytes().filter(|&b| b == b'/').count() > MAX_POINTER_TOKENS)
    {
        return Some(PlaceConflict::TooDeep(pointer));
    }
    if binary.len() < 2 {
        return None;
    }
    fn tokens(pointer: &str) -> Vec<Cow<'_, str>> {
        pointer
            .split('/')
            .skip(1)
            .map(|t| {
                if t.contains('~') {
                    Cow::Owned(t.replace("~1", "/").replace("~0", "~"))
                } else {
                    Cow::Borrowed(t)
                }
            })
            .collect()
    }
    let mut places: Vec<(Vec<Cow<'_, str>>, usize)> = binary
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (tokens(p), i))
        .collect();
    places.sort_unstable();
    places
        .windows(2)
        .filter(|pair| pair[1].0.starts_with(&pair[0].0))
        .map(|pair| pair[1].1)
        .min()
        .map(|i| PlaceConflict::Overlapping(&binary[i].0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_results_in_one_anothers_place_are_found() {
        let of = |pointers: &[&str]| {
            let binary: Vec<(String, ())> =
                pointers.iter().map(|p| ((*p).to_owned(), ())).collect();
            conflict(&binary).map(|c| match c {
                PlaceConflict::Overlapping(p) => p.to_owned(),
                PlaceConflict::TooDeep(p) => format!("too deep: {p}"),
            })
        };
        assert_eq!(of(&[]), None);
        assert_eq!(of(&["/a"]), None);
        assert_eq!(of(&["/a", "/b", "/a0", "/a-b/c", "/ab"]), None);
        assert_eq!(of(&["/1", "/1"]).as_deref(), Some("/1"));
        assert_eq!(of(&["/a/b", "/a-b/c", "/a"]).as_deref(), Some("/a/b"));
        assert_eq!(of(&["", "/x"]).as_deref(), Some("/x"));
        // The same place spelled twice.
        assert_eq!(of(&["/~2", "/~02"]).as_deref(), Some("/~02"));
        assert_eq!(of(&["/a~0/b", "/a~"]).as_deref(), Some("/a~0/b"));
        assert_eq!(of(&["/x~1y", "/x/y"]), None);
        // Deep, but not too deep; then too deep, even alone.
        let deep = "/a".repeat(MAX_POINTER_TOKENS);
        assert_eq!(of(&[&deep, "/b"]), None);
        assert_eq!(of(&["/a", &deep]).as_deref(), Some(deep.as_str()));
        let too_deep = format!("{deep}/a");
        assert_eq!(of(&[&too_deep]), Some(format!("too deep: {too_deep}")));
    }

    /// A hostile runner's pointers cost the sort of them, not the square
    /// of their depth: a megabyte of slashes is refused at once, and many
    /// pointers as deep as allowed are compared quickly.
    #[test]
    fn hostile_pointers_are_checked_in_little_time() {
        let slashes = format!("/b{}", "/".repeat(1 << 20));
        let started = std::time::Instant::now();
        let binary = vec![("/a".to_owned(), ()), (slashes, ())];
        assert!(matches!(conflict(&binary), Some(PlaceConflict::TooDeep(_))));
        let deep: Vec<(String, ())> = (0..10_000)
            .map(|i| (format!("{}/{i}", "/x".repeat(MAX_POINTER_TOKENS - 1)), ()))
            .collect();
        assert_eq!(conflict(&deep), None);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    use crate::wire::strategies;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn values_are_placed_where_the_pointer_says() {
        let mut v = json!({"image": null, "list": [0, 1], "a/b": {}});
        place(&mut v, "/image", json!("AAE=")).unwrap();
        place(&mut v, "/list/1", json!("x")).unwrap();
        place(&mut v, "/a~1b/c~0d", json!(1)).unwrap();
        assert_eq!(
            v,
            json!({"image": "AAE=", "list": [0, "x"], "a/b": {"c~d": 1}})
        );
        place(&mut v, "", json!("all")).unwrap();
        assert_eq!(v, json!("all"));
    }

    #[test]
    fn bad_pointers_are_errors() {
        let mut v = json!({"list": [0], "n": 1});
        for p in [
            "image",
            "/missing/x",
            "/list/5",
            "/list/x",
            "/n/x",
            "/list/+0",
            "/list/00",
        ] {
            assert!(place(&mut v, p, json!(null)).is_err(), "{p}");
        }
    }

    /// Pointers made of the pieces that matter: separators, escapes (valid,
    /// in either order, and not), indices (canonical and not), message keys,
    /// anything.
    fn pointer() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            2 => prop::sample::select(&["~0", "~1", "~01", "~10", "~2", "~", "a~1b", "x~0"][..])
                .prop_map(str::to_owned),
            1 => prop::sample::select(strategies::KEYS).prop_map(str::to_owned),
            1 => prop::sample::select(&["0", "1", "5", "00", "+1", "-1", "18446744073709551616"][..])
                .prop_map(str::to_owned),
            1 => ".{0,4}",
        ];
        prop_oneof![
            4 => prop::collection::vec(token, 1..4).prop_map(|t| t.iter().map(|t| format!("/{t}")).collect()),
            1 => ".{0,12}",
        ]
    }

    /// A root that is an object or an array half of the time, so that
    /// pointers find parents.
    fn root() -> impl Strategy<Value = Value> {
        prop_oneof![
            strategies::json(),
            prop::collection::vec(strategies::json(), 0..3).prop_map(Value::Array),
            prop::collection::vec((".{0,3}", strategies::json()), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    }

    proptest! {
        // 256 cases (the default), well under a second.
        /// Any pointer into any value: placed where reading the same pointer
        /// finds it, or refused naming the pointer.
        #[test]
        fn any_pointer_is_placed_or_refused_by_name(mut root in root(), pointer in pointer()) {
            let marker = json!({"placed": pointer});
            match place(&mut root, &pointer, marker.clone()) {
                Ok(()) => prop_assert_eq!(root.pointer(&pointer), Some(&marker), "{}", pointer),
                Err(e) => {
                    prop_assert_eq!(&e.pointer, &pointer);
                    prop_assert!(e.to_string().contains(&format!("{pointer:?}")), "{}", e);
                }
            }
        }
    }
}
