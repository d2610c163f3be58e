//! Framing: how one message (a JSON header and its binary attachments)
//! lies on a byte stream. `PROTOCOL.md` ("Frames") is the normative text.
//!
//! ```text
//! frame := len:u32le body[len]
//! body  := header_len:u32le count:u32le size:u32le[count] header[header_len] attachment[size_0] … attachment[size_count-1]
//! ```
//!
//! `8 + 4·count + header_len + Σ size_i` must equal `len`; anything else is
//! a malformed frame. A reader checks `len` against its limit before it
//! reads (or allocates) the body.
//!
//! Hostile bytes: whatever a peer sends, a reader holds at most `limit`
//! bytes for a frame (reserved once, so a peer that announces `limit` and
//! sends less costs that much until the stream ends), and [`Frame::parse`]
//! allocates at most a table of [`MAX_ATTACHMENTS`] parts beyond it. Property tests beside this
//! code check both, and that arbitrary bytes end in a [`FrameError`].

use std::io::{self, Read, Write};
use std::ops::Range;
use std::sync::Arc;

/// Bytes of the fixed part of a body (`header_len` and `count`).
const FIXED: usize = 8;

/// The most attachments one frame may carry (`PROTOCOL.md` §2): each takes
/// a table entry of some 24 bytes in memory for its 4 on the wire, so a
/// frame of nothing but empty attachments would otherwise make a reader
/// hold six times the frame's size.
pub const MAX_ATTACHMENTS: usize = 65_536;

/// One frame read from a stream: the JSON header and the attachments, as
/// ranges into one buffer (the body is read with a single allocation), or,
/// for attachments that came through shared memory (`PROTOCOL.md` §3.1),
/// read-only mappings of sealed memory files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    body: Vec<u8>,
    header: Range<usize>,
    attachments: Vec<Part>,
}

/// Where one attachment's bytes are.
#[derive(Clone)]
enum Part {
    /// In the body.
    Inline(Range<usize>),
    /// In memory of its own (a mapping of a shared memory file).
    Shared(Arc<dyn AsRef<[u8]> + Send + Sync>),
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Inline(r) => write!(f, "Inline({r:?})"),
            Part::Shared(b) => write!(f, "Shared({} bytes)", (**b).as_ref().len()),
        }
    }
}

impl PartialEq for Part {
    fn eq(&self, other: &Part) -> bool {
        match (self, other) {
            (Part::Inline(a), Part::Inline(b)) => a == b,
            (Part::Shared(a), Part::Shared(b)) => (**a).as_ref() == (**b).as_ref(),
            _ => false,
        }
    }
}

impl Eq for Part {}

impl Frame {
    /// Splits a frame body. Never panics, whatever the bytes.
    pub fn parse(body: Vec<u8>) -> Result<Frame, FrameError> {
        let word = |at: usize| -> Option<usize> {
            let bytes: [u8; 4] = body.get(at..at + 4)?.try_into().ok()?;
            usize::try_from(u32::from_le_bytes(bytes)).ok()
        };
        let (Some(header_len), Some(count)) = (word(0), word(4)) else {
            return Err(FrameError::Malformed {
                detail: format!("a frame body of {} bytes has no header", body.len()),
            });
        };
        let table_end = count
            .checked_mul(4)
            .and_then(|t| t.checked_add(FIXED))
            .filter(|&end| end <= body.len())
            .ok_or_else(|| FrameError::Malformed {
                detail: format!(
                    "{count} attachments announced in a frame body of {} bytes",
                    body.len()
                ),
            })?;
        if count > MAX_ATTACHMENTS {
            return Err(FrameError::Malformed {
                detail: format!("{count} attachments in one frame (at most {MAX_ATTACHMENTS})"),
            });
        }
        let header = table_end..table_end.saturating_add(header_len);
        let mut at = header.end;
        let mut attachments = Vec::with_capacity(count);
        for i in 0..count {
            let size = word(FIXED + 4 * i).unwrap_or(usize::MAX);
            let end = at.saturating_add(size);
            attachments.push(Part::Inline(at..end));
            at = end;
        }
        if at != body.len() {
            return Err(FrameError::Malformed {
                detail: format!(
                    "the frame's parts add up to {at} bytes, its body holds {}",
                    body.len()
                ),
            });
        }
        Ok(Frame {
            body,
            header,
            attachments,
        })
    }

