//! The servers sharing the database: each one's heartbeat (schema 3),
//! the list `server list` shows, and forgetting a decommissioned server.
//!
//! A heartbeat is one row per server, `oxid_server_heartbeats`, updated in
//! place and outside the change feed (it takes no revision and wakes no
//! index). Its age is measured by the database's clock in the query that
//! reads it, so the servers' clocks need not agree. A server of schema 2
//! (during a rolling upgrade) writes none and is not waited on.

use std::collections::BTreeMap;
use std::time::Duration;

use super::schema::HEARTBEATS;
use super::{PgStore, db, decode, int, uint};
use crate::datastore::{
    ChangeEvent, DataStoreError, ForgetOptions, Forgotten, Heartbeat, LIVENESS, ServerAuthority,
    ServerInfo,
};

/// Columns of a heartbeat, its age by the database's clock.
const BEAT_COLUMNS: &str = "server, applied_revision, \
     GREATEST(EXTRACT(EPOCH FROM clock_timestamp() - beat_at), 0)::float8, stopped";

fn heartbeat_of(row: &tokio_postgres::Row) -> Result<Heartbeat, DataStoreError> {
    let age: f64 = row.get(2);
    Ok(Heartbeat {
        server: row.get(0),
        applied_revision: uint(row.get(1))?,
        age: Duration::try_from_secs_f64(age).unwrap_or(Duration::MAX),
        stopped: row.get(3),
    })
}

/// The list's record of server `name`, made empty if new.
fn slot<'a>(servers: &'a mut BTreeMap<String, ServerInfo>, name: &str) -> &'a mut ServerInfo {
    servers
        .entry(name.to_owned())
        .or_insert_with(|| ServerInfo {
            server: name.to_owned(),
            has_journal: false,
            heartbeat: None,
            authorities: Vec::new(),
        })
}

impl PgStore {
    fn has_heartbeats(&self) -> bool {
        self.schema_version >= HEARTBEATS
    }

