//! The `h2_rewrite` fuzz target's invariants, shared by the cargo-fuzz
//! target in `fuzz/` and the corpus replay test below, so CI runs what the
//! fuzzer runs. It panics only when an invariant breaks.

// Panicking on a broken invariant is how a fuzz oracle reports it.
#![allow(clippy::expect_used, clippy::panic)]

use crate::hpack::Decoder;
use crate::{AuthorityRewriter, MAX_FRAME_SIZE, MAX_HEADER_BLOCK, PREFACE, RewriteError};

/// The bytes a Workload API client sends, after a valid preface, through the
/// `:authority` rewriter. Invariants: the outcome does not depend on how the
/// bytes are split into reads; the output is a preface and frames within
/// the frame size; every header block in it decodes without a dynamic table
/// and carries only valid authorities.
pub fn h2_rewrite(data: &[u8]) {
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(data);
    let whole = rewrite_in_steps(&input, input.len());
    let step = data.first().map_or(1, |b| usize::from(*b) % 17 + 1);
    let stepped = rewrite_in_steps(&input, step);
    let out = match (whole, stepped) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "output depends on read sizes");
            a
        }
        (Err(_), Err(_)) => return,
        (a, b) => panic!(
            "outcome depends on read sizes: {:?} vs {:?}",
            a.err(),
            b.err()
        ),
    };
    let frames = out
        .strip_prefix(PREFACE)
        .expect("output starts with the preface");
    check_frames(frames);
}

fn rewrite_in_steps(input: &[u8], step: usize) -> Result<Vec<u8>, RewriteError> {
    let mut rewriter = AuthorityRewriter::default();
    let (mut pending, mut out) = (Vec::new(), Vec::new());
    for chunk in input.chunks(step) {
        pending.extend_from_slice(chunk);
        rewriter.rewrite(&mut pending, &mut out)?;
    }
    Ok(out)
}

/// Walks the rewritten frames; the last one may be cut short (a passthrough
/// frame still arriving).
fn check_frames(mut rest: &[u8]) {
    let mut block = Vec::new();
    let mut decoder = Decoder::new(0, MAX_HEADER_BLOCK);
    while let Some(header) = rest.first_chunk::<9>() {
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let (frame_type, flags) = (header[3], header[4]);
        let payload = &rest[9..(9 + len).min(rest.len())];
        rest = &rest[9 + payload.len()..];
        if !matches!(frame_type, 0x1 | 0x9) {
            continue;
        }
        assert!(len <= MAX_FRAME_SIZE, "header frame of {len} bytes");
        assert_eq!(payload.len(), len, "header frames are written whole");
        assert_eq!(flags & 0x8, 0, "padding is dropped");
        let fragment = if frame_type == 0x1 && flags & 0x20 != 0 {
            &payload[5..]
        } else {
            payload
        };
        block.extend_from_slice(fragment);
        if flags & 0x4 != 0 {
            let fields = decoder
                .decode(&block)
                .expect("rewritten blocks decode with an empty table");
            for f in fields.iter().filter(|f| f.name == b":authority") {
                assert!(http::uri::Authority::try_from(f.value.as_slice()).is_ok());
            }
            block.clear();
        }
    }
}

#[cfg(test)]
mod corpus_replay {
    //! Replays `fuzz/corpus/h2_rewrite/` and `fuzz/regressions/h2_rewrite/`.

    #[test]
    fn h2_rewrite_corpus() {
        oxid_pki::fuzzing::replay_corpus("h2_rewrite", super::h2_rewrite);
    }
}
