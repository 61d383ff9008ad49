//! oxid-h2-authority: makes the HTTP/2 `:authority` of Workload API requests
//! acceptable to the agent's HTTP/2 server.
//!
//! gRPC C-core (≥ 1.57, so py-spiffe) and grpc-java send the percent-encoded
//! socket path as `:authority` on a Unix socket (`%2Frun%2F...`). That is not
//! a valid URI authority, and the `h2` server under tonic resets such streams
//! with PROTOCOL_ERROR (hyperium/h2#487), so those clients could not talk to
//! the agent at all. On a Unix socket the authority means nothing, so this
//! module sits between the socket and the HTTP/2 server and, in the bytes the
//! client sends, replaces an `:authority` that does not parse with
//! `localhost`. Everything the server sends passes untouched.
//!
//! Doing that needs the client's HPACK state: every header block is decoded
//! with the client's dynamic table and re-encoded as plain literals that
//! never index, so the server's decoder sees the same headers (but one) and
//! its table stays empty. Frames other than HEADERS and CONTINUATION stream
//! through as they arrive. Anything malformed closes the connection, which is
//! what the server would do with it (a connection error) anyway.
//!
//! The crate is sans I/O ([`AuthorityRewriter`]: bytes in, bytes out); the
//! agent wraps it around each accepted socket. It has its own HPACK decoder
//! and Huffman code because no maintained HPACK crate bounds what a header
//! block may decode to, and it stays until the `h2` server accepts such an
//! authority itself.

pub mod hpack;
mod huffman;

/// Invariant checks for the `h2_rewrite` fuzz target; compiled only for it
/// (feature `fuzzing`) and for this crate's tests.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;

use self::hpack::{Decoder, Field, HpackError};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The server's SETTINGS_MAX_FRAME_SIZE and SETTINGS_HEADER_TABLE_SIZE: the
/// HTTP/2 defaults, which tonic's server keeps. A client may not exceed them,
/// and our output never does.
pub const MAX_FRAME_SIZE: usize = 16_384;
const HEADER_TABLE_SIZE: usize = 4_096;
/// Largest header block (encoded, or decoded as HPACK counts it) we rewrite;
/// four times what the server accepts (16 KiB), so no request it would
/// serve is refused here, while a client cannot make us buffer more.
pub const MAX_HEADER_BLOCK: usize = 65_536;

/// The authority put in place of one that does not parse.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// Why a client's byte stream was refused; the connection is closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RewriteError {
    /// The stream did not start with the HTTP/2 client preface.
    #[error("not an HTTP/2 connection preface")]
    BadPreface,
    /// A HEADERS or CONTINUATION frame larger than SETTINGS_MAX_FRAME_SIZE.
    #[error("{0}-byte header frame exceeds the {MAX_FRAME_SIZE}-byte frame size")]
    FrameTooLarge(usize),
    /// A frame out of place: CONTINUATION without a header block open,
    /// another frame inside one, or PUSH_PROMISE from a client.
    #[error("unexpected frame type {frame_type:#x} on stream {stream}")]
    UnexpectedFrame {
        /// The frame's type.
        frame_type: u8,
        /// The frame's stream.
        stream: u32,
    },
    /// Padding or priority fields longer than the frame.
    #[error("malformed HEADERS frame")]
    Malformed,
    /// A header block larger than [`MAX_HEADER_BLOCK`].
    #[error("header block exceeds {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    /// The header block does not decode.
    #[error("HPACK: {0}")]
    Hpack(#[from] HpackError),
}

/// Where the rewriter is in the client's byte stream.
#[derive(Debug)]
enum State {
    Preface,
    FrameHeader,
    /// Inside a frame that passes through: this many payload bytes to go.
    Passthrough(usize),
}

