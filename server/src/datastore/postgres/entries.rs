//! Registration entries: one row each, with the uniqueness key as a UNIQUE
//! column, so two servers creating the same entry at once cannot both win.

use std::collections::HashSet;

use super::{PgStore, db, decode, encode, uint};
use crate::datastore::{ChangeEvent, CreateMode, DataStoreError, Entry, EntryFilter, EntryId};

/// The uniqueness key of an entry (the same hash the sled store uses).
pub(super) fn entry_key(entry: &Entry) -> Result<Vec<u8>, DataStoreError> {
    let encoded = serde_json::to_vec(&entry.unique_key())
        .map_err(|e| DataStoreError::Corrupt(e.to_string()))?;
    Ok(ring::digest::digest(&ring::digest::SHA256, &encoded)
        .as_ref()
        .to_vec())
}

fn key_taken(entry: &Entry) -> DataStoreError {
    DataStoreError::AlreadyExists(format!(
        "an entry for {} with parent {} and these selectors",
        entry.spiffe_id, entry.parent_id
    ))
}

fn id_taken(entry: &Entry) -> DataStoreError {
    DataStoreError::AlreadyExists(format!("entry {}", entry.id))
}

/// A row's entry, with the revision from its column (the JSON's is the
/// one it was inserted with).
fn from_row(row: &tokio_postgres::Row) -> Result<Entry, DataStoreError> {
    let mut entry: Entry = decode(row.get(0))?;
    entry.revision = uint(row.get(1))?;
    Ok(entry)
}

/// Refusals inside the batch itself, first one winning, as if the entries
/// were inserted in order.
fn refused_within(entries: &[Entry], keys: &[Vec<u8>]) -> Vec<Option<DataStoreError>> {
    let (mut seen_keys, mut seen_ids) = (HashSet::new(), HashSet::new());
    entries
        .iter()
        .zip(keys)
        .map(|(entry, key)| {
            if !seen_keys.insert(key.clone()) {
                Some(key_taken(entry))
            } else if !seen_ids.insert(entry.id.clone()) {
                Some(id_taken(entry))
            } else {
                None
            }
        })
        .collect()
}

impl PgStore {
    pub(super) async fn create(
        &self,
        entries: Vec<Entry>,
        mode: CreateMode,
    ) -> Vec<Result<Entry, DataStoreError>> {
        let count = entries.len();
        match self.try_create(entries, mode).await {
            Ok(results) => results,
            Err(e) => (0..count).map(|_| Err(e.clone())).collect(),
        }
    }

    async fn try_create(
        &self,
        entries: Vec<Entry>,
        mode: CreateMode,
    ) -> Result<Vec<Result<Entry, DataStoreError>>, DataStoreError> {
        let keys = entries
            .iter()
            .map(entry_key)
            .collect::<Result<Vec<_>, _>>()?;
        let mut outcome = refused_within(&entries, &keys);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let inserted = insert_batch(&tx, &entries, &keys, &outcome).await?;
        refused_by_store(&tx, &entries, &keys, &inserted, &mut outcome).await?;
        let write = match mode {
            CreateMode::Each => !inserted.is_empty(),
            CreateMode::AllOrNothing => outcome.iter().all(Option::is_none),
            CreateMode::DryRun => false,
        };
        if !write {
            // Dropping the transaction rolls it back: nothing written, no
            // revision taken.
            drop(tx);
            let aborted = mode == CreateMode::AllOrNothing;
            return Ok(entries
                .into_iter()
                .zip(outcome)
                .map(|(entry, refused)| match refused {
                    Some(e) => Err(e),
                    None if aborted => Err(DataStoreError::BatchAborted),
                    None => Ok(entry),
                })
                .collect());
        }
        let events = entries
            .into_iter()
            .zip(&outcome)
            .filter(|(_, refused)| refused.is_none())
            .map(|(entry, _)| ChangeEvent::EntryUpserted { entry })
            .collect();
        let mut stored = self.commit(tx, events).await?.into_iter();
        Ok(outcome
            .into_iter()
            .map(|refused| match refused {
                Some(e) => Err(e),
                None => match stored.next().map(|c| c.event) {
                    Some(ChangeEvent::EntryUpserted { entry }) => Ok(entry),
                    _ => Err(DataStoreError::Backend(
                        "lost track of a created entry".into(),
                    )),
                },
            })
            .collect())
    }

