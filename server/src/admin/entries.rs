//! Entry writes beyond one message: partial updates (read, merge, check,
//! compare-and-swap) and the request header that admits unknown selector
//! types.

use oxid_proto::admin as pb;
use tonic::Request;

use super::AdminError;
use super::convert::{EntryOptions, EntryPolicy, entry_to_pb};
use crate::datastore::{DataStore, DataStoreError, EntryId};

/// Compare-and-swap attempts of a partial entry update racing other writes
/// to the same entry.
const UPDATE_ATTEMPTS: usize = 16;

/// Request metadata that lets CreateEntries and UpdateEntry accept selector
/// types no oxid attestor produces (a future attestor's).
pub const ALLOW_UNKNOWN_SELECTOR_TYPE: &str = "oxid-allow-unknown-selector-type";

/// The Entry fields a partial update may name.
const UPDATABLE_FIELDS: [&str; 9] = [
    "spiffe_id",
    "parent_id",
    "selectors",
    "x509_svid_ttl",
    "jwt_svid_ttl",
    "dns_names",
    "federates_with",
    "hint",
    "expires_at",
];

/// Whether the request carries [`ALLOW_UNKNOWN_SELECTOR_TYPE`]: `true` or
/// `false`, anything else refused.
pub(super) fn allows_unknown_type<T>(req: &Request<T>) -> Result<bool, AdminError> {
    match req.metadata().get(ALLOW_UNKNOWN_SELECTOR_TYPE) {
        None => Ok(false),
        Some(v) => match v.to_str() {
            Ok("true") => Ok(true),
            Ok("false") => Ok(false),
            _ => Err(AdminError::invalid(format!(
                "metadata {ALLOW_UNKNOWN_SELECTOR_TYPE} must be true or false"
            ))),
        },
    }
}

/// Copies the named fields of `from` onto `to` (a partial update).
fn merge_fields(to: &mut pb::Entry, from: &pb::Entry, fields: &[String]) {
    for field in fields {
        match field.as_str() {
            "spiffe_id" => to.spiffe_id.clone_from(&from.spiffe_id),
            "parent_id" => to.parent_id.clone_from(&from.parent_id),
            "selectors" => to.selectors.clone_from(&from.selectors),
            "x509_svid_ttl" => to.x509_svid_ttl = from.x509_svid_ttl,
            "jwt_svid_ttl" => to.jwt_svid_ttl = from.jwt_svid_ttl,
            "dns_names" => to.dns_names.clone_from(&from.dns_names),
            "federates_with" => to.federates_with.clone_from(&from.federates_with),
            "hint" => to.hint.clone_from(&from.hint),
            "expires_at" => to.expires_at = from.expires_at,
            // Checked against UPDATABLE_FIELDS before any merge.
            _ => {}
        }
    }
}

fn check_fields(fields: &[String]) -> Result<(), AdminError> {
    for f in fields {
        if !UPDATABLE_FIELDS.contains(&f.as_str()) {
            return Err(AdminError::invalid(format!(
                "fields: {f:?} cannot be updated; updatable fields are {}",
                UPDATABLE_FIELDS.join(", ")
            )));
        }
    }
    Ok(())
}

/// Changes the named `fields` of the stored entry `entry.id` to those of
/// `entry`: read, merge, check as a whole entry, then write only if the
/// entry is still at the revision read, so a concurrent change is merged
/// again on top of, never overwritten.
pub(super) async fn partial_update(
    store: &dyn DataStore,
    policy: &EntryPolicy,
    entry: &pb::Entry,
    fields: &[String],
    options: EntryOptions,
    now_ms: impl Fn() -> u64,
) -> Result<pb::Entry, AdminError> {
    check_fields(fields)?;
    let id: EntryId = entry
        .id
        .parse()
        .map_err(|e| AdminError::invalid(format!("{e}")))?;
    let mut attempts = 0;
    loop {
        let stored = store.get_entry(&id).await?;
        let mut merged = entry_to_pb(&stored);
        merge_fields(&mut merged, entry, fields);
        let checked = policy.entry(merged, now_ms(), options)?;
        match store.update_entry_at(checked, stored.revision).await {
            Err(DataStoreError::Conflict(_)) if attempts < UPDATE_ATTEMPTS => attempts += 1,
            other => return Ok(entry_to_pb(&other?)),
        }
    }
}