    /// The JSON header.
    pub fn header(&self) -> &[u8] {
        &self.body[self.header.clone()]
    }

    /// The bytes the frame itself carried (header and inline attachments,
    /// framing included; shared attachments are not in it).
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// How many attachments the frame carries.
    pub fn attachment_count(&self) -> usize {
        self.attachments.len()
    }

    /// Attachment `i`, if there is one.
    pub fn attachment(&self, i: usize) -> Option<&[u8]> {
        self.attachments.get(i).map(|p| self.bytes(p))
    }

    /// Every attachment, in order.
    pub fn attachments(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        self.attachments.iter().map(|p| self.bytes(p))
    }

    /// Whether attachment `i` came through shared memory.
    pub fn is_shared(&self, i: usize) -> bool {
        matches!(self.attachments.get(i), Some(Part::Shared(_)))
    }

    /// Makes `bytes` (e.g. a mapping of a shared memory file) attachment
    /// `i`, whose bytes in the body must be none (a shared attachment's
    /// place in the frame is empty).
    pub fn share(
        &mut self,
        i: usize,
        bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    ) -> Result<(), String> {
        match self.attachments.get_mut(i) {
            Some(part @ Part::Inline(_)) if matches!(&*part, Part::Inline(r) if r.is_empty()) => {
                *part = Part::Shared(bytes);
                Ok(())
            }
            Some(Part::Inline(_)) => {
                Err(format!("shared attachment {i} also has bytes in the frame"))
            }
            Some(Part::Shared(_)) => Err(format!("attachment {i} is shared twice")),
            None => Err(format!(
                "shared attachment {i} of a frame with {} attachments",
                self.attachments.len()
            )),
        }
    }

    fn bytes<'a>(&'a self, part: &'a Part) -> &'a [u8] {
        match part {
            Part::Inline(r) => &self.body[r.clone()],
            Part::Shared(b) => (**b).as_ref(),
        }
    }
}

/// Why no frame could be read.
#[derive(Debug)]
pub enum FrameError {
    /// The stream ended cleanly, between frames.
    Eof,
    /// The announced length is over the reader's limit (the body was not
    /// read).
    TooLarge {
        /// Announced length.
        len: u64,
        /// The reader's limit.
        limit: u64,
    },
    /// The body's parts do not add up.
    Malformed {
        /// What is wrong.
        detail: String,
    },
    /// The stream broke, or ended inside a frame.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Eof => f.write_str("the stream ended"),
            FrameError::TooLarge { len, limit } => {
                write!(
                    f,
                    "a frame of {len} bytes exceeds the limit of {limit} bytes"
                )
            }
            FrameError::Malformed { detail } => write!(f, "malformed frame: {detail}"),
            FrameError::Io(e) => write!(f, "broken stream: {e}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// The largest body a frame can announce (`len` is a `u32`).
pub const MAX_FRAME_BYTES: u64 = u32::MAX as u64;

/// Writes one frame: `header` (JSON bytes) and `attachments`. The prefix
/// and header go out in one write, each attachment in its own (never
/// copied). Callers serialise writers: frames must not interleave.
pub fn write_frame(w: &mut impl Write, header: &[u8], attachments: &[&[u8]]) -> io::Result<()> {
    write_frame_parts(w, &[header], attachments)
}

/// The length field of a frame of a `header_len`-byte header and these
/// attachments, or why no frame can hold them (`InvalidInput`: more than
/// [`MAX_ATTACHMENTS`], or over 4 GiB): what [`write_frame`] checks before
/// it writes anything.
pub fn frame_length(header_len: u64, attachments: &[&[u8]]) -> io::Result<u32> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB");
    if attachments.len() > MAX_ATTACHMENTS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} attachments in one frame (at most {MAX_ATTACHMENTS})",
                attachments.len()
            ),
        ));
    }
    let total = attachments
        .iter()
        .map(|a| a.len() as u64)
        .fold(
            FIXED as u64 + 4 * attachments.len() as u64,
            u64::saturating_add,
        )
        .saturating_add(header_len);
    u32::try_from(total).map_err(|_| too_big())
}

