//! The change feed: revisions taken in commit order (`commit`), reads of
//! the feed (`changes_since`, `prune`), and the listener that moves the
//! revision watch when other servers write (`follow`). The design and why
//! it has no gaps: the module doc of `postgres/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_postgres::AsyncMessage;

use super::tls::MakeRustls;
use super::{db, decode, encode, int, uint};
use crate::datastore::{Change, ChangeEvent, DataStoreError};

/// The NOTIFY channel: a wake-up only, its payload (the revision) is not
/// trusted for anything.
pub(super) const CHANNEL: &str = "oxid_changes";

/// Takes the next `events.len()` revisions, records the events under them
/// and commits. The counter update comes after every other change of the
/// transaction but the feed rows that need its value, so its row lock is
/// held only from there to the commit. Upserted entries get their
/// revision here. Returns the changes as committed.
pub(super) async fn commit(
    tx: deadpool_postgres::Transaction<'_>,
    events: Vec<ChangeEvent>,
) -> Result<Vec<Change>, DataStoreError> {
    let count = int(events.len() as u64)?;
    let bump = tx
        .prepare_cached("UPDATE oxid_feed SET revision = revision + $1 RETURNING revision")
        .await
        .map_err(db)?;
    let last: i64 = tx.query_one(&bump, &[&count]).await.map_err(db)?.get(0);
    let first = uint(last - count + 1)?;
    let mut changes = Vec::with_capacity(events.len());
    let (mut ids, mut entry_revisions) = (Vec::new(), Vec::new());
    for (revision, mut event) in (first..).zip(events) {
        if let ChangeEvent::EntryUpserted { entry } = &mut event {
            entry.revision = revision;
            ids.push(entry.id.as_str().to_owned());
            entry_revisions.push(int(revision)?);
        }
        changes.push(Change { revision, event });
    }
    let revisions = changes
        .iter()
        .map(|c| int(c.revision))
        .collect::<Result<Vec<_>, _>>()?;
    let bodies = changes
        .iter()
        .map(|c| encode(&c.event))
        .collect::<Result<Vec<_>, _>>()?;
    let record = tx
        .prepare_cached(
            "WITH recorded AS (INSERT INTO oxid_changes (revision, event) \
             SELECT r, e::jsonb FROM unnest($1::int8[], $2::text[]) AS u(r, e)) \
             SELECT pg_notify($3, $4)",
        )
        .await
        .map_err(db)?;
    tx.execute(&record, &[&revisions, &bodies, &CHANNEL, &last.to_string()])
        .await
        .map_err(db)?;
    if !ids.is_empty() {
        let stamp = tx
            .prepare_cached(
                "UPDATE oxid_entries AS e SET revision = u.r \
                 FROM unnest($1::text[], $2::int8[]) AS u(id, r) WHERE e.id = u.id",
            )
            .await
            .map_err(db)?;
        tx.execute(&stamp, &[&ids, &entry_revisions])
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    Ok(changes)
}

/// The last committed revision.
pub(super) async fn current(client: &tokio_postgres::Client) -> Result<u64, DataStoreError> {
    let row = client
        .query_one("SELECT revision FROM oxid_feed", &[])
        .await
        .map_err(db)?;
    uint(row.get(0))
}

/// The database's incarnation (`datastore/incarnation.rs`): the cluster's
/// `system_identifier` and the database's OID. `pg_restore` into a new
/// database, or into one dropped and created again, gives a new OID, and a
/// new cluster a new identifier; neither is in a dump, and both stay the
/// same across restarts. A role that may not call `pg_control_system` (a
/// hardened cluster can revoke it) goes by the OID alone.
pub(super) async fn incarnation(client: &tokio_postgres::Client) -> Result<String, DataStoreError> {
    let row = client
        .query_one(
            "SELECT oid FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map_err(db)?;
    let oid: u32 = row.get(0);
    let system = match client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
    {
        Ok(row) => row.get::<_, i64>(0).to_string(),
        Err(e) => {
            tracing::warn!(
                error = %super::message(&e),
                "cannot read the cluster's system_identifier; the store's incarnation is the \
                 database's OID alone"
            );
            "-".to_owned()
        }
    };
    Ok(format!("pg-{system}-{oid}"))
}

/// Changes after `after`, at most `limit`, in one snapshot with the
/// retention mark, so a prune between the two reads cannot hide a change.
pub(super) async fn changes_since(
    client: &mut deadpool_postgres::Client,
    after: u64,
    limit: usize,
) -> Result<Vec<Change>, DataStoreError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db)?;
    let pruned = uint(
        tx.query_one("SELECT pruned_up_to FROM oxid_feed", &[])
            .await
            .map_err(db)?
            .get(0),
    )?;
    if after < pruned {
        return Err(DataStoreError::RevisionGone {
            requested: after,
            oldest: pruned + 1,
        });
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let read = tx
        .prepare_cached(
            "SELECT revision, event::text FROM oxid_changes \
             WHERE revision > $1 ORDER BY revision LIMIT $2",
        )
        .await
        .map_err(db)?;
    let rows = tx.query(&read, &[&int(after)?, &limit]).await.map_err(db)?;
    rows.iter()
        .map(|row| {
            Ok(Change {
                revision: uint(row.get(0))?,
                event: decode(row.get(1))?,
            })
        })
        .collect()
}

/// Drops changes at or below `up_to` (never past the last revision), and
/// raises the retention mark in the same transaction. Returns the rows
/// this call deleted: servers pruning at once each delete a share (or none).
pub(super) async fn prune(
    client: &mut deadpool_postgres::Client,
    up_to: u64,
) -> Result<usize, DataStoreError> {
    let tx = client.transaction().await.map_err(db)?;
    let mark: i64 = tx
        .query_one(
            "UPDATE oxid_feed SET pruned_up_to = GREATEST(pruned_up_to, LEAST($1, revision)) \
             RETURNING pruned_up_to",
            &[&int(up_to)?],
        )
        .await
        .map_err(db)?
        .get(0);
    let removed = tx
        .execute("DELETE FROM oxid_changes WHERE revision <= $1", &[&mark])
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(usize::try_from(removed).unwrap_or(usize::MAX))
}

/// Moves `revision` forward to `to` (never back).
pub(super) fn advance(revision: &watch::Sender<u64>, to: u64) {
    revision.send_if_modified(|r| {
        let newer = to > *r;
        *r = (*r).max(to);
        newer
    });
}

/// What the listener needs to (re)connect.
pub(super) struct Listener {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: Option<MakeRustls>,
    pub(super) revision: Arc<watch::Sender<u64>>,
    pub(super) poll: Duration,
    /// Longest wait for an answer: past it the connection is taken for
    /// dead (a silent network drops no TCP connection for minutes).
    pub(super) timeout: Duration,
    pub(super) health: Arc<FeedHealth>,
}

/// Whether the listener can see the database, for readiness and
/// `oxid_feed_lag_seconds`. While it listens, NOTIFY and the poll keep the
/// revision watch current; while it cannot, other servers' writes go
/// unseen, and so do this server's chances of writing.
#[derive(Debug)]
pub(super) struct FeedHealth(std::sync::Mutex<HealthState>);

#[derive(Debug)]
struct HealthState {
    /// The last read of the committed revision.
    confirmed: Instant,
    /// Why the listener is not listening, while it is not.
    down: Option<String>,
}

impl FeedHealth {
    /// Healthy as of now (the store just read the revision).
    pub(super) fn new() -> Self {
        Self(std::sync::Mutex::new(HealthState {
            confirmed: Instant::now(),
            down: None,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // Plain values: a panic elsewhere cannot leave them half-set.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn confirm(&self) {
        let mut state = self.state();
        state.confirmed = Instant::now();
        state.down = None;
    }

    fn lost(&self, reason: String) {
        self.state().down = Some(reason);
    }

    /// The last confirmed read, while the listener is down.
    pub(super) fn stale_since(&self) -> Option<Instant> {
        let state = self.state();
        state.down.as_ref().map(|_| state.confirmed)
    }

    /// Why the database is unusable, while the listener cannot reach it.
    pub(super) fn failure(&self) -> Option<String> {
        let state = self.state();
        state.down.as_ref().map(|reason| {
            format!(
                "PostgreSQL unreachable for {} s ({reason}); the server reconnects by itself",
                state.confirmed.elapsed().as_secs()
            )
        })
    }
}

/// Backoff between listener reconnects.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Follows other servers' writes, for as long as the store lives (it
/// aborts this task on drop): LISTEN on a connection of its own, and on
/// every notification, every `poll`, and every (re)connection, read the
/// last committed revision and advance the watch to it.
pub(super) async fn follow(listener: Listener) {
    let mut retry = RETRY_MIN;
    loop {
        match listen(&listener).await {
            Ok(reason) => {
                tracing::warn!(%reason, "datastore change feed: listener connection lost, reconnecting");
                listener.health.lost(reason);
                retry = RETRY_MIN;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry, "datastore change feed: cannot listen");
                listener.health.lost(e);
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// One listening connection, until it fails: `Ok` with why after it
/// listened, `Err` if it never did.
async fn listen(listener: &Listener) -> Result<String, String> {
    match &listener.tls {
        Some(tls) => {
            let (client, connection) = listener
                .config
                .connect(tls.clone())
                .await
                .map_err(|e| db(e).to_string())?;
            run(listener, client, connection).await
        }
        None => {
            let (client, connection) = listener
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| db(e).to_string())?;
            run(listener, client, connection).await
        }
    }
}

/// Drives `connection` (turning notifications into wake-ups) while the
/// client listens and reads.
async fn run<S, T>(
    listener: &Listener,
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<S, T>,
) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let wake = Notify::new();
    let drive = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return db(e).to_string(),
                None => return "the server closed the connection".to_owned(),
            }
        }
    };
    let work = async {
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            return Err(db(e).to_string());
        }
        // Listening from here: whatever commits later wakes us, and what
        // committed before (while we were away) is in this first read.
        loop {
            match tokio::time::timeout(listener.timeout, current(&client)).await {
                Ok(Ok(revision)) => {
                    advance(&listener.revision, revision);
                    listener.health.confirm();
                }
                Ok(Err(e)) => return Ok(e.to_string()),
                Err(_) => return Ok("no answer within the statement_timeout".to_owned()),
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(listener.poll) => {}
            }
        }
    };
    tokio::select! {
        reason = drive => Ok(reason),
        outcome = work => outcome,
    }
}