    pub(super) async fn heartbeat(&self, applied: u64) -> Result<(), DataStoreError> {
        if !self.has_heartbeats() {
            return Ok(());
        }
        let client = self.client().await?;
        // The applied revision never moves back, even if beats race. A
        // beat of a run already marked stopped changes nothing: a server's
        // stop aborts its tasks, and a beat they had sent may land after
        // the stop was recorded.
        client
            .execute(
                "INSERT INTO oxid_server_heartbeats \
                 (server, applied_revision, beat_at, stopped, run) \
                 VALUES ($1, $2, clock_timestamp(), false, $3) \
                 ON CONFLICT (server) DO UPDATE SET \
                 applied_revision = GREATEST(oxid_server_heartbeats.applied_revision, \
                 EXCLUDED.applied_revision), beat_at = EXCLUDED.beat_at, stopped = false, \
                 run = EXCLUDED.run \
                 WHERE NOT (oxid_server_heartbeats.stopped AND oxid_server_heartbeats.run = $3)",
                &[&self.server_name, &int(applied)?, &self.run],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    pub(super) async fn mark_stopped(&self) -> Result<(), DataStoreError> {
        if !self.has_heartbeats() {
            return Ok(());
        }
        let client = self.client().await?;
        client
            .execute(
                "UPDATE oxid_server_heartbeats SET stopped = true WHERE server = $1 AND run = $2",
                &[&self.server_name, &self.run],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Every server's heartbeat, by name.
    pub(super) async fn heartbeats(&self) -> Result<Vec<Heartbeat>, DataStoreError> {
        if !self.has_heartbeats() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {BEAT_COLUMNS} FROM oxid_server_heartbeats ORDER BY server"),
                &[],
            )
            .await
            .map_err(db)?;
        rows.iter().map(heartbeat_of).collect()
    }

    pub(super) async fn list_servers(&self) -> Result<Vec<ServerInfo>, DataStoreError> {
        let client = self.client().await?;
        let mut servers: BTreeMap<String, ServerInfo> = BTreeMap::new();
        for row in client
            .query("SELECT server FROM oxid_server_journals", &[])
            .await
            .map_err(db)?
        {
            slot(&mut servers, row.get(0)).has_journal = true;
        }
        for beat in self.heartbeats().await? {
            let name = beat.server.clone();
            slot(&mut servers, &name).heartbeat = Some(beat);
        }
        for row in client
            .query(
                "SELECT authority::text FROM oxid_authorities ORDER BY server, sequence",
                &[],
            )
            .await
            .map_err(db)?
        {
            let authority: ServerAuthority = decode(row.get(0))?;
            let name = authority.server.clone();
            slot(&mut servers, &name).authorities.push(authority);
        }
        Ok(servers.into_values().collect())
    }

    /// Deletes expired rows of servers without a journal; commits through
    /// the feed (one `AuthoritiesChanged` per server) only if any went, so
    /// the check every server runs often takes no revision.
    pub(super) async fn prune_forgotten(&self, now_secs: u64) -> Result<usize, DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let gone = tx
            .query(
                "DELETE FROM oxid_authorities AS a \
                 WHERE (a.authority->>'not_after')::bigint <= $1 \
                 AND NOT EXISTS (SELECT 1 FROM oxid_server_journals AS j \
                 WHERE j.server = a.server) \
                 RETURNING a.server",
                &[&int(now_secs)?],
            )
            .await
            .map_err(db)?;
        if gone.is_empty() {
            tx.rollback().await.map_err(db)?;
            return Ok(0);
        }
        let mut servers: Vec<String> = gone.iter().map(|row| row.get(0)).collect();
        servers.sort();
        servers.dedup();
        let events = servers
            .into_iter()
            .map(|server| ChangeEvent::AuthoritiesChanged { server })
            .collect();
        self.commit(tx, events).await?;
        Ok(gone.len())
    }

    /// One transaction: the heartbeat row is read `FOR UPDATE` (a live
    /// server is refused), then the journal, the heartbeat and the expired
    /// (or, with `force`, all) authority rows are deleted, and the change
    /// enters the feed as the server's `AuthoritiesChanged`, so every other
    /// server re-reads the rows and drops the removed ones from its bundle.
    pub(super) async fn forget(
        &self,
        name: &str,
        now_secs: u64,
        options: ForgetOptions,
    ) -> Result<Forgotten, DataStoreError> {
        if name == self.server_name {
            return Err(DataStoreError::Refused(format!(
                "{name:?} is this server's own name (server_name): a server cannot forget \
                 itself; run the command with the configuration of another server"
            )));
        }
        if !self.has_heartbeats() {
            return Err(DataStoreError::Refused(format!(
                "forgetting a server needs schema version {HEARTBEATS} (this server speaks {})",
                self.schema_version
            )));
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let beat = unless_live(&tx, name).await?;
        let journal = tx
            .execute(
                "DELETE FROM oxid_server_journals WHERE server = $1",
                &[&name],
            )
            .await
            .map_err(db)?
            > 0;
        if journal && beat.is_none() && !options.assume_stopped {
            // The transaction rolls back when dropped: nothing changes.
            return Err(DataStoreError::Refused(format!(
                "server {name:?} has never recorded a heartbeat (a server of schema 2, or one \
                 that has not run since the upgrade), so nothing shows it is stopped; make \
                 sure it is, then give --assume-stopped"
            )));
        }
        tx.execute(
            "DELETE FROM oxid_server_heartbeats WHERE server = $1",
            &[&name],
        )
        .await
        .map_err(db)?;
        let (removed, kept) = match remove_authorities(&tx, name, now_secs, options.force).await? {
            Some(split) => split,
            None if !journal && beat.is_none() => {
                return Err(DataStoreError::NotFound(format!(
                    "server {name:?} (no journal, heartbeat or authority of that name)"
                )));
            }
            None => (Vec::new(), Vec::new()),
        };
        self.commit(
            tx,
            vec![ChangeEvent::AuthoritiesChanged {
                server: name.to_owned(),
            }],
        )
        .await?;
        Ok(Forgotten {
            journal,
            removed,
            kept,
        })
    }
}

/// `name`'s heartbeat, read `FOR UPDATE` in `tx` (a beat waits for the
/// transaction); a live one is refused.
async fn unless_live(
    tx: &deadpool_postgres::Transaction<'_>,
    name: &str,
) -> Result<Option<Heartbeat>, DataStoreError> {
    let beat = tx
        .query_opt(
            &format!(
                "SELECT {BEAT_COLUMNS} FROM oxid_server_heartbeats WHERE server = $1 \
                 FOR UPDATE"
            ),
            &[&name],
        )
        .await
        .map_err(db)?
        .map(|row| heartbeat_of(&row))
        .transpose()?;
    if let Some(beat) = beat.as_ref().filter(|b| b.is_live(LIVENESS)) {
        return Err(DataStoreError::Refused(format!(
            "server {name:?} is live: its last heartbeat was {:.1} s ago. Stop it first \
             (a server killed without a clean stop counts as live until its heartbeat is \
             {} s old)",
            beat.age.as_secs_f64(),
            LIVENESS.as_secs()
        )));
    }
    Ok(beat)
}

/// Deletes `name`'s expired (with `force`, all) authority rows in `tx`:
/// the sequences removed and kept, or `None` if it has no rows.
async fn remove_authorities(
    tx: &deadpool_postgres::Transaction<'_>,
    name: &str,
    now_secs: u64,
    force: bool,
) -> Result<Option<(Vec<u64>, Vec<u64>)>, DataStoreError> {
    let rows = tx
        .query(
            "SELECT authority::text FROM oxid_authorities WHERE server = $1 \
             ORDER BY sequence FOR UPDATE",
            &[&name],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|row| decode::<ServerAuthority>(row.get(0)))
        .collect::<Result<Vec<_>, _>>()?;
    if rows.is_empty() {
        return Ok(None);
    }
    let (gone, kept): (Vec<_>, Vec<_>) = rows
        .into_iter()
        .partition(|a| force || a.not_after <= now_secs);
    let removed: Vec<u64> = gone.iter().map(|a| a.sequence).collect();
    let sequences = removed
        .iter()
        .map(|s| int(*s))
        .collect::<Result<Vec<_>, _>>()?;
    tx.execute(
        "DELETE FROM oxid_authorities WHERE server = $1 AND sequence = ANY($2)",
        &[&name, &sequences],
    )
    .await
    .map_err(db)?;
    Ok(Some((removed, kept.iter().map(|a| a.sequence).collect())))
}