/// A header block being collected from HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    /// The 5 priority bytes of the HEADERS frame, kept as sent.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server half of an HTTP/2 connection, rewriting `:authority`
/// in header blocks. Sans I/O: feed bytes in, take bytes out.
#[derive(Debug)]
pub struct AuthorityRewriter {
    state: State,
    decoder: Decoder,
    open: Option<OpenBlock>,
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self {
            state: State::Preface,
            decoder: Decoder::new(HEADER_TABLE_SIZE, MAX_HEADER_BLOCK),
            open: None,
        }
    }
}

impl AuthorityRewriter {
    /// Consumes every complete unit at the front of `input` (an incomplete
    /// frame header or header frame stays there for the next call) and
    /// appends what the server should read to `out`.
    pub fn rewrite(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let mut at = 0;
        let result = self.rewrite_from(input, &mut at, out);
        input.drain(..at);
        result
    }

    fn rewrite_from(
        &mut self,
        input: &[u8],
        at: &mut usize,
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        loop {
            let rest = &input[*at..];
            match self.state {
                State::Preface => {
                    let n = rest.len().min(PREFACE.len());
                    if rest[..n] != PREFACE[..n] {
                        return Err(RewriteError::BadPreface);
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(PREFACE);
                    *at += n;
                    self.state = State::FrameHeader;
                }
                State::Passthrough(remaining) => {
                    let n = rest.len().min(remaining);
                    out.extend_from_slice(&rest[..n]);
                    *at += n;
                    if n < remaining {
                        self.state = State::Passthrough(remaining - n);
                        return Ok(());
                    }
                    self.state = State::FrameHeader;
                }
                State::FrameHeader => {
                    let Some(header) = rest.first_chunk::<FRAME_HEADER_LEN>() else {
                        return Ok(());
                    };
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let (frame_type, flags) = (header[3], header[4]);
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                        & 0x7fff_ffff;
                    let in_block = self.open.as_ref().map(|b| b.stream);
                    let unexpected = RewriteError::UnexpectedFrame { frame_type, stream };
                    match (frame_type, in_block) {
                        (CONTINUATION, Some(open)) if open == stream => {}
                        (HEADERS, None) => {}
                        (CONTINUATION | PUSH_PROMISE, _) | (_, Some(_)) => return Err(unexpected),
                        _ => {
                            out.extend_from_slice(header);
                            *at += FRAME_HEADER_LEN;
                            self.state = State::Passthrough(len);
                            continue;
                        }
                    }
                    if len > MAX_FRAME_SIZE {
                        return Err(RewriteError::FrameTooLarge(len));
                    }
                    let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
                        return Ok(());
                    };
                    *at += FRAME_HEADER_LEN + len;
                    self.header_frame(frame_type, flags, stream, payload, out)?;
                }
            }
        }
    }

    /// Adds one HEADERS or CONTINUATION payload to the open block, and
    /// rewrites the block once it is complete.
    fn header_frame(
        &mut self,
        frame_type: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let mut block = match self.open.take() {
            Some(block) => {
                let mut block = block;
                block.fragment.extend_from_slice(payload);
                block
            }
            None => {
                debug_assert_eq!(frame_type, HEADERS);
                let (priority, fragment) = headers_payload(flags, payload)?;
                OpenBlock {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                }
            }
        };
        if block.fragment.len() > MAX_HEADER_BLOCK {
            return Err(RewriteError::BlockTooLarge);
        }
        if flags & END_HEADERS == 0 {
            self.open = Some(block);
            return Ok(());
        }
        let mut fields = self.decoder.decode(&block.fragment)?;
        fix_authority(&mut fields);
        block.fragment.clear();
        hpack::encode_literals(&fields, &mut block.fragment);
        write_header_frames(&block, out);
        Ok(())
    }
}