    /// Replaces an existing entry; with `expected`, only if it is still at
    /// that revision (the row is locked between the check and the write).
    pub(super) async fn replace(
        &self,
        entry: Entry,
        expected: Option<u64>,
    ) -> Result<Entry, DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let lock = tx
            .prepare_cached(
                "SELECT entry::text, revision FROM oxid_entries WHERE id = $1 FOR UPDATE",
            )
            .await
            .map_err(db)?;
        let old = match tx
            .query_opt(&lock, &[&entry.id.as_str()])
            .await
            .map_err(db)?
        {
            Some(row) => from_row(&row)?,
            None => return Err(DataStoreError::NotFound(format!("entry {}", entry.id))),
        };
        if expected.is_some_and(|revision| revision != old.revision) {
            return Err(DataStoreError::Conflict(format!(
                "entry {} changed meanwhile (now at revision {})",
                entry.id, old.revision
            )));
        }
        let new = Entry {
            created_at: old.created_at,
            ..entry
        };
        let update = tx
            .prepare_cached(
                "UPDATE oxid_entries SET unique_key = $2, spiffe_id = $3, parent_id = $4, \
                 entry = $5::text::jsonb WHERE id = $1",
            )
            .await
            .map_err(db)?;
        let written = tx
            .execute(
                &update,
                &[
                    &new.id.as_str(),
                    &entry_key(&new)?,
                    &new.spiffe_id.as_str(),
                    &new.parent_id.as_str(),
                    &encode(&new)?,
                ],
            )
            .await;
        match written {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                return Err(key_taken(&new));
            }
            other => other.map_err(db)?,
        };
        match self
            .commit(tx, vec![ChangeEvent::EntryUpserted { entry: new }])
            .await?
            .pop()
            .map(|c| c.event)
        {
            Some(ChangeEvent::EntryUpserted { entry }) => Ok(entry),
            _ => Err(DataStoreError::Backend(
                "lost track of an updated entry".into(),
            )),
        }
    }

    pub(super) async fn delete(&self, id: &EntryId) -> Result<Entry, DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let delete = tx
            .prepare_cached(
                "DELETE FROM oxid_entries WHERE id = $1 RETURNING entry::text, revision",
            )
            .await
            .map_err(db)?;
        let old = match tx.query_opt(&delete, &[&id.as_str()]).await.map_err(db)? {
            Some(row) => from_row(&row)?,
            None => return Err(DataStoreError::NotFound(format!("entry {id}"))),
        };
        self.commit(tx, vec![ChangeEvent::EntryDeleted { entry: old.clone() }])
            .await?;
        Ok(old)
    }

    pub(super) async fn get(&self, id: &EntryId) -> Result<Entry, DataStoreError> {
        let client = self.client().await?;
        let read = client
            .prepare_cached("SELECT entry::text, revision FROM oxid_entries WHERE id = $1")
            .await
            .map_err(db)?;
        match client.query_opt(&read, &[&id.as_str()]).await.map_err(db)? {
            Some(row) => from_row(&row),
            None => Err(DataStoreError::NotFound(format!("entry {id}"))),
        }
    }

    pub(super) async fn list(&self, filter: &EntryFilter) -> Result<Vec<Entry>, DataStoreError> {
        let client = self.client().await?;
        let read = client
            .prepare_cached(
                "SELECT entry::text, revision FROM oxid_entries \
                 WHERE ($1::text IS NULL OR spiffe_id = $1) AND ($2::text IS NULL OR parent_id = $2)",
            )
            .await
            .map_err(db)?;
        let spiffe_id = filter.spiffe_id.as_ref().map(|id| id.as_str());
        let parent_id = filter.parent_id.as_ref().map(|id| id.as_str());
        let rows = client
            .query(&read, &[&spiffe_id, &parent_id])
            .await
            .map_err(db)?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            let entry = from_row(row)?;
            if filter.matches(&entry) {
                entries.push(entry);
            }
        }
        // In Rust, not SQL: the order must not depend on the database's
        // collation (byte order of the ID, as the sled store has it).
        entries.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(entries)
    }
}