/// [`write_frame`] with a header given in pieces that are written one
/// after the other (e.g. a message's fields around a large JSON payload
/// that is not copied into one buffer first). Only small pieces (under
/// 64 KiB) are gathered into the first write.
pub fn write_frame_parts(
    w: &mut impl Write,
    header: &[&[u8]],
    attachments: &[&[u8]],
) -> io::Result<()> {
    const GATHER: usize = 64 * 1024;
    let header_total: u64 = header.iter().map(|p| p.len() as u64).sum();
    let len = frame_length(header_total, attachments)?;
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB");
    let sizes = attachments
        .iter()
        .map(|a| u32::try_from(a.len()).map_err(|_| too_big()))
        .collect::<io::Result<Vec<u32>>>()?;
    let header_len = u32::try_from(header_total).map_err(|_| too_big())?;
    let count = u32::try_from(attachments.len()).map_err(|_| too_big())?;
    let mut first =
        Vec::with_capacity(12 + 4 * sizes.len() + header_total.min(GATHER as u64) as usize);
    first.extend_from_slice(&len.to_le_bytes());
    first.extend_from_slice(&header_len.to_le_bytes());
    first.extend_from_slice(&count.to_le_bytes());
    for size in &sizes {
        first.extend_from_slice(&size.to_le_bytes());
    }
    let mut rest = header.iter();
    for part in rest.by_ref() {
        if first.len() + part.len() > GATHER {
            w.write_all(&first)?;
            first.clear();
            w.write_all(part)?;
            break;
        }
        first.extend_from_slice(part);
    }
    w.write_all(&first)?;
    for part in rest {
        w.write_all(part)?;
    }
    for attachment in attachments {
        w.write_all(attachment)?;
    }
    w.flush()
}

/// Reads one frame whose body is at most `limit` bytes; a larger one is
/// refused before its body is read.
pub fn read_frame(r: &mut impl Read, limit: u64) -> Result<Frame, FrameError> {
    read_body(r, limit).and_then(Frame::parse)
}

/// The room [`read_body`] reserves for a frame's body before its bytes
/// come; the rest grows with them.
const FIRST_ROOM: usize = 1 << 20;