/// The priority bytes and the header block fragment of a HEADERS payload,
/// without its padding (RFC 9113 §6.2).
fn headers_payload(flags: u8, payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8]), RewriteError> {
    let mut rest = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&pad, tail) = rest.split_first().ok_or(RewriteError::Malformed)?;
        padding = usize::from(pad);
        rest = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (bytes, tail) = rest
            .split_first_chunk::<5>()
            .ok_or(RewriteError::Malformed)?;
        priority = Some(*bytes);
        rest = tail;
    }
    let end = rest
        .len()
        .checked_sub(padding)
        .ok_or(RewriteError::Malformed)?;
    Ok((priority, &rest[..end]))
}

/// Replaces an `:authority` that is not a valid URI authority.
fn fix_authority(fields: &mut [Field]) {
    for field in fields.iter_mut().filter(|f| f.name == b":authority") {
        if http::uri::Authority::try_from(field.value.as_slice()).is_err() {
            field.value = LOCAL_AUTHORITY.to_vec();
        }
    }
}

/// Writes `block` as a HEADERS frame and as many CONTINUATIONs as needed.
fn write_header_frames(block: &OpenBlock, out: &mut Vec<u8>) {
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let first_len = block.fragment.len().min(MAX_FRAME_SIZE - priority_len);
    let (first, rest) = block.fragment.split_at(first_len);
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    let mut chunks = rest.chunks(MAX_FRAME_SIZE).peekable();
    if chunks.peek().is_none() {
        flags |= END_HEADERS;
    }
    frame_header(
        first.len() + priority_len,
        HEADERS,
        flags,
        block.stream,
        out,
    );
    if let Some(priority) = block.priority {
        out.extend_from_slice(&priority);
    }
    out.extend_from_slice(first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        frame_header(chunk.len(), CONTINUATION, flags, block.stream, out);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(len: usize, frame_type: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    // len ≤ MAX_FRAME_SIZE, so it fits the 24-bit length field.
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.extend_from_slice(&[frame_type, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Hex test vectors to bytes; panics on bad hex, which is a broken test.
    pub(crate) fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or_else(|_| unreachable!()))
            .collect()
    }

    fn frame(frame_type: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_header(payload.len(), frame_type, flags, stream, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn field(name: &str, value: &str) -> Field {
        Field {
            name: name.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            never_indexed: false,
        }
    }

    fn request(authority: &str) -> Vec<Field> {
        vec![
            field(":method", "POST"),
            field(":scheme", "http"),
            field(":path", "/SpiffeWorkloadAPI/FetchJWTBundles"),
            field(":authority", authority),
            field("content-type", "application/grpc"),
        ]
    }

    /// Runs `input` through a rewriter fed `step` bytes at a time.
    fn run(input: &[u8], step: usize) -> Result<Vec<u8>, RewriteError> {
        let mut rewriter = AuthorityRewriter::default();
        let (mut pending, mut out) = (Vec::new(), Vec::new());
        for chunk in input.chunks(step) {
            pending.extend_from_slice(chunk);
            rewriter.rewrite(&mut pending, &mut out)?;
        }
        Ok(out)
    }

    /// Splits the server's view back into frames: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    #[test]
    fn replaces_a_percent_encoded_authority_in_any_chunking() {
        let mut block = Vec::new();
        hpack::encode_literals(&request("%2Frun%2Foxid-agent%2Fapi.sock"), &mut block);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])); // DATA
        let whole = run(&input, input.len()).unwrap_or_default();
        for step in [1, 2, 7, 9, 10, 100] {
            assert_eq!(run(&input, step).unwrap_or_default(), whole, "step {step}");
        }
        let frames = frames(&whole);
        assert_eq!(frames.len(), 3);
        assert_eq!(
            (frames[1].0, frames[1].1, frames[1].2),
            (HEADERS, END_HEADERS, 1)
        );
        let fields = Decoder::new(4096, 65536)
            .decode(&frames[1].3)
            .unwrap_or_default();
        assert_eq!(fields, request("localhost"));
        assert_eq!(frames[2], (0x0, END_STREAM, 1, vec![0, 0, 0, 0, 0]));
    }

    #[test]
    fn keeps_a_valid_authority_and_other_fields() {
        let mut block = Vec::new();
        hpack::encode_literals(&request("localhost:1234"), &mut block);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block));
        let frames = frames(&run(&input, 5).unwrap_or_default());
        assert_eq!(frames[0].1, END_HEADERS | END_STREAM);
        let fields = Decoder::new(4096, 65536)
            .decode(&frames[0].3)
            .unwrap_or_default();
        assert_eq!(fields, request("localhost:1234"));
    }

    #[test]
    fn drops_padding_keeps_priority_and_joins_continuations() {
        let mut block = Vec::new();
        hpack::encode_literals(&request("%2Fa"), &mut block);
        let (head, tail) = block.split_at(10);
        let mut payload = vec![3]; // pad length
        payload.extend([0x80, 0, 0, 1, 16]); // exclusive dependency on 1, weight 16
        payload.extend(head);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY, 5, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, tail));
        let frames = frames(&run(&input, 3).unwrap_or_default());
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].1, PRIORITY | END_HEADERS);
        assert_eq!(frames[0].3[..5], [0x80, 0, 0, 1, 16]);
        let fields = Decoder::new(4096, 65536)
            .decode(&frames[0].3[5..])
            .unwrap_or_default();
        assert_eq!(fields, request("localhost"));
    }

    #[test]
    fn splits_a_large_block_into_continuations() {
        let mut fields = request("%2Fa");
        fields.push(field("x-big", &"v".repeat(40_000)));
        let mut block = Vec::new();
        hpack::encode_literals(&fields, &mut block);
        let mut input = PREFACE.to_vec();
        let mut chunks = block.chunks(MAX_FRAME_SIZE).peekable();
        let first = chunks.next().unwrap_or_default();
        input.extend(frame(HEADERS, 0, 1, first));
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            input.extend(frame(CONTINUATION, flags, 1, chunk));
        }
        let frames = frames(&run(&input, 4096).unwrap_or_default());
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME_SIZE));
        assert_eq!(frames[2].1, END_HEADERS);
        let joined: Vec<u8> = frames.iter().flat_map(|f| f.3.clone()).collect();
        fields[3] = field(":authority", "localhost");
        assert_eq!(Decoder::new(4096, 65536).decode(&joined).ok(), Some(fields));
    }

    #[test]
    fn refuses_what_the_server_would_refuse() {
        let headers = |payload: &[u8]| {
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, payload));
            input
        };
        assert!(matches!(
            run(b"GET / HTTP/1.1\r\n\r\n", 4),
            Err(RewriteError::BadPreface)
        ));
        assert!(matches!(
            run(&headers(&[0x80]), 64),
            Err(RewriteError::Hpack(_))
        ));
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
        assert!(matches!(
            run(&input, 64),
            Err(RewriteError::UnexpectedFrame { .. })
        ));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, &[]));
        assert!(matches!(
            run(&input, 64),
            Err(RewriteError::UnexpectedFrame { .. })
        ));
        let mut input = PREFACE.to_vec();
        input.extend(frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]));
        assert!(matches!(
            run(&input, 64),
            Err(RewriteError::UnexpectedFrame { .. })
        ));
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &vec![0x82; MAX_FRAME_SIZE + 1],
        ));
        assert!(matches!(
            run(&input, 64),
            Err(RewriteError::FrameTooLarge(_))
        ));
        // Padding longer than the payload.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]));
        assert!(matches!(run(&input, 64), Err(RewriteError::Malformed)));
        // A header block that never ends grows past the bound.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &vec![0x82; MAX_FRAME_SIZE]));
        for _ in 0..4 {
            input.extend(frame(CONTINUATION, 0, 1, &vec![0x82; MAX_FRAME_SIZE]));
        }
        assert!(matches!(
            run(&input, 100_000),
            Err(RewriteError::BlockTooLarge)
        ));
    }
}
