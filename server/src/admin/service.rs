//! The admin API handlers.

use std::sync::Arc;
use std::time::Duration;

use oxid_pki::TrustDomain;
use oxid_pki::bundle::Bundle;
use oxid_pki::x509::{Csr, SvidParams};
use oxid_proto::admin as pb;
use ring::rand::SecureRandom as _;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::convert::{EntryOptions, EntryPolicy, agent_to_pb, entry_to_pb};
use super::entries::{allows_unknown_type, partial_update};
use super::{AdminAccess, AdminError};
use crate::ca::{AuthorityState, CaManager};
use crate::clock::{Clock, unix_secs};
use crate::datastore::{
    CreateMode, DataStore, DataStoreError, EntryFilter, EntryId, JoinToken, StoredBundle,
};

/// Default join token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);

/// Longest join token lifetime accepted.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Compare-and-swap attempts of a ban racing the agent's own calls.
const BAN_ATTEMPTS: usize = 64;

/// The admin API implementation.
pub struct AdminService {
    /// The server's store.
    pub store: Arc<dyn DataStore>,
    /// The server's CA.
    pub ca: Arc<CaManager>,
    /// The server's clock.
    pub clock: Arc<dyn Clock>,
    /// Entry rules.
    pub policy: EntryPolicy,
    /// Who may call.
    pub access: AdminAccess,
    /// X509-SVID TTL when none is asked for.
    pub default_x509_ttl: Duration,
    /// JWT-SVID TTL when none is asked for.
    pub default_jwt_ttl: Duration,
    /// Most entries (or entry IDs) in one call (`max_admin_batch`).
    pub max_batch: usize,
}

/// The peer of a call, from its socket credentials.
struct Caller {
    uid: Option<u32>,
    pid: Option<i32>,
}

/// Runs an admin call: authorise by peer uid, run `$body` with `$req` bound
/// to the request message, write the audit line, map the error.
macro_rules! guarded {
    ($self:ident, $req:ident, $method:literal, $body:expr) => {{
        let caller = $self.authorize(&$req, $method)?;
        let $req = $req.into_inner();
        let result: Result<_, AdminError> = async { $body }.await;
        audit(&caller, $method, result.as_ref().err());
        result.map(Response::new).map_err(Status::from)
    }};
}

