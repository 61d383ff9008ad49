//! `datastore migrate`: a whole store written into an empty database in one
//! transaction, so a failure part-way leaves the database as empty as it
//! was.

use super::{PgStore, db, encode, entries, int};
use crate::datastore::{ChangeEvent, DataStoreError, StoreContents};

/// The tables whose rows make a database "in use".
const TABLES: [(&str, &str); 6] = [
    ("oxid_entries", "entries"),
    ("oxid_agents", "agents"),
    ("oxid_join_tokens", "join tokens"),
    ("oxid_bundles", "bundles"),
    ("oxid_server_journals", "CA journals"),
    ("oxid_authorities", "CA authorities"),
];

impl PgStore {
    /// Writes `contents` into this database, which must hold nothing yet.
    /// Returns the revision the database is at afterwards.
    ///
    /// The revisions continue past the source's: the counter first jumps to
    /// `contents.revision`, then every imported entry, agent, bundle and the
    /// journal take a revision above it. An agent that synced from the old
    /// store holds a revision at most that, so when it resumes against a
    /// server on this database every entry counts as changed since and is
    /// sent again: nothing it missed on the old store can count as sent.
    /// The retention mark is set at the jump, since the revisions below it
    /// were never in this database.
    pub async fn import(&self, contents: StoreContents) -> Result<u64, DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        // The counter's row lock: any server already writing here waits, so
        // the emptiness check holds until the commit.
        tx.execute("SELECT revision FROM oxid_feed FOR UPDATE", &[])
            .await
            .map_err(db)?;
        refuse_if_used(&tx).await?;
        let base = int(contents.revision)?;
        tx.execute(
            "UPDATE oxid_feed SET revision = GREATEST(revision, $1), \
             pruned_up_to = GREATEST(revision, $1)",
            &[&base],
        )
        .await
        .map_err(db)?;
        let mut events = Vec::new();
        insert_entries(&tx, &contents, &mut events).await?;
        for agent in contents.agents {
            tx.execute(
                "INSERT INTO oxid_agents (spiffe_id, agent) VALUES ($1, $2::text::jsonb)",
                &[&agent.spiffe_id.as_str(), &encode(&agent)?],
            )
            .await
            .map_err(db)?;
            events.push(ChangeEvent::AgentUpserted { agent });
        }
        for token in &contents.join_tokens {
            tx.execute(
                "INSERT INTO oxid_join_tokens (hash, token) VALUES ($1, $2::text::jsonb)",
                &[&token.hash.as_str(), &encode(token)?],
            )
            .await
            .map_err(db)?;
        }
        for bundle in contents.bundles {
            tx.execute(
                "INSERT INTO oxid_bundles (trust_domain, bundle) VALUES ($1, $2::text::jsonb)",
                &[&bundle.trust_domain.as_str(), &encode(&bundle)?],
            )
            .await
            .map_err(db)?;
            events.push(ChangeEvent::BundleUpserted { bundle });
        }
        if let Some(journal) = &contents.ca_journal {
            tx.execute(
                "INSERT INTO oxid_server_journals (server, journal) VALUES ($1, $2)",
                &[&self.server_name, journal],
            )
            .await
            .map_err(db)?;
            events.push(ChangeEvent::CaJournalUpdated);
        }
        if events.is_empty() {
            tx.commit().await.map_err(db)?;
            return Ok(contents.revision);
        }
        let changes = self.commit(tx, events).await?;
        Ok(changes.last().map_or(contents.revision, |c| c.revision))
    }
}

/// Refuses a database that holds any row, naming what it holds.
async fn refuse_if_used(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), DataStoreError> {
    let mut found = Vec::new();
    for (table, what) in TABLES {
        let count: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map_err(db)?
            .get(0);
        if count > 0 {
            found.push(format!("{count} {what}"));
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(DataStoreError::AlreadyExists(format!(
        "the target database is not empty (it holds {}): migrate into a new, empty database, \
         before any oxid-server has run on it",
        found.join(", ")
    )))
}

/// The entries, with their IDs, in one insert; their change records go to
/// `events` (`feed::commit` gives them their revisions).
async fn insert_entries(
    tx: &deadpool_postgres::Transaction<'_>,
    contents: &StoreContents,
    events: &mut Vec<ChangeEvent>,
) -> Result<(), DataStoreError> {
    let keys = contents
        .entries
        .iter()
        .map(entries::entry_key)
        .collect::<Result<Vec<_>, _>>()?;
    let none = vec![None; contents.entries.len()];
    let inserted = entries::insert_batch(tx, &contents.entries, &keys, &none).await?;
    if inserted.len() != contents.entries.len() {
        // sled's own uniqueness index makes this a damaged source.
        return Err(DataStoreError::Corrupt(format!(
            "{} of the source's entries share an ID or a (SPIFFE ID, parent, selectors) key",
            contents.entries.len() - inserted.len()
        )));
    }
    events.extend(
        contents
            .entries
            .iter()
            .cloned()
            .map(|entry| ChangeEvent::EntryUpserted { entry }),
    );
    Ok(())
}
