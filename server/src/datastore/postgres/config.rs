//! Where the PostgreSQL datastore is and how to reach it: the `[datastore]`
//! table of server.toml and `--datastore-url`.
//!
//! The URL names the user, host, port and database. A password never goes
//! in it: it would end up in shell history, process lists and the output of
//! `validate`. It comes from `password_file` or `PGPASSWORD` instead, and a
//! URL holding one is refused without being echoed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::HumanDuration;

/// Default size of the connection pool (per server).
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Default `statement_timeout` (also the `idle_in_transaction_session_timeout`
/// and the wait for a pooled connection).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the change-feed listener reads the revision with no
/// notification: NOTIFY is only a wake-up, so this bounds how late a change
/// missed some other way is seen.
pub const DEFAULT_FEED_POLL: Duration = Duration::from_secs(5);
/// TCP connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// System CA bundles tried for `verify-full` without `ca_file` (Debian and
/// derivatives, then Red Hat and derivatives).
const SYSTEM_CA_FILES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Why the datastore settings are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PgConfigError {
    /// The URL (never echoed: it may hold a secret).
    #[error("datastore url: {0}")]
    Url(String),
    /// Another setting of the `[datastore]` table.
    #[error("datastore: {0}")]
    Setting(String),
    /// The password could not be read.
    #[error("datastore password: {0}")]
    Password(String),
}

/// The `[datastore]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreFile {
    /// `postgresql://USER@HOST:PORT/DB` (or `postgres://`); unset: sled.
    pub url: Option<String>,
    /// File holding the password (only it; a final newline is ignored).
    pub password_file: Option<PathBuf>,
    /// `disable`, `require` or `verify-full` (the default over TCP).
    pub sslmode: Option<String>,
    /// PEM CA certificates that sign the PostgreSQL server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Connections in the pool (default 16).
    pub pool_size: Option<usize>,
    /// Longest a statement may run, or a session sit idle inside a
    /// transaction (default `10s`).
    pub statement_timeout: Option<HumanDuration>,
}

/// TLS to PostgreSQL, as libpq's `sslmode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext: only on a network you trust, and only when asked for.
    Disable,
    /// Encrypted, the server's certificate not checked (libpq's `require`).
    Require,
    /// Encrypted, the certificate checked against the CAs and the host name.
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = PgConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(Self::Disable),
            "require" => Ok(Self::Require),
            "verify-full" => Ok(Self::VerifyFull),
            // `prefer` and `allow` fall back to plaintext without saying so;
            // `verify-ca` skips the host name.
            other => Err(PgConfigError::Setting(format!(
                "sslmode {other:?}: expected disable, require or verify-full"
            ))),
        }
    }
}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgHost {
    /// A host name or address.
    Tcp(String),
    /// The directory of a Unix socket (no TLS: it never leaves the machine).
    Unix(PathBuf),
}

/// The resolved PostgreSQL settings. Holds no secret: the password is read
/// when the store opens.
#[derive(Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// Server host or socket directory.
    pub host: PgHost,
    /// Server port (also names the socket file).
    pub port: u16,
    /// Role to connect as.
    pub user: String,
    /// Database.
    pub dbname: String,
    /// TLS over TCP.
    pub sslmode: SslMode,
    /// CAs for `verify-full`; unset: the system's bundle.
    pub ca_file: Option<PathBuf>,
    /// Password file; unset: `PGPASSWORD`, else none.
    pub password_file: Option<PathBuf>,
    /// Connections in the pool.
    pub pool_size: usize,
    /// `statement_timeout` and `idle_in_transaction_session_timeout`.
    pub statement_timeout: Duration,
    /// The change-feed listener's poll period.
    pub feed_poll: Duration,
    /// How this server's sessions show in `pg_stat_activity`; the
    /// listener's is this with ` feed` added.
    pub application_name: String,
    /// The server this store serves (`server_name`): the key of its CA
    /// journal and of its rows in the shared bundle.
    pub server_name: String,
    /// The schema version this server migrates to and speaks:
    /// [`super::SCHEMA_VERSION`]. Not a setting of the file: the tests set
    /// an older version to play a server of the previous release during a
    /// rolling upgrade (`schema.rs`, the version policy).
    pub schema_version: i32,
}

impl fmt::Display for PgConfig {
    /// The URL as an operator would write it (never with a password).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            PgHost::Tcp(host) => write!(
                f,
                "postgresql://{}@{host}:{}/{}",
                self.user, self.port, self.dbname
            ),
            PgHost::Unix(dir) => write!(
                f,
                "postgresql://{}@/{}?host={}&port={}",
                self.user,
                self.dbname,
                dir.display(),
                self.port
            ),
        }
    }
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PgConfig({self}, sslmode {:?}, pool {})",
            self.sslmode, self.pool_size
        )
    }
}

