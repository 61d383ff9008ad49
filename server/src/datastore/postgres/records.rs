//! Agents, join tokens, bundles and the CA journal.

use oxid_pki::{SpiffeId, TrustDomain};

use super::{PgStore, db, decode, encode};
use crate::datastore::{Agent, ChangeEvent, DataStoreError, JoinToken, StoredBundle};

impl PgStore {
    /// The compare-and-swap of an agent record: the stored row is locked
    /// (or, for a new record, the insert claims its key) before it is
    /// compared, so of two servers swapping the same record one loses.
    pub(super) async fn swap_agent(
        &self,
        expected: Option<&Agent>,
        agent: Agent,
    ) -> Result<Agent, DataStoreError> {
        let conflict = || DataStoreError::Conflict(format!("agent {}", agent.spiffe_id));
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let id = agent.spiffe_id.as_str();
        let body = encode(&agent)?;
        match expected {
            None => {
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO oxid_agents (spiffe_id, agent) VALUES ($1, $2::text::jsonb) \
                         ON CONFLICT DO NOTHING",
                    )
                    .await
                    .map_err(db)?;
                if tx.execute(&insert, &[&id, &body]).await.map_err(db)? == 0 {
                    return Err(conflict());
                }
            }
            Some(expected) => {
                let lock = tx
                    .prepare_cached(
                        "SELECT agent::text FROM oxid_agents WHERE spiffe_id = $1 FOR UPDATE",
                    )
                    .await
                    .map_err(db)?;
                let stored: Option<Agent> = match tx.query_opt(&lock, &[&id]).await.map_err(db)? {
                    Some(row) => Some(decode(row.get(0))?),
                    None => None,
                };
                if stored.as_ref() != Some(expected) {
                    return Err(conflict());
                }
                let update = tx
                    .prepare_cached(
                        "UPDATE oxid_agents SET agent = $2::text::jsonb WHERE spiffe_id = $1",
                    )
                    .await
                    .map_err(db)?;
                tx.execute(&update, &[&id, &body]).await.map_err(db)?;
            }
        }
        self.commit(
            tx,
            vec![ChangeEvent::AgentUpserted {
                agent: agent.clone(),
            }],
        )
        .await?;
        Ok(agent)
    }

    pub(super) async fn agent(&self, id: &SpiffeId) -> Result<Agent, DataStoreError> {
        let client = self.client().await?;
        let read = client
            .prepare_cached("SELECT agent::text FROM oxid_agents WHERE spiffe_id = $1")
            .await
            .map_err(db)?;
        match client.query_opt(&read, &[&id.as_str()]).await.map_err(db)? {
            Some(row) => decode(row.get(0)),
            None => Err(DataStoreError::NotFound(format!("agent {id}"))),
        }
    }

    pub(super) async fn agents(&self) -> Result<Vec<Agent>, DataStoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT agent::text FROM oxid_agents", &[])
            .await
            .map_err(db)?;
        let mut agents = rows
            .iter()
            .map(|row| decode::<Agent>(row.get(0)))
            .collect::<Result<Vec<_>, _>>()?;
        // Byte order of the ID, whatever the database's collation.
        agents.sort_by(|a, b| a.spiffe_id.as_str().cmp(b.spiffe_id.as_str()));
        Ok(agents)
    }

    pub(super) async fn evict(&self, id: &SpiffeId) -> Result<Agent, DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let row = tx
            .query_opt(
                "DELETE FROM oxid_agents WHERE spiffe_id = $1 RETURNING agent::text",
                &[&id.as_str()],
            )
            .await
            .map_err(db)?
            .ok_or_else(|| DataStoreError::NotFound(format!("agent {id}")))?;
        let old: Agent = decode(row.get(0))?;
        self.commit(tx, vec![ChangeEvent::AgentDeleted { agent: old.clone() }])
            .await?;
        Ok(old)
    }

    /// Join tokens take no revision (nothing follows them): each is one
    /// statement, committed (and so durable) before it returns.
    pub(super) async fn add_token(&self, token: JoinToken) -> Result<(), DataStoreError> {
        let client = self.client().await?;
        let added = client
            .execute(
                "INSERT INTO oxid_join_tokens (hash, token) VALUES ($1, $2::text::jsonb) \
                 ON CONFLICT DO NOTHING",
                &[&token.hash.as_str(), &encode(&token)?],
            )
            .await
            .map_err(db)?;
        if added == 0 {
            return Err(DataStoreError::AlreadyExists("join token".into()));
        }
        Ok(())
    }

    /// `DELETE ... RETURNING` is the single point of truth: of concurrent
    /// consumers on any number of servers, the one whose delete removes the
    /// row gets it; the others find no row.
    pub(super) async fn take_token(
        &self,
        hash: &str,
        now_secs: u64,
    ) -> Result<JoinToken, DataStoreError> {
        let client = self.client().await?;
        let take = client
            .prepare_cached("DELETE FROM oxid_join_tokens WHERE hash = $1 RETURNING token::text")
            .await
            .map_err(db)?;
        let token: JoinToken = match client.query_opt(&take, &[&hash]).await.map_err(db)? {
            Some(row) => decode(row.get(0))?,
            None => return Err(DataStoreError::NotFound("join token".into())),
        };
        if token.expires_at <= now_secs {
            return Err(DataStoreError::TokenExpired);
        }
        Ok(token)
    }

    pub(super) async fn set_bundle(&self, bundle: StoredBundle) -> Result<(), DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.execute(
            "INSERT INTO oxid_bundles (trust_domain, bundle) VALUES ($1, $2::text::jsonb) \
             ON CONFLICT (trust_domain) DO UPDATE SET bundle = EXCLUDED.bundle",
            &[&bundle.trust_domain.as_str(), &encode(&bundle)?],
        )
        .await
        .map_err(db)?;
        self.commit(tx, vec![ChangeEvent::BundleUpserted { bundle }])
            .await?;
        Ok(())
    }

    pub(super) async fn bundle(&self, td: &TrustDomain) -> Result<StoredBundle, DataStoreError> {
        let client = self.client().await?;
        match client
            .query_opt(
                "SELECT bundle::text FROM oxid_bundles WHERE trust_domain = $1",
                &[&td.as_str()],
            )
            .await
            .map_err(db)?
        {
            Some(row) => decode(row.get(0)),
            None => Err(DataStoreError::NotFound(format!("bundle of {td}"))),
        }
    }

    pub(super) async fn bundles(&self) -> Result<Vec<StoredBundle>, DataStoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT bundle::text FROM oxid_bundles", &[])
            .await
            .map_err(db)?;
        let mut bundles = rows
            .iter()
            .map(|row| decode::<StoredBundle>(row.get(0)))
            .collect::<Result<Vec<_>, _>>()?;
        bundles.sort_by(|a, b| a.trust_domain.as_str().cmp(b.trust_domain.as_str()));
        Ok(bundles)
    }

    pub(super) async fn drop_bundle(&self, td: &TrustDomain) -> Result<(), DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let removed = tx
            .execute(
                "DELETE FROM oxid_bundles WHERE trust_domain = $1",
                &[&td.as_str()],
            )
            .await
            .map_err(db)?;
        if removed == 0 {
            return Err(DataStoreError::NotFound(format!("bundle of {td}")));
        }
        self.commit(
            tx,
            vec![ChangeEvent::BundleDeleted {
                trust_domain: td.clone(),
            }],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn set_journal(&self, journal: Vec<u8>) -> Result<(), DataStoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.execute(
            "INSERT INTO oxid_server_journals (server, journal) VALUES ($1, $2) \
             ON CONFLICT (server) DO UPDATE SET journal = EXCLUDED.journal",
            &[&self.server_name, &journal],
        )
        .await
        .map_err(db)?;
        self.commit(tx, vec![ChangeEvent::CaJournalUpdated]).await?;
        Ok(())
    }

    pub(super) async fn journal(&self) -> Result<Option<Vec<u8>>, DataStoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT journal FROM oxid_server_journals WHERE server = $1",
                &[&self.server_name],
            )
            .await
            .map_err(db)?
            .map(|row| row.get(0)))
    }
}
