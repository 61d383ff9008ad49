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

/// The SPIFFE ID of the agent that attests with the join token of ID `id`.
pub fn join_token_agent_id(
    trust_domain: &oxid_pki::TrustDomain,
    id: &str,
) -> Result<oxid_pki::SpiffeId, oxid_pki::IdError> {
    trust_domain.spiffe_id(&format!("/oxid/agent/join_token/{id}"))
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
