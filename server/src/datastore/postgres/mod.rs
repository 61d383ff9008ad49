//! The PostgreSQL datastore: several servers of one trust domain sharing
//! one database, each following the others' writes through the change feed.
//!
//! # Tables
//!
//! One row per entry, agent, join token and bundle (the value as JSONB, and
//! the columns that are looked up or must be unique); one row per server
//! for its CA journal (`server_name`), and one per server and authority for
//! the trust domain's shared bundle (`authorities.rs`); one per server for
//! its heartbeat, outside the feed (`servers.rs`); `oxid_feed`, one row
//! holding the last revision and the retention mark; `oxid_changes`, the
//! feed (revision → event). Schema versions, migrations and the version
//! policy of rolling upgrades: `schema.rs`.
//!
//! # The contract
//!
//! - **Durable before acknowledged**: a write returns after its `COMMIT`,
//!   which PostgreSQL acknowledges once the commit record is flushed (with
//!   `synchronous_commit` at its default, `on`; an operator who turns it
//!   off gives this up).
//! - **Atomic**: every write is one transaction: the rows, the counter and
//!   the change records.
//! - **Compare-and-swap** (`put_agent`, `update_entry_at`): the stored row
//!   is read `FOR UPDATE`, so the check and the write see the same row; a
//!   create claims its key with `INSERT ... ON CONFLICT DO NOTHING`.
//! - **Join tokens** are taken with one `DELETE ... RETURNING`: exactly one
//!   of any number of concurrent consumers, on any servers, gets the row.
//!
//! # The change feed, and why it has no gaps
//!
//! Every write transaction does its changes, then, as its last step before
//! the feed rows that need the number, runs
//! `UPDATE oxid_feed SET revision = revision + n RETURNING revision`, inserts
//! its `n` change records under the revisions it got, `NOTIFY`s, and
//! commits (`feed::commit`). Write transactions run at READ COMMITTED.
//!
//! Claim: when a reader sees revision `r` committed (in `oxid_feed` or in
//! `oxid_changes`), every revision below `r` is committed and visible to it.
//!
//! Proof. The update takes the row lock of the one `oxid_feed` row and holds
//! it until its transaction ends. A second writer's update blocks on that
//! lock; when the first commits, the second (READ COMMITTED) re-reads the
//! row's committed value and adds to it; when the first rolls back, its
//! increment never existed. So the revisions taken form one sequence with
//! no holes, in the order the lock was granted, and each transaction
//! commits before the next one holding revisions above it can even take
//! them. PostgreSQL releases row locks only after the commit is flushed and
//! the transaction is visible to new snapshots, so the transaction holding
//! `r - 1` is visible before the one holding `r` exists. Hence a snapshot
//! that sees `r` sees everything below it, and
//! `SELECT ... WHERE revision > last ORDER BY revision` always reads a
//! prefix of the feed without holes. In particular the failure of a
//! `SEQUENCE` (the transaction with the lower xid takes the higher number
//! and commits first, and a reader skips the other one, which commits later
//! unseen) cannot happen: the lower number always commits first, whatever
//! the xids (tested in `server/tests/pg_feed.rs`,
//! `a_lower_xid_taking_the_higher_revision_is_seen`).
//!
//! The price is that write transactions serialise from their counter update
//! to their commit. That span is the feed inserts and the commit's flush,
//! which PostgreSQL groups across waiting transactions. One stuck session
//! cannot freeze the feed for long: each connection sets `statement_timeout`
//! and `idle_in_transaction_session_timeout` (`PgConfig::statement_timeout`),
//! and a write that waits too long for the lock fails with a message saying
//! so.
//!
//! # Following other servers
//!
//! `revision()` is a watch that only ever holds a committed revision, and
//! only moves forward. A writer advances it to its own revision after its
//! commit (by the claim, everything below is committed). A listener task per
//! store (`feed::follow`) holds its own connection, `LISTEN`s, and on every
//! notification, every `feed_poll`, and every (re)connection reads
//! `oxid_feed.revision` and advances the watch to it. NOTIFY is only a
//! wake-up: it is lost while the listener is disconnected, which is why a
//! reconnection reads the revision first, and why the timer exists. The
//! index follows the watch with `changes_since`, which reads the feed and
//! its retention mark in one REPEATABLE READ snapshot.
//!
//! A server starting against a long history does not replay it: the index
//! loads the current rows (`list_entries`, `list_agents`) and follows from
//! the revision read before them.