/// Splits `sslmode` (ours: libpq's values, which tokio-postgres does not
/// all know) off the URL's query.
fn split_sslmode(url: &str) -> Result<(String, Option<SslMode>), PgConfigError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut kept = Vec::new();
    let mut mode = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", value)) => mode = Some(value.parse()?),
            Some(("sslrootcert", _)) => {
                return Err(PgConfigError::Url(
                    "give the CA file as ca_file in the [datastore] table".into(),
                ));
            }
            _ => kept.push(pair),
        }
    }
    let rebuilt = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rebuilt, mode))
}

impl PgConfig {
    /// Parses a `postgresql://` or `postgres://` URL, with the defaults for
    /// everything the URL does not say.
    pub fn from_url(url: &str) -> Result<Self, PgConfigError> {
        if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
            return Err(PgConfigError::Url(
                "expected postgresql://USER@HOST:PORT/DB (or postgres://)".into(),
            ));
        }
        let (url, sslmode) = split_sslmode(url)?;
        // tokio-postgres' parser knows libpq's URL syntax (percent-encoding,
        // `?host=/socket/dir`); its messages name the option, not the value.
        let parsed: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgConfigError::Url(super::with_causes(&e)))?;
        if parsed.get_password().is_some() {
            return Err(PgConfigError::Url(
                "holds a password: put it in password_file (the [datastore] table) or \
                 PGPASSWORD instead, and change it if the URL was shared"
                    .into(),
            ));
        }
        let host = match parsed.get_hosts() {
            [tokio_postgres::config::Host::Tcp(h)] => PgHost::Tcp(h.clone()),
            [tokio_postgres::config::Host::Unix(dir)] => PgHost::Unix(dir.clone()),
            [] => return Err(PgConfigError::Url("names no host".into())),
            _ => return Err(PgConfigError::Url("names several hosts: give one".into())),
        };
        let port = match parsed.get_ports() {
            [] => 5432,
            [port] => *port,
            _ => return Err(PgConfigError::Url("names several ports: give one".into())),
        };
        let user = parsed
            .get_user()
            .ok_or_else(|| PgConfigError::Url("names no user: postgresql://USER@HOST/DB".into()))?
            .to_owned();
        let dbname = parsed.get_dbname().unwrap_or(&user).to_owned();
        Ok(Self {
            sslmode: sslmode.unwrap_or(SslMode::VerifyFull),
            host,
            port,
            user,
            dbname,
            ca_file: None,
            password_file: None,
            pool_size: DEFAULT_POOL_SIZE,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            feed_poll: DEFAULT_FEED_POLL,
            application_name: "oxid-server".into(),
            server_name: crate::config::DEFAULT_SERVER_NAME.into(),
            schema_version: super::SCHEMA_VERSION,
        })
    }

    /// The PostgreSQL settings of the `[datastore]` table, with `url` (the
    /// flag) winning over the file's; `None` when neither names a URL (the
    /// embedded store).
    pub fn resolve(
        file: Option<DatastoreFile>,
        url: Option<String>,
    ) -> Result<Option<Self>, PgConfigError> {
        let file = file.unwrap_or_default();
        let Some(url) = url.or(file.url) else {
            let set = file.password_file.is_some()
                || file.sslmode.is_some()
                || file.ca_file.is_some()
                || file.pool_size.is_some()
                || file.statement_timeout.is_some();
            if set {
                return Err(PgConfigError::Setting(
                    "PostgreSQL settings without a url: set url (or --datastore-url)".into(),
                ));
            }
            return Ok(None);
        };
        let mut config = Self::from_url(&url)?;
        if let Some(mode) = file.sslmode {
            let mode: SslMode = mode.parse()?;
            if url.contains("sslmode=") && mode != config.sslmode {
                return Err(PgConfigError::Setting(
                    "sslmode differs between the url and the [datastore] table".into(),
                ));
            }
            config.sslmode = mode;
        }
        config.ca_file = file.ca_file;
        config.password_file = file.password_file;
        if let Some(size) = file.pool_size {
            if !(1..=1000).contains(&size) {
                return Err(PgConfigError::Setting(format!(
                    "pool_size {size} must be between 1 and 1000"
                )));
            }
            config.pool_size = size;
        }
        if let Some(t) = file.statement_timeout {
            if t.0 < Duration::from_secs(1) || t.0 > Duration::from_secs(3600) {
                return Err(PgConfigError::Setting(format!(
                    "statement_timeout {t} must be between 1s and 1h"
                )));
            }
            config.statement_timeout = t.0;
        }
        if config.sslmode == SslMode::VerifyFull && matches!(config.host, PgHost::Tcp(_)) {
            config.ca_roots()?;
        }
        Ok(Some(config))
    }

    /// True if connections use TLS (TCP, not disabled).
    pub fn uses_tls(&self) -> bool {
        matches!(self.host, PgHost::Tcp(_)) && self.sslmode != SslMode::Disable
    }

    /// The CA file `verify-full` checks against: `ca_file`, else the
    /// system's bundle.
    pub(super) fn ca_roots(&self) -> Result<PathBuf, PgConfigError> {
        if let Some(file) = &self.ca_file {
            return Ok(file.clone());
        }
        SYSTEM_CA_FILES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .map(Path::to_owned)
            .ok_or_else(|| {
                PgConfigError::Setting(
                    "sslmode verify-full needs ca_file (the CA of the PostgreSQL server's \
                     certificate): no system CA bundle was found"
                        .into(),
                )
            })
    }

    /// The password: `password_file`, else `PGPASSWORD`, else none (peer or
    /// certificate authentication, or a trusting server).
    pub(super) fn password(&self) -> Result<Option<String>, PgConfigError> {
        let Some(path) = &self.password_file else {
            return Ok(std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()));
        };
        use std::os::unix::fs::PermissionsExt as _;
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| PgConfigError::Password(format!("{shown}: {e}")))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(PgConfigError::Password(format!(
                "{shown} is readable by other users: chmod 600 it"
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| PgConfigError::Password(format!("{shown}: {e}")))?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err(PgConfigError::Password(format!("{shown} is empty")));
        }
        Ok(Some(password.to_owned()))
    }

    /// The driver's settings for every connection: the statement and
    /// idle-in-transaction timeouts go in the startup packet, so no pooled
    /// connection runs without them.
    pub(super) fn client_config(
        &self,
        password: Option<&str>,
        application_name: &str,
    ) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        match &self.host {
            PgHost::Tcp(host) => c.host(host),
            PgHost::Unix(dir) => c.host_path(dir),
        };
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(application_name)
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .ssl_mode(if self.uses_tls() {
                tokio_postgres::config::SslMode::Require
            } else {
                tokio_postgres::config::SslMode::Disable
            });
        let ms = self.statement_timeout.as_millis();
        c.options(format!(
            "-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
        ));
        if let Some(p) = password {
            c.password(p);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_safe_defaults() {
        let c = PgConfig::from_url("postgresql://oxid@db.example:6432/ca").unwrap();
        assert_eq!(c.host, PgHost::Tcp("db.example".into()));
        assert_eq!(
            (c.port, c.user.as_str(), c.dbname.as_str()),
            (6432, "oxid", "ca")
        );
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(c.to_string(), "postgresql://oxid@db.example:6432/ca");
        let c = PgConfig::from_url("postgres://oxid@db/ca?sslmode=disable").unwrap();
        assert_eq!((c.port, c.sslmode), (5432, SslMode::Disable));
        let c = PgConfig::from_url("postgresql://oxid@/ca?host=/run/postgresql").unwrap();
        assert_eq!(c.host, PgHost::Unix("/run/postgresql".into()));
        assert!(!c.uses_tls());
    }

    #[test]
    fn a_password_in_the_url_is_refused_and_not_echoed() {
        for url in [
            "postgresql://oxid:hunter2secret@db/ca",
            "postgresql://oxid@db/ca?password=hunter2secret",
        ] {
            let err = PgConfig::from_url(url).unwrap_err().to_string();
            assert!(err.contains("password_file"), "{err}");
            assert!(!err.contains("hunter2secret"), "{err}");
        }
    }

    #[test]
    fn bad_urls_and_settings_are_refused() {
        for url in [
            "mysql://oxid@db/ca",
            "postgresql://db/ca",
            "postgresql://oxid@db/ca?sslmode=prefer",
            "postgresql://oxid@a,b/ca",
        ] {
            assert!(PgConfig::from_url(url).is_err(), "{url}");
        }
        let file = DatastoreFile {
            pool_size: Some(0),
            url: Some("postgresql://oxid@db/ca?sslmode=require".into()),
            ..Default::default()
        };
        assert!(PgConfig::resolve(Some(file), None).is_err());
        let orphan = DatastoreFile {
            sslmode: Some("require".into()),
            ..Default::default()
        };
        assert!(PgConfig::resolve(Some(orphan), None).is_err());
        assert_eq!(PgConfig::resolve(None, None), Ok(None));
    }

    #[test]
    fn server_toml_selects_postgres() {
        let load = |text: &str| {
            crate::config::Config::from_toml(text, Path::new("t.toml"), Default::default())
        };
        assert!(load("").unwrap().postgres.is_none(), "sled by default");
        let c = load(
            "[datastore]\nurl = \"postgresql://a@one/x?sslmode=disable\"\npool_size = 4\n\
             statement_timeout = \"3s\"\n",
        )
        .unwrap();
        let pg = c.postgres.unwrap();
        assert_eq!((pg.pool_size, pg.sslmode), (4, SslMode::Disable));
        assert_eq!(pg.statement_timeout, Duration::from_secs(3));
        let err = load("[datastore]\nurl = \"postgresql://a@one/x\"\npassword = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("password"), "unknown keys are refused: {err}");
    }

    #[test]
    fn the_flag_wins_over_the_file() {
        let file = DatastoreFile {
            url: Some("postgresql://a@one/x?sslmode=disable".into()),
            pool_size: Some(4),
            ..Default::default()
        };
        let c = PgConfig::resolve(
            Some(file),
            Some("postgresql://b@two/y?sslmode=require".into()),
        )
        .unwrap()
        .unwrap();
        assert_eq!((c.user.as_str(), c.pool_size), ("b", 4));
        assert_eq!(c.sslmode, SslMode::Require);
    }
}
