//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) and every
//! input that once crashed a target (`fuzz/regressions/<target>/`) through
//! the same invariant checks the fuzzers run, so CI exercises them on stable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut seen = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| check(&data));
            assert!(
                result.is_ok(),
                "{target}: invariant broken by {}",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen > 0, "no corpus for fuzz target {target}");
}

#[test]
fn spiffe_id_corpus() {
    replay("spiffe_id", oxid_pki::fuzzing::spiffe_id);
}

#[test]
fn jwt_corpus() {
    replay("jwt", oxid_pki::fuzzing::jwt);
}

#[test]
fn bundle_corpus() {
    replay("bundle", oxid_pki::fuzzing::bundle);
}

#[test]
fn csr_corpus() {
    replay("csr", oxid_pki::fuzzing::csr);
}