mod authorities;
mod config;
mod entries;
mod feed;
mod import;
mod records;
mod schema;
mod servers;
mod tls;

use std::sync::Arc;

use async_trait::async_trait;
use oxid_pki::{SpiffeId, TrustDomain};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

pub use self::config::{
    DEFAULT_FEED_POLL, DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_TIMEOUT, DatastoreFile, PgConfig,
    PgConfigError, PgHost, SslMode,
};
pub use self::schema::SCHEMA_VERSION;
use super::{
    Agent, Change, ChangeEvent, CreateMode, DataStore, DataStoreError, Entry, EntryFilter, EntryId,
    ForgetOptions, Forgotten, Heartbeat, JoinToken, ServerAuthority, ServerInfo, StoredBundle,
};

/// The PostgreSQL store.
pub struct PgStore {
    pool: deadpool_postgres::Pool,
    revision: Arc<watch::Sender<u64>>,
    /// The listener task, stopped when the store is dropped.
    listener: tokio::task::AbortHandle,
    /// Whether the listener reaches the database.
    health: Arc<feed::FeedHealth>,
    /// The server this store serves: its journal row and bundle rows.
    server_name: String,
    /// The schema version this server speaks (`PgConfig::schema_version`).
    schema_version: i32,
    /// `feed::incarnation`, read once: it cannot change under a running
    /// server.
    incarnation: String,
    /// `PgConfig::statement_timeout`, also the client's own bound where
    /// a call is on an agent's path.
    timeout: std::time::Duration,
    /// This opening of the store, in its heartbeat row (`servers.rs`).
    run: String,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PgStore {
    /// Connects, brings the schema up to date (waiting for another server
    /// that is migrating), reads the current revision and starts following
    /// the feed.
    pub async fn open(config: &PgConfig) -> Result<Self, DataStoreError> {
        let setting = |e: PgConfigError| DataStoreError::Backend(e.to_string());
        let password = config.password().map_err(setting)?;
        let tls = if config.uses_tls() {
            Some(tls::MakeRustls::new(config).map_err(setting)?)
        } else {
            None
        };
        let client_config = config.client_config(password.as_deref(), &config.application_name);
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Some(tls) => {
                deadpool_postgres::Manager::from_config(client_config, tls.clone(), manager_config)
            }
            None => deadpool_postgres::Manager::from_config(
                client_config,
                tokio_postgres::NoTls,
                manager_config,
            ),
        };
        let timeout = Some(config.statement_timeout);
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| DataStoreError::Backend(format!("connection pool: {e}")))?;
        let mut client = pool.get().await.map_err(|e| {
            DataStoreError::Backend(format!("cannot connect to {config}: {}", pool_message(&e)))
        })?;
        schema::migrate(&mut client, config.schema_version).await?;
        let (revision, _) = watch::channel(feed::current(&client).await?);
        let incarnation = feed::incarnation(&client).await?;
        drop(client);
        let revision = Arc::new(revision);
        let health = Arc::new(feed::FeedHealth::new());
        let listener = tokio::spawn(feed::follow(feed::Listener {
            config: config.client_config(
                password.as_deref(),
                &format!("{} feed", config.application_name),
            ),
            tls,
            revision: revision.clone(),
            poll: config.feed_poll,
            timeout: config.statement_timeout,
            health: health.clone(),
        }))
        .abort_handle();
        Ok(Self {
            pool,
            revision,
            listener,
            health,
            server_name: config.server_name.clone(),
            schema_version: config.schema_version,
            incarnation,
            timeout: config.statement_timeout,
            run: new_run()?,
        })
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Client, DataStoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| DataStoreError::Backend(pool_message(&e)))
    }

    /// `feed::commit`, then the watch moves to the last revision taken.
    async fn commit(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        events: Vec<ChangeEvent>,
    ) -> Result<Vec<Change>, DataStoreError> {
        let changes = feed::commit(tx, events).await?;
        if let Some(last) = changes.last() {
            feed::advance(&self.revision, last.revision);
        }
        Ok(changes)
    }
}