/// Reads one frame's body (at most `limit` bytes) without splitting it.
pub fn read_body(r: &mut impl Read, limit: u64) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut filled = 0;
    while filled < len.len() {
        match r.read(&mut len[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Eof),
            Ok(0) => {
                return Err(FrameError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ended inside a frame's length",
                )));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u64::from(u32::from_le_bytes(len));
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let size = usize::try_from(len).map_err(|_| FrameError::TooLarge { len, limit })?;
    // Room for what is announced up to `FIRST_ROOM`, then twice as much
    // as each step's bytes came, never past the announced length (fallibly:
    // under a memory limit a frame too large to hold is an error, never an
    // abort). All of an announced 64 MiB reserved at once was made
    // writable before a byte of it came: a peer that announced one and
    // sent a byte a second held 64 MiB of the reader's memory for as long
    // as it liked. Each step reads exactly the room it reserved, so the
    // buffer never grows past the frame (`read_to_end`'s own growth
    // doubled it).
    let mut body: Vec<u8> = Vec::new();
    while body.len() < size {
        let want = size.min(body.capacity().saturating_mul(2).max(FIRST_ROOM));
        body.try_reserve_exact(want - body.len()).map_err(|_| {
            FrameError::Io(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate {len} bytes for a frame"),
            ))
        })?;
        let step = u64::try_from(want - body.len()).unwrap_or(u64::MAX);
        r.by_ref()
            .take(step)
            .read_to_end(&mut body)
            .map_err(FrameError::Io)?;
        if body.len() < want {
            break;
        }
    }
    if body.len() < size {
        return Err(FrameError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the stream ended inside a {len}-byte frame"),
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(header: &[u8], attachments: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, header, attachments).unwrap();
        out
    }

    #[test]
    fn the_byte_layout_is_the_documented_one() {
        let bytes = encode(br#"{"a":1}"#, &[b"xy", b""]);
        let mut expected = Vec::new();
        expected.extend_from_slice(&(8u32 + 8 + 7 + 2).to_le_bytes());
        expected.extend_from_slice(&7u32.to_le_bytes());
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(&0u32.to_le_bytes());
        expected.extend_from_slice(br#"{"a":1}"#);
        expected.extend_from_slice(b"xy");
        assert_eq!(bytes, expected);
        let frame = read_frame(&mut bytes.as_slice(), 1 << 20).unwrap();
        assert_eq!(frame.header(), br#"{"a":1}"#);
        assert_eq!(frame.attachments().collect::<Vec<_>>(), [&b"xy"[..], b""]);
        assert_eq!(frame.attachment(2), None);
    }

    #[test]
    fn a_frame_of_more_attachments_than_the_most_is_malformed() {
        // Well formed but for its count: only empty attachments.
        let body = |count: usize| {
            let mut body = Vec::new();
            body.extend_from_slice(&0u32.to_le_bytes());
            body.extend_from_slice(&u32::try_from(count).unwrap().to_le_bytes());
            body.resize(FIXED + 4 * count, 0);
            body
        };
        let most = Frame::parse(body(MAX_ATTACHMENTS)).unwrap();
        assert_eq!(most.attachments().count(), MAX_ATTACHMENTS);
        // Nor does a writer frame more.
        let empties = vec![&b""[..]; MAX_ATTACHMENTS + 1];
        let refused = write_frame(&mut Vec::new(), b"{}", &empties).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidInput, "{refused}");
        assert!(write_frame(&mut Vec::new(), b"{}", &empties[1..]).is_ok());
        match Frame::parse(body(MAX_ATTACHMENTS + 1)) {
            Err(FrameError::Malformed { detail }) => {
                assert!(detail.contains("at most 65536"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A frame's announced length is not memory handed out before its
    /// bytes come: a peer that announces 64 MiB and sends ten bytes is
    /// read into room of at most [`FIRST_ROOM`] (the whole 64 MiB was
    /// reserved and made writable, held as long as the peer liked).
    #[test]
    fn an_announced_length_is_not_reserved_before_its_bytes_come() {
        struct Dribble {
            sent: Vec<u8>,
            largest_room: usize,
        }
        impl Read for Dribble {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.largest_room = self.largest_room.max(buf.len());
                let n = buf.len().min(self.sent.len()).min(1);
                buf[..n].copy_from_slice(&self.sent[..n]);
                self.sent.drain(..n);
                Ok(n)
            }
        }
        let announced: u32 = 64 << 20;
        let mut sent = announced.to_le_bytes().to_vec();
        sent.extend_from_slice(b"0123456789");
        // Behind a buffer, as the host reads its runners' answers.
        let mut peer = io::BufReader::with_capacity(
            64 * 1024,
            Dribble {
                sent,
                largest_room: 0,
            },
        );
        assert!(read_body(&mut peer, u64::from(announced)).is_err());
        let peer = peer.into_inner();
        assert!(
            peer.largest_room <= FIRST_ROOM,
            "room of {} bytes offered for 10",
            peer.largest_room
        );
        // A whole frame larger than the first room is read whole.
        let body = vec![7u8; FIRST_ROOM * 3 + 5];
        let mut bytes = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let read = read_body(&mut bytes.as_slice(), 64 << 20).unwrap();
        assert_eq!(read, body);
        // Held in room of its size, not of the next power of two.
        assert_eq!(read.capacity(), body.len());
    }

    #[test]
    fn limits_truncation_and_inconsistency_are_errors() {
        let bytes = encode(&[b'x'; 100], &[]);
        assert!(matches!(
            read_frame(&mut bytes.as_slice(), 10),
            Err(FrameError::TooLarge {
                len: 108,
                limit: 10
            })
        ));
        assert!(matches!(
            read_frame(&mut &bytes[..50], 1000),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &bytes[..2], 1000),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &[][..], 1000),
            Err(FrameError::Eof)
        ));
        // A legacy (version 1) frame: length + bare JSON.
        let mut legacy = 13u32.to_le_bytes().to_vec();
        legacy.extend_from_slice(br#"{"type":"x"} "#);
        assert!(matches!(
            read_frame(&mut legacy.as_slice(), 1000),
            Err(FrameError::Malformed { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn frames_round_trip(header in proptest::collection::vec(any::<u8>(), 0..64),
                             atts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..5)) {
            let refs: Vec<&[u8]> = atts.iter().map(Vec::as_slice).collect();
            let bytes = encode(&header, &refs);
            let frame = read_frame(&mut bytes.as_slice(), 1 << 20).unwrap();
            prop_assert_eq!(frame.header(), &header[..]);
            prop_assert_eq!(frame.attachments().collect::<Vec<_>>(), refs);
        }

        #[test]
        fn header_pieces_are_one_header(parts in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..70_000), 0..4)) {
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let mut out = Vec::new();
            write_frame_parts(&mut out, &refs, &[b"att"]).unwrap();
            let frame = read_frame(&mut out.as_slice(), 1 << 20).unwrap();
            prop_assert_eq!(frame.header(), &parts.concat()[..]);
            prop_assert_eq!(frame.attachment(0), Some(&b"att"[..]));
        }
    }

    /// A stream that serves `prefix`, then counts what more is asked of it
    /// (and serves nothing): after a refusal it must not have been asked
    /// for a single byte of the body.
    struct Watched<'a> {
        prefix: &'a [u8],
        asked_after: usize,
    }

    impl Read for Watched<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.prefix.is_empty() {
                self.asked_after += buf.len();
                return Ok(0);
            }
            self.prefix.read(buf)
        }
    }

    /// Every error says what went wrong, in words.
    fn readable(e: &FrameError) -> bool {
        let text = e.to_string();
        text.len() > 10 && !text.contains('\0')
    }

    proptest! {
        // Hostile bytes: 256 cases each (the default), well under a second.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            match Frame::parse(body.clone()) {
                Ok(frame) => {
                    // What it hands out lies inside the body, in order.
                    let total: usize = frame.header().len()
                        + frame.attachments().map(<[u8]>::len).sum::<usize>()
                        + 8 + 4 * frame.attachment_count();
                    prop_assert_eq!(total, body.len());
                }
                Err(e) => prop_assert!(readable(&e), "{e:?}"),
            }
        }

        #[test]
        fn arbitrary_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256),
                                         limit in 0u64..300) {
            let mut r = bytes.as_slice();
            loop {
                match read_body(&mut r, limit) {
                    // Never more than the limit is held, nor reserved.
                    Ok(body) => prop_assert!(body.capacity() as u64 <= limit),
                    Err(FrameError::Eof) => break,
                    Err(e) => {
                        prop_assert!(readable(&e), "{e:?}");
                        break;
                    }
                }
            }
        }

        /// A length over the limit (up to 4 GiB) is refused from the four
        /// bytes of the prefix alone: the body is neither read nor allocated
        /// (the allocation comes after the read of the prefix, only for a
        /// length within the limit).
        #[test]
        fn lengths_over_the_limit_are_refused_before_the_body(len in any::<u32>(), limit in any::<u32>()) {
            prop_assume!(u64::from(len) > u64::from(limit));
            let prefix = len.to_le_bytes();
            let mut r = Watched { prefix: &prefix, asked_after: 0 };
            let err = read_frame(&mut r, u64::from(limit)).unwrap_err();
            prop_assert!(
                matches!(err, FrameError::TooLarge { len: l, limit: m } if l == u64::from(len) && m == u64::from(limit)),
                "{err:?}"
            );
            prop_assert_eq!(r.asked_after, 0);
            prop_assert_eq!(
                err.to_string(),
                format!("a frame of {len} bytes exceeds the limit of {limit} bytes")
            );
        }

        /// A valid frame with bytes flipped or cut short: parsed or refused
        /// with a reason, never a panic, and never an attachment table
        /// larger than the body (a flipped `count` of 4 billion is refused
        /// before its table is allocated).
        #[test]
        fn damaged_frames_are_errors(header in proptest::collection::vec(any::<u8>(), 0..40),
                                     atts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 0..4),
                                     flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
                                     cut in any::<proptest::sample::Index>(),
                                     truncate in any::<bool>()) {
            let refs: Vec<&[u8]> = atts.iter().map(Vec::as_slice).collect();
            let mut bytes = encode(&header, &refs);
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            let mut r = bytes.as_slice();
            match read_frame(&mut r, 1 << 12) {
                Ok(frame) => prop_assert!(frame.attachment_count() <= bytes.len() / 4),
                Err(e) => prop_assert!(readable(&e), "{e:?}"),
            }
        }
    }
}
