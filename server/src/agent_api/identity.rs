//! The calling agent's own identity, on every call: its SVID checked
//! against the clock (a connection outlives the certificate it was opened
//! with) and against the agent's record, and every change to that record
//! made as a compare-and-swap.
//!
//! Renewal rules: the current serial may renew. The previous serial may
//! renew only while the renewed SVID is pending (never used) and only for
//! a CSR holding the pending SVID's key: that is the agent retrying a
//! renewal whose answer it lost (it keeps that key until it has an answer).
//! A copy of a replaced SVID has neither, so it cannot renew and lock the
//! real agent out; its attempt is logged as a possible theft.

use std::time::{Duration, SystemTime};

use oxid_pki::SpiffeId;
use oxid_pki::x509::Csr;
use oxid_proto::agent as pb;
use tonic::Request;

use super::conn::PeerInfo;
use super::service::{AgentApiError, Inner, parse_csr};
use crate::datastore::{Agent, DataStoreError};

/// Compare-and-swap attempts before a call gives up on a record that keeps
/// changing under it.
const CAS_ATTEMPTS: usize = 16;

/// The caller's agent SVID, as the handshake verified it.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) id: SpiffeId,
    pub(crate) serial: String,
    /// The SVID's notAfter.
    pub(crate) not_after: SystemTime,
}

impl Caller {
    /// The caller on `req`'s connection.
    fn of<T>(req: &Request<T>) -> Result<Self, AgentApiError> {
        let chain = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.chain.clone())
            .ok_or_else(|| {
                AgentApiError::Unauthenticated("this call needs the agent's SVID".into())
            })?;
        let unreadable = || AgentApiError::Unauthenticated("unreadable agent SVID".into());
        let leaf = chain.first().ok_or_else(unreadable)?;
        let (id, serial) = oxid_pki::x509::leaf_identity(leaf).map_err(|_| unreadable())?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|_| unreadable())?;
        let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
        Ok(Self {
            id,
            serial,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        })
    }

    /// Refuses the SVID once past its notAfter by the server's clock.
    pub(crate) fn check_expiry(&self, now: SystemTime) -> Result<(), AgentApiError> {
        if now > self.not_after {
            return Err(AgentApiError::PermissionDenied(format!(
                "the agent SVID of {} (serial {}) has expired; the agent must attest again",
                self.id, self.serial
            )));
        }
        Ok(())
    }
}

/// Why an SVID whose serial is neither current nor previous is refused.
const REPLACED: &str = "this agent SVID has been replaced by a renewed one";

/// Refuses banned agents and unknown SVID serials.
pub(crate) fn check_agent(agent: &Agent, serial: &str) -> Result<(), AgentApiError> {
    if agent.banned {
        return Err(AgentApiError::PermissionDenied(format!(
            "agent {} is banned",
            agent.spiffe_id
        )));
    }
    if agent.serial != serial && agent.previous_serial.as_deref() != Some(serial) {
        return Err(AgentApiError::SvidReplaced(REPLACED.into()));
    }
    Ok(())
}

/// The SHA-256 (hex) of the public key a CSR holds.
fn key_hash(csr: &Csr) -> String {
    oxid_pki::hex(ring::digest::digest(&ring::digest::SHA256, csr.public_key().spki_der()).as_ref())
}

/// Whether `serial` may renew `agent` with a CSR for the key `key`.
fn check_renewal(agent: &Agent, serial: &str, key: &str) -> Result<(), AgentApiError> {
    if agent.banned {
        return check_agent(agent, serial);
    }
    if agent.serial == serial {
        return Ok(());
    }
    if agent.previous_serial.as_deref() != Some(serial) {
        return Err(possible_theft(&agent.spiffe_id, serial, REPLACED));
    }
    if agent.pending_key.as_deref() == Some(key) {
        return Ok(());
    }
    Err(possible_theft(
        &agent.spiffe_id,
        serial,
        "this agent SVID was renewed; until the renewed SVID is used, only its key may renew",
    ))
}

/// Logs a Renew on a retired serial, or on the previous one with another
/// key, and says so in the refusal: it is what a copied key does.
fn possible_theft(id: &SpiffeId, serial: &str, why: &str) -> AgentApiError {
    tracing::warn!(
        agent = %id,
        serial,
        reason = why,
        "renewal with a replaced agent SVID refused: possible theft of the agent's key; \
         evict the agent unless it was restored from a backup"
    );
    AgentApiError::PermissionDenied(format!(
        "{why}; renewal refused as a possible theft of the agent's key"
    ))
}

/// The agent "not attested" refusal.
fn evicted(id: &SpiffeId) -> AgentApiError {
    AgentApiError::PermissionDenied(format!(
        "agent {id} is not attested (evicted?); it must attest again"
    ))
}