impl AdminService {
    fn authorize<T>(&self, req: &Request<T>, method: &str) -> Result<Caller, Status> {
        let cred = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let caller = Caller {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
        };
        match caller.uid {
            Some(uid) if self.access.allowed_uids.contains(&uid) => Ok(caller),
            _ => {
                let err = AdminError::PermissionDenied(format!(
                    "uid {} may not use the admin API (allowed: the server's uid, root, admin_uids)",
                    caller.uid.map_or("unknown".into(), |u| u.to_string())
                ));
                audit(&caller, method, Some(&err));
                Err(err.into())
            }
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        let now = self.clock.now();
        now.duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    fn svid_ttl(&self, requested: u64, default: Duration) -> Result<Duration, AdminError> {
        Ok(self
            .policy
            .ttl("ttl", requested)?
            .map_or(default, Duration::from_secs))
    }

    fn federated_td(&self, s: &str) -> Result<TrustDomain, AdminError> {
        let td =
            TrustDomain::new(s).map_err(|e| AdminError::invalid(format!("trust_domain: {e}")))?;
        if td == self.policy.trust_domain {
            return Err(AdminError::invalid(format!(
                "{td} is this server's own trust domain; its bundle is managed by the CA"
            )));
        }
        Ok(td)
    }
}

fn audit(caller: &Caller, method: &str, error: Option<&AdminError>) {
    let uid = caller.uid.map_or(-1, i64::from);
    let pid = caller.pid.unwrap_or(-1);
    match error {
        None => tracing::info!(target: "oxid::audit", uid, pid, method, result = "ok"),
        Some(e) => {
            tracing::info!(target: "oxid::audit", uid, pid, method, result = e_code(e), error = %e);
        }
    }
}

fn e_code(e: &AdminError) -> &'static str {
    match e {
        AdminError::InvalidArgument(_) => "invalid_argument",
        AdminError::PermissionDenied(_) => "permission_denied",
        AdminError::NotFound(_) => "not_found",
        AdminError::AlreadyExists(_) => "already_exists",
        AdminError::FailedPrecondition(_) => "failed_precondition",
        AdminError::Unavailable(_) => "unavailable",
        AdminError::Internal(_) => "internal",
    }
}

fn check_batch(len: usize, max: usize) -> Result<(), AdminError> {
    if len > max {
        return Err(AdminError::invalid(format!(
            "{len} items in one call; at most {max} (max_admin_batch)"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_entries(
        &self,
        req: Request<pb::CreateEntriesRequest>,
    ) -> Result<Response<pb::EntryResults>, Status> {
        let allow_unknown = allows_unknown_type(&req);
        guarded!(self, req, "CreateEntries", {
            check_batch(req.entries.len(), self.max_batch)?;
            let created_at = self.now_ms();
            let options = EntryOptions {
                allow_exe_only: req.allow_exe_only,
                allow_unknown_selector_type: allow_unknown?,
            };
            let parsed: Vec<_> = req
                .entries
                .into_iter()
                .map(|e| {
                    let id = e.id.clone();
                    (id, self.policy.entry(e, created_at, options))
                })
                .collect();
            let valid: Vec<_> = parsed
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok().cloned())
                .collect();
            let mode = match pb::BatchMode::try_from(req.mode) {
                Ok(pb::BatchMode::Each) => CreateMode::Each,
                Ok(pb::BatchMode::AllOrNothing) => CreateMode::AllOrNothing,
                Ok(pb::BatchMode::DryRun) => CreateMode::DryRun,
                Err(_) => {
                    return Err(AdminError::invalid(format!(
                        "mode {} is not a batch mode (0 each, 1 all or nothing, 2 dry run)",
                        req.mode
                    )));
                }
            };
            let refused = valid.len() < parsed.len();
            // A refused entry stops an all-or-nothing batch before the
            // store: the rest are still checked against it (dry run), so
            // the operator sees every problem at once.
            let store_mode = if refused && mode == CreateMode::AllOrNothing {
                CreateMode::DryRun
            } else {
                mode
            };
            let mut stored = self
                .store
                .create_entries(valid, store_mode)
                .await
                .into_iter()
                .map(|r| match r {
                    Ok(_) if store_mode != mode => Err(DataStoreError::BatchAborted),
                    other => other,
                });
            let results = parsed
                .into_iter()
                .map(|(id, r)| match r {
                    Err(e) => pb::EntryResult {
                        entry: None,
                        error: e.to_string(),
                        id,
                    },
                    // Invariant: one stored result per valid entry, in order.
                    Ok(_) => match stored.next() {
                        Some(Ok(e)) => pb::EntryResult {
                            id: e.id.to_string(),
                            entry: Some(entry_to_pb(&e)),
                            error: String::new(),
                        },
                        Some(Err(e)) => pb::EntryResult {
                            entry: None,
                            error: e.to_string(),
                            id,
                        },
                        None => pb::EntryResult {
                            entry: None,
                            error: "internal: missing result".into(),
                            id,
                        },
                    },
                })
                .collect();
            Ok(pb::EntryResults { results })
        })
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let allow_unknown = allows_unknown_type(&req);
        guarded!(self, req, "UpdateEntry", {
            let options = EntryOptions {
                allow_exe_only: req.allow_exe_only,
                allow_unknown_selector_type: allow_unknown?,
            };
            let entry = req
                .entry
                .ok_or_else(|| AdminError::invalid("entry is required".into()))?;
            if entry.id.is_empty() {
                return Err(AdminError::invalid("entry id is required to update".into()));
            }
            if req.fields.is_empty() {
                let entry = self.policy.entry(entry, self.now_ms(), options)?;
                return Ok(entry_to_pb(&self.store.update_entry(entry).await?));
            }
            let now_ms = || self.now_ms();
            partial_update(
                self.store.as_ref(),
                &self.policy,
                &entry,
                &req.fields,
                options,
                now_ms,
            )
            .await
        })
    }

    async fn delete_entries(
        &self,
        req: Request<pb::DeleteEntriesRequest>,
    ) -> Result<Response<pb::EntryResults>, Status> {
        guarded!(self, req, "DeleteEntries", {
            check_batch(req.ids.len(), self.max_batch)?;
            let mut results = Vec::with_capacity(req.ids.len());
            for id in req.ids {
                let outcome = match id.parse::<EntryId>() {
                    Err(e) => Err(e.to_string()),
                    Ok(parsed) => self
                        .store
                        .delete_entry(&parsed)
                        .await
                        .map_err(|e| AdminError::from(e).to_string()),
                };
                results.push(match outcome {
                    Ok(e) => pb::EntryResult {
                        entry: Some(entry_to_pb(&e)),
                        error: String::new(),
                        id,
                    },
                    Err(error) => pb::EntryResult {
                        entry: None,
                        error,
                        id,
                    },
                });
            }
            Ok(pb::EntryResults { results })
        })
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        guarded!(self, req, "GetEntry", {
            let id: EntryId = req
                .id
                .parse()
                .map_err(|e| AdminError::invalid(format!("{e}")))?;
            Ok(entry_to_pb(&self.store.get_entry(&id).await?))
        })
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        guarded!(self, req, "ListEntries", {
            let parse_id = |field: &str, s: &str| -> Result<_, AdminError> {
                if s.is_empty() {
                    return Ok(None);
                }
                s.parse()
                    .map(Some)
                    .map_err(|e| AdminError::invalid(format!("{field} {s:?}: {e}")))
            };
            let selectors = if req.selectors.is_empty() {
                None
            } else {
                let parsed = req
                    .selectors
                    .iter()
                    .map(|s| {
                        s.parse()
                            .map_err(|e| AdminError::invalid(format!("selector: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some((parsed, req.selectors_exact))
            };
            let filter = EntryFilter {
                spiffe_id: parse_id("spiffe_id", &req.spiffe_id)?,
                parent_id: parse_id("parent_id", &req.parent_id)?,
                selectors,
            };
            let entries = self.store.list_entries(&filter).await?;
            Ok(pb::ListEntriesResponse {
                entries: entries.iter().map(entry_to_pb).collect(),
            })
        })
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        guarded!(self, req, "ListAgents", {
            let _ = req;
            let agents = self.store.list_agents().await?;
            Ok(pb::ListAgentsResponse {
                agents: agents.iter().map(agent_to_pb).collect(),
            })
        })
    }

    async fn get_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        guarded!(self, req, "GetAgent", {
            let id = self.policy.member_id("spiffe_id", &req.spiffe_id)?;
            Ok(agent_to_pb(&self.store.get_agent(&id).await?))
        })
    }

    async fn ban_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        guarded!(self, req, "BanAgent", {
            let id = self.policy.member_id("spiffe_id", &req.spiffe_id)?;
            // A compare-and-swap, retried: a renewal racing the ban must
            // neither undo it nor be lost under a stale copy.
            let mut attempts = 0;
            loop {
                let seen = self.store.get_agent(&id).await?;
                let mut banned = seen.clone();
                banned.banned = true;
                match self.store.put_agent(Some(&seen), banned).await {
                    Err(DataStoreError::Conflict(_)) if attempts < BAN_ATTEMPTS => attempts += 1,
                    other => break Ok(agent_to_pb(&other?)),
                }
            }
        })
    }

    async fn evict_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        guarded!(self, req, "EvictAgent", {
            let id = self.policy.member_id("spiffe_id", &req.spiffe_id)?;
            Ok(agent_to_pb(&self.store.delete_agent(&id).await?))
        })
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        guarded!(self, req, "CreateJoinToken", {
            let ttl = match req.ttl {
                0 => DEFAULT_TOKEN_TTL,
                s if s > MAX_TOKEN_TTL.as_secs() => {
                    return Err(AdminError::invalid(format!(
                        "ttl {s}s is above the maximum of {}s",
                        MAX_TOKEN_TTL.as_secs()
                    )));
                }
                s => Duration::from_secs(s),
            };
            let alias = if req.spiffe_id.is_empty() {
                None
            } else {
                Some(self.policy.grantable_id("spiffe_id", &req.spiffe_id)?)
            };
            let mut secret = [0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut secret)
                .map_err(|_| AdminError::Internal("random generator failed".into()))?;
            let token = oxid_pki::hex(&secret);
            let hash = crate::attest::token_hash(&token);
            let expires_at = unix_secs(self.clock.now() + ttl);
            let stored = JoinToken {
                id: hash[..16].to_owned(),
                hash,
                expires_at,
                alias,
            };
            let agent_id =
                crate::attest::join_token_agent_id(&self.policy.trust_domain, &stored.id)
                    .map_err(|e| AdminError::Internal(format!("agent ID of token: {e}")))?;
            self.store.create_join_token(stored.clone()).await?;
            Ok(pb::CreateJoinTokenResponse {
                token,
                id: stored.id,
                expires_at,
                agent_id: agent_id.to_string(),
            })
        })
    }

    async fn get_bundle(
        &self,
        req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        guarded!(self, req, "GetBundle", {
            let _ = req;
            let bundle = self.ca.bundle();
            Ok(pb::GetBundleResponse {
                spiffe_json: bundle.to_spiffe_json(),
                pem: bundle.x509_authorities_pem(),
            })
        })
    }

    async fn set_federated_bundle(
        &self,
        req: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::FederatedBundle>, Status> {
        guarded!(self, req, "SetFederatedBundle", {
            let td = self.federated_td(&req.trust_domain)?;
            let text = req.bundle.trim_start();
            let bundle = if text.starts_with('{') {
                Bundle::from_spiffe_json(td.clone(), text.as_bytes())
            } else {
                Bundle::from_x509_pem(td.clone(), text.as_bytes())
            }
            .map_err(|e| AdminError::invalid(format!("bundle: {e}")))?;
            let stored = StoredBundle {
                trust_domain: td,
                spiffe_json: bundle.to_spiffe_json(),
            };
            self.store.put_bundle(stored.clone()).await?;
            Ok(pb::FederatedBundle {
                trust_domain: stored.trust_domain.to_string(),
                spiffe_json: stored.spiffe_json,
            })
        })
    }

    async fn list_federated_bundles(
        &self,
        req: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        guarded!(self, req, "ListFederatedBundles", {
            let _ = req;
            let bundles = self
                .store
                .list_bundles()
                .await?
                .into_iter()
                .filter(|b| b.trust_domain != self.policy.trust_domain)
                .map(|b| pb::FederatedBundle {
                    trust_domain: b.trust_domain.to_string(),
                    spiffe_json: b.spiffe_json,
                })
                .collect();
            Ok(pb::ListFederatedBundlesResponse { bundles })
        })
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::DeleteFederatedBundleResponse>, Status> {
        guarded!(self, req, "DeleteFederatedBundle", {
            let td = self.federated_td(&req.trust_domain)?;
            self.store.delete_bundle(&td).await?;
            Ok(pb::DeleteFederatedBundleResponse {})
        })
    }

    async fn mint_x509_svid(
        &self,
        req: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        guarded!(self, req, "MintX509Svid", {
            let id = self.policy.grantable_id("spiffe_id", &req.spiffe_id)?;
            let csr = Csr::parse(&req.csr).map_err(|e| AdminError::invalid(format!("csr: {e}")))?;
            let ttl = self.svid_ttl(req.ttl, self.default_x509_ttl)?;
            let svid = self.ca.sign_x509_svid(&SvidParams {
                spiffe_id: &id,
                public_key: csr.public_key(),
                ttl,
                dns_names: &req.dns_names,
            })?;
            Ok(pb::MintX509SvidResponse {
                cert_chain: svid.cert_chain().iter().map(|c| c.to_vec()).collect(),
                bundle: self
                    .ca
                    .bundle()
                    .x509_authorities()
                    .iter()
                    .map(|c| c.to_vec())
                    .collect(),
                expires_at: unix_secs(svid.not_after()),
            })
        })
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        guarded!(self, req, "MintJwtSvid", {
            let id = self.policy.grantable_id("spiffe_id", &req.spiffe_id)?;
            oxid_pki::jwt::check_audiences(&req.audience)
                .map_err(|e| AdminError::invalid(e.to_string()))?;
            let ttl = self.svid_ttl(req.ttl, self.default_jwt_ttl)?;
            let svid = self.ca.mint_jwt_svid(&id, &req.audience, ttl)?;
            Ok(pb::MintJwtSvidResponse {
                expires_at: unix_secs(svid.expiry),
                token: svid.token,
            })
        })
    }

    async fn get_ca_status(
        &self,
        req: Request<pb::GetCaStatusRequest>,
    ) -> Result<Response<pb::GetCaStatusResponse>, Status> {
        guarded!(self, req, "GetCaStatus", {
            let _ = req;
            Ok(ca_status(&self.ca))
        })
    }

    async fn rotate_ca(
        &self,
        req: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::GetCaStatusResponse>, Status> {
        guarded!(self, req, "RotateCa", {
            match req.step.as_str() {
                "prepare" => self.ca.force_prepare().await?,
                "activate" => self.ca.force_activate().await?,
                "taint" => self.ca.taint(req.sequence).await?,
                other => {
                    return Err(AdminError::invalid(format!(
                        "unknown rotation step {other:?}: expected prepare, activate or taint"
                    )));
                }
            }
            Ok(ca_status(&self.ca))
        })
    }

    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        guarded!(self, req, "Health", {
            let _ = req;
            let reason = not_ready(self.store.as_ref(), &self.ca);
            Ok(pb::HealthResponse {
                ready: reason.is_none(),
                revision: *self.store.revision().borrow(),
                reason: reason.unwrap_or_default(),
            })
        })
    }
}

/// Why the server is not ready, if it is not: it needs an active CA that
/// can sign and a datastore that takes writes. Both the admin `Health` call
/// (`oxid-server healthcheck`) and `/ready` answer from this.
pub fn not_ready(store: &dyn DataStore, ca: &CaManager) -> Option<String> {
    if let Some(failure) = store.write_failure() {
        return Some(format!("datastore unavailable: {failure}"));
    }
    let can_sign = ca
        .authorities()
        .iter()
        .any(|a| a.state == AuthorityState::Active && a.can_sign);
    (!can_sign).then(|| "no active CA can sign".to_owned())
}

fn ca_status(ca: &CaManager) -> pb::GetCaStatusResponse {
    pb::GetCaStatusResponse {
        authorities: ca
            .authorities()
            .into_iter()
            .map(|a| pb::Authority {
                sequence: a.sequence,
                state: match a.state {
                    AuthorityState::Prepared => "prepared",
                    AuthorityState::Active => "active",
                    AuthorityState::Old => "old",
                }
                .into(),
                tainted: a.tainted,
                not_before: a.not_before,
                not_after: a.not_after,
                jwt_key_id: a.jwt_key_id,
                can_sign: a.can_sign,
            })
            .collect(),
    }
}
