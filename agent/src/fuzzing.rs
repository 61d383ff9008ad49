//! Invariant checks over untrusted bytes, shared by the cargo-fuzz targets in
//! `fuzz/` and the corpus replay test, so CI runs what the fuzzers run. Each
//! panics only when an invariant breaks.

// Panicking on a broken invariant is how a fuzz oracle reports it.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::Bundle;
use oxid_pki::jwt::JwtSigner;
use oxid_pki::{KeyAlgorithm, KeyPair, TrustDomain};
use oxid_proto::workload as pb;
use prost::Message as _;

use crate::config::{AgentConfig, AgentFile};
use crate::workload::h2_authority::hpack::Decoder;
use crate::workload::h2_authority::{
    AuthorityRewriter, MAX_FRAME_SIZE, MAX_HEADER_BLOCK, PREFACE, RewriteError,
};

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

/// `agent.toml` text: parsing never panics, and a config that loads has a
/// valid trust domain and log format.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = AgentConfig::from_toml(text, AgentFile::default()) {
        assert!(matches!(config.log_format.as_str(), "human" | "json"));
        assert!(!config.trust_domain.as_str().is_empty());
        assert!((64 * 1024..=64 << 20).contains(&config.max_request_bytes));
        assert!(config.max_streams_per_uid > 0);
    }
}

struct WorkloadFixture {
    bundles: BTreeMap<TrustDomain, Bundle>,
    token: String,
    now: SystemTime,
}

fn workload_fixture() -> &'static WorkloadFixture {
    static FIXTURE: OnceLock<WorkloadFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let td = TrustDomain::new("example.org").expect("literal trust domain");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).expect("key generation");
        let signer = JwtSigner::new(
            td.clone(),
            key,
            "fuzz",
            None,
            now + Duration::from_secs(3600),
        )
        .expect("signer");
        let id = "spiffe://example.org/w".parse().expect("literal SPIFFE ID");
        let token = signer
            .mint(
                &id,
                &["spiffe://example.org/db".to_owned()],
                Duration::from_secs(300),
                now,
            )
            .expect("a token")
            .token;
        let mut bundle = Bundle::new(td.clone());
        bundle
            .add_jwt_authority(signer.authority().clone())
            .expect("jwt authority");
        WorkloadFixture {
            bundles: BTreeMap::from([(td, bundle)]),
            token,
            now,
        }
    })
}

/// The Workload API requests a workload sends, decoded as the agent decodes
/// them, through the agent's own checks. Invariants: nothing panics; an
/// accepted FetchJWTSVID request has 1 to 32 audiences; ValidateJWTSVID
/// accepts only a token the fixture's key signed, and answers its claims.
pub fn workload_request(data: &[u8]) {
    let fixture = workload_fixture();
    if let Ok(r) = pb::JwtsvidRequest::decode(data) {
        if crate::workload::check_jwt_request(&r).is_ok() {
            assert!((1..=oxid_pki::jwt::MAX_AUDIENCES).contains(&r.audience.len()));
        }
    }
    if let Ok(r) = pb::ValidateJwtsvidRequest::decode(data) {
        if let Ok(resp) = crate::workload::validate_jwt(&r, &fixture.bundles, fixture.now) {
            assert_eq!(r.svid, fixture.token, "only the fixture's token verifies");
            assert_eq!(resp.spiffe_id, "spiffe://example.org/w");
            assert!(resp.claims.is_some());
        }
    }
    // The fixture's own token with the audience taken from the input.
    let audience = String::from_utf8_lossy(data).into_owned();
    let r = pb::ValidateJwtsvidRequest {
        audience: audience.clone(),
        svid: fixture.token.clone(),
    };
    let verdict = crate::workload::validate_jwt(&r, &fixture.bundles, fixture.now);
    assert_eq!(
        verdict.is_ok(),
        audience == "spiffe://example.org/db",
        "{audience:?}"
    );
    let _ = pb::X509svidRequest::decode(data);
    let _ = pb::X509BundlesRequest::decode(data);
    let _ = pb::JwtBundlesRequest::decode(data);
}

#[cfg(test)]
mod corpus_replay {
    //! Replays `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`.

    use oxid_pki::fuzzing::replay_corpus as replay;

    #[test]
    fn h2_rewrite_corpus() {
        replay("h2_rewrite", super::h2_rewrite);
    }

    #[test]
    fn agent_config_corpus() {
        replay("agent_config", super::agent_config);
    }

    #[test]
    fn workload_request_corpus() {
        replay("workload_request", super::workload_request);
    }
}
