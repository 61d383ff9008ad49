//! The schema and its versioned migrations.
//!
//! `oxid_schema` holds one row: the version applied. At start every server
//! runs `migrate` in one transaction that first takes a transaction-level
//! advisory lock, so of several servers starting at once one migrates and
//! the others wait, then find the version current and go on. DDL is
//! transactional in PostgreSQL: a migration that fails leaves the previous
//! version whole. A database at a version newer than this binary knows is
//! refused: its tables may mean things this server would get wrong.
//!
//! Migrations are only ever appended, never edited: a deployed database
//! has run the old text.
//!
//! # Version policy (rolling upgrades)
//!
//! - A server refuses a schema newer than it knows (above).
//! - Each migration is additive for one step: it adds tables or columns
//!   and leaves everything the previous version reads and writes in place
//!   and meaning the same. So servers of version N-1 that are already
//!   running keep serving while the first server of version N migrates,
//!   and the servers are then restarted on N one at a time (a server of
//!   N-1 restarted after the migration is refused: upgrade it instead).
//! - What a new version adds, the older servers neither write nor read,
//!   and the newer ones must cope with its absence for the servers of
//!   N-1 (version 3's heartbeats: a server without one is not waited on).
//! - A server speaks [`SCHEMA_VERSION`] unless told otherwise
//!   (`PgConfig::schema_version`, which the tests set to play a server of
//!   the previous version: it migrates only that far and uses only what
//!   that version had).

use tokio_postgres::Client;

use super::db;
use crate::datastore::DataStoreError;

/// The advisory-lock key of migrations ("oxid" and 1).
const MIGRATION_LOCK: i64 = 0x6f78_6964_0001;

/// Version 1: entries, agents, join tokens, bundles, the CA journal, the
/// revision counter and the change feed.
const V1: &str = r"
CREATE TABLE oxid_feed (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    -- The last committed revision; every write transaction updates it last,
    -- so its row lock orders the commits (see the module doc of postgres/).
    revision bigint NOT NULL,
    -- Changes at or below this were pruned.
    pruned_up_to bigint NOT NULL
);
INSERT INTO oxid_feed (revision, pruned_up_to) VALUES (0, 0);
CREATE TABLE oxid_changes (
    revision bigint PRIMARY KEY,
    event jsonb NOT NULL
);
CREATE TABLE oxid_entries (
    id text PRIMARY KEY,
    -- SHA-256 of (SPIFFE ID, parent, selectors): one entry per key.
    unique_key bytea NOT NULL UNIQUE,
    spiffe_id text NOT NULL,
    parent_id text NOT NULL,
    revision bigint NOT NULL,
    entry jsonb NOT NULL
);
CREATE INDEX oxid_entries_spiffe_id ON oxid_entries (spiffe_id);
CREATE INDEX oxid_entries_parent_id ON oxid_entries (parent_id);
CREATE TABLE oxid_agents (
    spiffe_id text PRIMARY KEY,
    agent jsonb NOT NULL
);
CREATE TABLE oxid_join_tokens (
    hash text PRIMARY KEY,
    token jsonb NOT NULL
);
CREATE TABLE oxid_bundles (
    trust_domain text PRIMARY KEY,
    bundle jsonb NOT NULL
);
CREATE TABLE oxid_ca_journal (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    journal bytea NOT NULL
);
";

/// Version 2: several servers of one trust domain. Each server's CA
/// journal is a row under its name, and the shared bundle is one row per
/// server and authority, so two servers rotating at once each replace only
/// their own rows. The one journal of version 1 becomes the journal of the
/// server named `default` (what a server is called unless told otherwise);
/// `oxid_ca_journal` stays for servers of version 1 during an upgrade.
const V2: &str = r"
CREATE TABLE oxid_server_journals (
    server text PRIMARY KEY,
    journal bytea NOT NULL
);
INSERT INTO oxid_server_journals (server, journal)
    SELECT 'default', journal FROM oxid_ca_journal;
CREATE TABLE oxid_authorities (
    server text NOT NULL,
    sequence bigint NOT NULL,
    authority jsonb NOT NULL,
    PRIMARY KEY (server, sequence)
);
";

/// Version 3: each server's heartbeat, so a new or rotated authority signs
/// only once every live server has applied the feed revision that carries
/// it (`ca::propagation`). Not in the change feed: a heartbeat every second
/// per server would otherwise take a revision and wake every index.
const V3: &str = r"
CREATE TABLE oxid_server_heartbeats (
    server text PRIMARY KEY,
    -- The feed revision as of which the server's published bundle holds
    -- every server's authorities.
    applied_revision bigint NOT NULL,
    -- By the database's clock, so servers' clocks need not agree.
    beat_at timestamptz NOT NULL,
    -- Set by a clean stop: not live, whatever beat_at says.
    stopped boolean NOT NULL DEFAULT false,
    -- The run (one opening of the store) that beat last: a clean stop
    -- marks its own run stopped, and a beat of that run still on its way
    -- when the server stopped cannot make it live again.
    run text NOT NULL DEFAULT ''
);
";

/// Every migration, in order: index + 1 is the version it brings.
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// The first version with server heartbeats.
pub(super) const HEARTBEATS: i32 = 3;

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Brings the database to `version` (at most [`SCHEMA_VERSION`]), or
/// refuses a newer one. Returns the version found before.
pub(super) async fn migrate(client: &mut Client, version: i32) -> Result<i32, DataStoreError> {
    let known = usize::try_from(version)
        .ok()
        .filter(|v| (1..=MIGRATIONS.len()).contains(v))
        .ok_or_else(|| {
            DataStoreError::Backend(format!(
                "schema version {version} is not one this oxid-server has (1 to {SCHEMA_VERSION})"
            ))
        })?;
    migrate_to(client, &MIGRATIONS[..known]).await
}

/// `migrate` with a given list (tests: an older binary).
async fn migrate_to(client: &mut Client, migrations: &[&str]) -> Result<i32, DataStoreError> {
    let known = i32::try_from(migrations.len()).unwrap_or(i32::MAX);
    let tx = client.transaction().await.map_err(db)?;
    // The others wait here for as long as the migration takes, which the
    // session's statement_timeout must not cut short.
    tx.batch_execute("SET LOCAL statement_timeout = '10min'")
        .await
        .map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS oxid_schema (version integer NOT NULL)")
        .await
        .map_err(db)?;
    let found: i32 = tx
        .query_opt("SELECT version FROM oxid_schema", &[])
        .await
        .map_err(db)?
        .map_or(0, |row| row.get(0));
    if found > known {
        return Err(DataStoreError::Backend(format!(
            "the database schema is at version {found}, newer than the {known} this \
             oxid-server knows: a newer oxid-server has migrated it. Run that version or a \
             later one here"
        )));
    }
    for sql in migrations.iter().skip(usize::try_from(found).unwrap_or(0)) {
        tx.batch_execute(sql).await.map_err(db)?;
    }
    if found == 0 {
        tx.execute("INSERT INTO oxid_schema (version) VALUES ($1)", &[&known])
            .await
            .map_err(db)?;
    } else if found < known {
        tx.execute("UPDATE oxid_schema SET version = $1", &[&known])
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    if found < known {
        tracing::info!(from = found, to = known, "datastore schema migrated");
    }
    Ok(found)
}
