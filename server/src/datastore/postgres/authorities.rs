//! The trust domain's shared bundle: one row per server and authority.
//! Each server replaces only its own rows, in one transaction, so servers
//! rotating at once never drop each other's authorities (a single bundle
//! row written whole by each would).

use super::{PgStore, db, decode, encode, int, uint};
use crate::datastore::{ChangeEvent, DataStoreError, ServerAuthority};

impl PgStore {
    pub(super) async fn set_authorities(
        &self,
        authorities: Vec<ServerAuthority>,
    ) -> Result<u64, DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.execute(
            "DELETE FROM oxid_authorities WHERE server = $1",
            &[&self.server_name],
        )
        .await
        .map_err(db)?;
        for mut authority in authorities {
            authority.server.clone_from(&self.server_name);
            tx.execute(
                "INSERT INTO oxid_authorities (server, sequence, authority) \
                 VALUES ($1, $2, $3::text::jsonb)",
                &[
                    &self.server_name,
                    &int(authority.sequence)?,
                    &encode(&authority)?,
                ],
            )
            .await
            .map_err(db)?;
        }
        let changes = self
            .commit(
                tx,
                vec![ChangeEvent::AuthoritiesChanged {
                    server: self.server_name.clone(),
                }],
            )
            .await?;
        // Invariant: one event was committed, so one change came back.
        Ok(changes.last().map_or(0, |c| c.revision))
    }

    pub(super) async fn mine(&self) -> Result<Vec<ServerAuthority>, DataStoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT authority::text FROM oxid_authorities WHERE server = $1 \
                 ORDER BY sequence",
                &[&self.server_name],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| decode::<ServerAuthority>(row.get(0)))
            .collect()
    }

    /// The other servers' rows and the revision they are current as of,
    /// in one REPEATABLE READ snapshot: by the feed's claim (the module
    /// doc), every row committed at or below the counter it reads is in it.
    pub(super) async fn others_authorities(
        &self,
    ) -> Result<(Vec<ServerAuthority>, u64), DataStoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)?;
        let revision = uint(
            tx.query_one("SELECT revision FROM oxid_feed", &[])
                .await
                .map_err(db)?
                .get(0),
        )?;
        let rows = tx
            .query(
                "SELECT authority::text FROM oxid_authorities WHERE server <> $1 \
                 ORDER BY server, sequence",
                &[&self.server_name],
            )
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let rows = rows
            .iter()
            .map(|row| decode::<ServerAuthority>(row.get(0)))
            .collect::<Result<_, _>>()?;
        Ok((rows, revision))
    }
}