#[async_trait]
impl DataStore for PgStore {
    async fn create_entries(
        &self,
        entries: Vec<Entry>,
        mode: CreateMode,
    ) -> Vec<Result<Entry, DataStoreError>> {
        self.create(entries, mode).await
    }

    async fn update_entry(&self, entry: Entry) -> Result<Entry, DataStoreError> {
        self.replace(entry, None).await
    }

    async fn update_entry_at(&self, entry: Entry, revision: u64) -> Result<Entry, DataStoreError> {
        self.replace(entry, Some(revision)).await
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<Entry, DataStoreError> {
        self.delete(id).await
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Entry, DataStoreError> {
        self.get(id).await
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, DataStoreError> {
        self.list(filter).await
    }

    async fn put_agent(
        &self,
        expected: Option<&Agent>,
        agent: Agent,
    ) -> Result<Agent, DataStoreError> {
        self.swap_agent(expected, agent).await
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Agent, DataStoreError> {
        self.agent(id).await
    }

    async fn list_agents(&self) -> Result<Vec<Agent>, DataStoreError> {
        self.agents().await
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<Agent, DataStoreError> {
        self.evict(id).await
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<(), DataStoreError> {
        self.add_token(token).await
    }

    async fn consume_join_token(
        &self,
        hash: &str,
        now_secs: u64,
    ) -> Result<JoinToken, DataStoreError> {
        self.take_token(hash, now_secs).await
    }

    async fn put_bundle(&self, bundle: StoredBundle) -> Result<(), DataStoreError> {
        self.set_bundle(bundle).await
    }

    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<StoredBundle, DataStoreError> {
        self.bundle(trust_domain).await
    }

    async fn list_bundles(&self) -> Result<Vec<StoredBundle>, DataStoreError> {
        self.bundles().await
    }

    async fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<(), DataStoreError> {
        self.drop_bundle(trust_domain).await
    }

    async fn put_ca_journal(&self, journal: Vec<u8>) -> Result<(), DataStoreError> {
        self.set_journal(journal).await
    }

    async fn get_ca_journal(&self) -> Result<Option<Vec<u8>>, DataStoreError> {
        self.journal().await
    }

    async fn put_own_authorities(
        &self,
        authorities: Vec<ServerAuthority>,
    ) -> Result<u64, DataStoreError> {
        self.set_authorities(authorities).await
    }

    async fn own_authorities(&self) -> Result<Vec<ServerAuthority>, DataStoreError> {
        self.mine().await
    }

    async fn peer_authorities_at(&self) -> Result<(Vec<ServerAuthority>, u64), DataStoreError> {
        self.others_authorities().await
    }

    async fn beat(&self, applied_revision: u64) -> Result<(), DataStoreError> {
        self.heartbeat(applied_revision).await
    }

    async fn stop_beating(&self) -> Result<(), DataStoreError> {
        self.mark_stopped().await
    }

    async fn peer_heartbeats(&self) -> Result<Vec<Heartbeat>, DataStoreError> {
        Ok(self
            .heartbeats()
            .await?
            .into_iter()
            .filter(|b| b.server != self.server_name)
            .collect())
    }

    async fn servers(&self) -> Result<Vec<ServerInfo>, DataStoreError> {
        self.list_servers().await
    }

    async fn prune_forgotten_authorities(&self, now_secs: u64) -> Result<usize, DataStoreError> {
        self.prune_forgotten(now_secs).await
    }

    async fn forget_server(
        &self,
        name: &str,
        now_secs: u64,
        options: ForgetOptions,
    ) -> Result<Forgotten, DataStoreError> {
        self.forget(name, now_secs, options).await
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<Change>, DataStoreError> {
        let mut client = self.client().await?;
        feed::changes_since(&mut client, after, limit).await
    }

    async fn prune_changes(&self, up_to: u64) -> Result<usize, DataStoreError> {
        let mut client = self.client().await?;
        feed::prune(&mut client, up_to).await
    }

    fn revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// `oxid_feed.revision` as of now, whatever the listener has seen.
    async fn committed_revision(&self) -> Result<u64, DataStoreError> {
        // An agent's Sync call waits on this. statement_timeout bounds a
        // database that is slow, not a network gone silent (no reset, no
        // answer), which would hold the call until TCP gives up.
        let read = async {
            let client = self.client().await?;
            feed::current(&client).await
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .unwrap_or_else(|_| {
                Err(DataStoreError::Backend(format!(
                    "PostgreSQL: no answer to reading the committed revision within the \
                     statement_timeout ({} ms)",
                    self.timeout.as_millis()
                )))
            })
    }

    /// The listener's connection is the probe: it is dropped at once when
    /// the database goes away, and every `feed_poll` it proves a read.
    fn write_failure(&self) -> Option<String> {
        self.health.failure()
    }

    fn feed_stale_since(&self) -> Option<std::time::Instant> {
        self.health.stale_since()
    }
}

/// A random name for one opening of the store.
fn new_run() -> Result<String, DataStoreError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| DataStoreError::Backend("the system random source failed".into()))?;
    Ok(oxid_pki::hex(&bytes))
}

/// A driver error as the operator should read it.
fn db(e: tokio_postgres::Error) -> DataStoreError {
    DataStoreError::Backend(message(&e))
}

/// PostgreSQL's own message and code, and what the timeouts mean.
fn message(e: &tokio_postgres::Error) -> String {
    use tokio_postgres::error::SqlState;
    let Some(server) = e.as_db_error() else {
        return format!("PostgreSQL: {}", with_causes(e));
    };
    let code = server.code();
    let hint = if code == &SqlState::QUERY_CANCELED {
        " (the statement_timeout passed: another session may hold a lock this write needs; \
         look for one 'idle in transaction' in pg_stat_activity)"
    } else if code == &SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT {
        " (the session sat idle inside a transaction past the statement_timeout)"
    } else {
        ""
    };
    format!("PostgreSQL: {} [{}]{hint}", server.message(), code.code())
}

/// The driver's error and its causes: its own text alone is only the kind
/// ("error connecting to server"), with the reason (refused, no such
/// socket, certificate not trusted) in its source chain.
pub(super) fn with_causes(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Why no pooled connection was had.
fn pool_message(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => message(e),
        deadpool_postgres::PoolError::Timeout(_) => {
            "no PostgreSQL connection came free or could be made within the statement_timeout \
             (every pooled connection busy, or the server unreachable)"
                .to_owned()
        }
        other => format!("PostgreSQL connection pool: {other}"),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<String, DataStoreError> {
    serde_json::to_string(value).map_err(|e| DataStoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(text: &str) -> Result<T, DataStoreError> {
    serde_json::from_str(text).map_err(|e| DataStoreError::Corrupt(e.to_string()))
}

/// A revision or count as PostgreSQL's bigint.
fn int(value: u64) -> Result<i64, DataStoreError> {
    i64::try_from(value).map_err(|_| DataStoreError::Backend(format!("{value} is out of range")))
}

/// A stored bigint as a revision or count.
fn uint(value: i64) -> Result<u64, DataStoreError> {
    u64::try_from(value).map_err(|_| DataStoreError::Corrupt(format!("negative counter {value}")))
}
