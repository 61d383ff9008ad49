//! Node attestation: how an agent proves which node it runs on.
//!
//! Join tokens are single-use secrets created by the admin API. Only their
//! SHA-256 is stored; the non-secret ID in the agent's SPIFFE ID is a prefix
//! of that hash, never the secret.

use oxid_pki::hex;

/// The stored form of a join token: hex SHA-256 of the secret.
pub fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_hex_sha256() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
