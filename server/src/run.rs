//! Running a server: open the store, start the CA, serve the admin socket,
//! rotate on schedule, stop cleanly when told to.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, AdminAccess, AdminService, EntryPolicy, SocketError};
use crate::ca::{CaConfig, CaError, CaManager, UpstreamConfig};
use crate::clock::Clock;
use crate::config::{Config, KeyStorage};
use crate::datastore::{DataStore, DataStoreError, SledStore};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The datastore did not open.
    #[error("datastore: {0}")]
    Store(#[from] DataStoreError),
    /// The CA did not start.
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    /// The admin socket could not be bound.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The admin server failed.
    #[error("admin API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// How often the rotation schedule is checked: often enough that a step is
/// never more than 1/120 of the CA lifetime late, never busier than 1/s.
fn rotation_interval(ca_ttl: Duration) -> Duration {
    (ca_ttl / 120).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Runs the server until `shutdown` completes.
pub async fn run(
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let data_dir = &config.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|source| RunError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
    let store: Arc<dyn DataStore> = Arc::new(SledStore::open(
        &data_dir.join("datastore"),
        config.datastore_cache_bytes,
    )?);
    let ca = CaManager::start(
        CaConfig {
            trust_domain: config.trust_domain.clone(),
            key_type: config.ca_key_type,
            ca_ttl: config.ca_ttl,
            key_dir: (config.ca_keys == KeyStorage::Disk).then(|| data_dir.join("keys")),
            upstream: config.upstream.as_ref().map(|u| UpstreamConfig {
                cert_file: u.cert_file.clone(),
                key_file: u.key_file.clone(),
            }),
        },
        clock.clone(),
        store.clone(),
    )
    .await?;

    let listener = admin::bind_unix_socket(&config.socket_path, 0o666)?;
    let access = AdminAccess::new(config.admin_uids.iter().copied()).map_err(|source| {
        RunError::DataDir {
            path: "/proc/self".into(),
            source,
        }
    })?;
    let service = AdminService {
        store: store.clone(),
        ca: ca.clone(),
        clock,
        policy: EntryPolicy {
            trust_domain: config.trust_domain.clone(),
            max_ttl: ca.max_svid_ttl(),
        },
        access,
        default_x509_ttl: config.x509_svid_ttl,
        default_jwt_ttl: config.jwt_svid_ttl,
    };

    let rotation = {
        let ca = ca.clone();
        let every = rotation_interval(config.ca_ttl);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match ca.rotate().await {
                    Ok(crate::ca::Action::None) => {}
                    Ok(action) => tracing::info!(?action, "CA rotation step"),
                    Err(e) => tracing::error!(error = %e, "CA rotation failed; will retry"),
                }
            }
        })
    };

    tracing::info!(
        trust_domain = %config.trust_domain,
        admin_socket = %config.socket_path.display(),
        data_dir = %data_dir.display(),
        "oxid-server ready"
    );
    let result = admin::serve(listener, service, shutdown).await;
    rotation.abort();
    let _ = std::fs::remove_file(&config.socket_path);
    tracing::info!("oxid-server stopped");
    result.map_err(RunError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_interval_is_bounded() {
        assert_eq!(
            rotation_interval(Duration::from_secs(86_400)),
            Duration::from_secs(30)
        );
        assert_eq!(
            rotation_interval(Duration::from_secs(600)),
            Duration::from_secs(5)
        );
        assert_eq!(
            rotation_interval(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
    }
}