/// Inserts the entries not already refused, in one statement; returns the
/// IDs that went in. ON CONFLICT DO NOTHING covers both the ID and the key,
/// and waits for a concurrent insert of either to commit or roll back.
pub(super) async fn insert_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    entries: &[Entry],
    keys: &[Vec<u8>],
    outcome: &[Option<DataStoreError>],
) -> Result<HashSet<String>, DataStoreError> {
    let mut columns = Columns::default();
    for ((entry, key), refused) in entries.iter().zip(keys).zip(outcome) {
        if refused.is_none() {
            columns.push(entry, key)?;
        }
    }
    let insert = tx
        .prepare_cached(
            "INSERT INTO oxid_entries (id, unique_key, spiffe_id, parent_id, revision, entry) \
             SELECT id, k, s, p, 0, e::jsonb \
             FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[]) \
             AS u(id, k, s, p, e) ON CONFLICT DO NOTHING RETURNING id",
        )
        .await
        .map_err(db)?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
        &columns.ids,
        &columns.keys,
        &columns.spiffe_ids,
        &columns.parents,
        &columns.bodies,
    ];
    Ok(tx
        .query(&insert, &params)
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Names why each entry the insert skipped was refused: its key taken
/// (checked first, as sled does), else its ID.
async fn refused_by_store(
    tx: &deadpool_postgres::Transaction<'_>,
    entries: &[Entry],
    keys: &[Vec<u8>],
    inserted: &HashSet<String>,
    outcome: &mut [Option<DataStoreError>],
) -> Result<(), DataStoreError> {
    let skipped = |entry: &Entry, refused: &Option<DataStoreError>| {
        refused.is_none() && !inserted.contains(entry.id.as_str())
    };
    let lost: Vec<&Vec<u8>> = entries
        .iter()
        .zip(keys)
        .zip(outcome.iter())
        .filter(|((e, _), refused)| skipped(e, refused))
        .map(|((_, key), _)| key)
        .collect();
    if lost.is_empty() {
        return Ok(());
    }
    let taken_keys: HashSet<Vec<u8>> = tx
        .query(
            "SELECT unique_key FROM oxid_entries WHERE unique_key = ANY($1)",
            &[&lost],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for ((entry, key), refused) in entries.iter().zip(keys).zip(outcome.iter_mut()) {
        if skipped(entry, refused) {
            *refused = Some(if taken_keys.contains(key) {
                key_taken(entry)
            } else {
                id_taken(entry)
            });
        }
    }
    Ok(())
}

/// The batch as columns, for one `unnest` insert.
#[derive(Default)]
struct Columns {
    ids: Vec<String>,
    keys: Vec<Vec<u8>>,
    spiffe_ids: Vec<String>,
    parents: Vec<String>,
    bodies: Vec<String>,
}

impl Columns {
    fn push(&mut self, entry: &Entry, key: &[u8]) -> Result<(), DataStoreError> {
        self.ids.push(entry.id.as_str().to_owned());
        self.keys.push(key.to_vec());
        self.spiffe_ids.push(entry.spiffe_id.to_string());
        self.parents.push(entry.parent_id.to_string());
        self.bodies.push(encode(entry)?);
        Ok(())
    }
}