impl Inner {
    /// The calling agent, checked against the clock and its record. Marks
    /// a renewed SVID as used (which retires the previous one).
    pub(crate) async fn authenticate<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(Agent, Caller), AgentApiError> {
        let caller = Caller::of(req)?;
        caller.check_expiry(self.clock.now())?;
        let id = &caller.id;
        let agent = self.current_agent(id).await?.ok_or_else(|| evicted(id))?;
        check_agent(&agent, &caller.serial)?;
        if !self.requests.allow(id.as_str()) {
            return Err(AgentApiError::ResourceExhausted(format!(
                "agent {id} is over {} calls a second (agent_requests_per_second); retry later",
                self.config.requests_per_second
            )));
        }
        if agent.serial != caller.serial || agent.previous_serial.is_none() {
            return Ok((agent, caller));
        }
        let agent = self
            .update_agent(agent, |a| {
                check_agent(a, &caller.serial)?;
                if a.serial != caller.serial || a.previous_serial.is_none() {
                    return Ok(None);
                }
                let mut used = a.clone();
                used.previous_serial = None;
                used.pending_key = None;
                Ok(Some(used))
            })
            .await?;
        Ok((agent, caller))
    }

    /// The record of agent `id` as of every write the store has answered
    /// (`None`: no such agent), so a ban or an eviction holds for every call
    /// that arrives after the admin call that made it has answered.
    ///
    /// The index alone would not do: it follows the store a moment behind
    /// (longer on a busy server), and a call served from a copy without the
    /// ban would get SVIDs. The store publishes a write's revision before
    /// it answers; while the index has reached that revision its copy is
    /// current and no read is needed (the common case); only while it
    /// trails is the record read from the store. This was chosen over
    /// making BanAgent and EvictAgent wait for the index: that would
    /// refuse a ban already in force in the store whenever the follower is
    /// slow, and cover only the admin calls that wait: a renewed SVID used
    /// at once would still be checked against the copy with the old serial.
    pub(crate) async fn current_agent(
        &self,
        id: &SpiffeId,
    ) -> Result<Option<Agent>, AgentApiError> {
        Ok(self.index.agent_now(self.store.as_ref(), id).await?)
    }

    /// Applies `change` to an agent's record as a compare-and-swap from
    /// `seen` (the index's copy, which may trail the store). When the
    /// record moved in between, it is read again and `change` decides
    /// again, so a ban or an eviction that landed meanwhile stands.
    /// `change` answers `None` when there is nothing to write.
    pub(crate) async fn update_agent(
        &self,
        mut seen: Agent,
        change: impl Fn(&Agent) -> Result<Option<Agent>, AgentApiError>,
    ) -> Result<Agent, AgentApiError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(next) = change(&seen)? else {
                return Ok(seen);
            };
            match self.store.put_agent(Some(&seen), next).await {
                Ok(stored) => return Ok(stored),
                Err(DataStoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            seen = match self.store.get_agent(&seen.spiffe_id).await {
                Ok(a) => a,
                Err(DataStoreError::NotFound(_)) => return Err(evicted(&seen.spiffe_id)),
                Err(e) => return Err(e.into()),
            };
        }
        Err(AgentApiError::Unavailable(format!(
            "the record of agent {} kept changing during this call; retry",
            seen.spiffe_id
        )))
    }

    /// Stores the record of a node that just attested, made by `make` from
    /// the record it replaces (which `make` may refuse, e.g. when banned),
    /// as a compare-and-swap like [`Inner::update_agent`].
    pub(crate) async fn record_attestation(
        &self,
        mut existing: Option<Agent>,
        make: impl Fn(Option<&Agent>) -> Result<Agent, AgentApiError>,
    ) -> Result<Agent, AgentApiError> {
        for _ in 0..CAS_ATTEMPTS {
            let next = make(existing.as_ref())?;
            let id = next.spiffe_id.clone();
            match self.store.put_agent(existing.as_ref(), next).await {
                Ok(stored) => return Ok(stored),
                Err(DataStoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            existing = match self.store.get_agent(&id).await {
                Ok(a) => Some(a),
                Err(DataStoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
        }
        Err(AgentApiError::Unavailable(
            "the agent's record kept changing during attestation; attest again".into(),
        ))
    }

    /// A Renew call: see the module documentation for who may renew.
    pub(crate) async fn renew(
        &self,
        req: &Request<pb::RenewRequest>,
    ) -> Result<pb::RenewResponse, AgentApiError> {
        let (agent, caller) = self.authenticate(req).await.map_err(|e| match e {
            AgentApiError::SvidReplaced(_) => match Caller::of(req) {
                Ok(c) => possible_theft(&c.id, &c.serial, REPLACED),
                Err(e) => e,
            },
            other => other,
        })?;
        let csr = parse_csr(&req.get_ref().csr)?;
        let key = key_hash(&csr);
        check_renewal(&agent, &caller.serial, &key)?;
        let (chain, serial, expires_at) = self.sign_agent_svid(&agent.spiffe_id, &csr).await?;
        self.update_agent(agent, |a| {
            check_renewal(a, &caller.serial, &key)?;
            let mut renewed = a.clone();
            // A retry on the previous serial keeps it as the previous one:
            // the agent still holds only that SVID.
            if a.serial == caller.serial {
                renewed.previous_serial = Some(a.serial.clone());
            }
            renewed.serial.clone_from(&serial);
            renewed.pending_key = Some(key.clone());
            renewed.expires_at = expires_at;
            Ok(Some(renewed))
        })
        .await?;
        Ok(pb::RenewResponse {
            svid_chain: chain,
            valid_for_ms: self.valid_for_ms(expires_at),
        })
    }
}
