//! Server configuration: a TOML file, then flags (flags win), then
//! documented defaults. Unknown keys are errors, so a typo never silently
//! falls back to a default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use oxid_pki::{KeyAlgorithm, TrustDomain};
use serde::Deserialize;

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";
/// The name a server goes by unless told otherwise (`server_name`).
pub const DEFAULT_SERVER_NAME: &str = "default";
/// Default data directory (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "./.oxid/server";
/// Default agent API address.
pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:8081";
/// Default admin socket.
pub const DEFAULT_SOCKET_PATH: &str = "/run/oxid-server/private/admin.sock";
/// Default for `max_csrs_per_call`.
pub const DEFAULT_MAX_CSRS_PER_CALL: usize = 1000;
/// Default for `max_admin_batch`.
pub const DEFAULT_MAX_ADMIN_BATCH: usize = 1000;
/// Default for `max_request_kib`: tonic's own default of 4 MiB.
pub const DEFAULT_MAX_REQUEST_KIB: usize = 4096;
/// Default for `max_connections` (lowered to fit the open-file limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;
/// Default for `max_connections_per_address`.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// Default for `connection_preface_timeout`.
pub const DEFAULT_PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `connection_idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Batches above this would let one call hold the server for minutes.
const BATCH_CEILING: usize = 100_000;
/// A request must fit a 16 KiB CSR with an 8-certificate node chain.
const REQUEST_KIB_FLOOR: usize = 64;
/// Beyond this one request could make the server buffer a large share of
/// its memory before any check runs.
const REQUEST_KIB_CEILING: usize = 64 * 1024;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a bad value.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key).
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A duration written as `90s`, `5m`, `1h`, `2d` (or plain seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// A rate setting: 0 would refuse every call, so it is an error.
fn positive(name: &str, value: u32) -> Result<u32, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
    }
    Ok(value)
}

/// A size limit: 0 would refuse everything, and past `max` one call could
/// take the server's memory or hold it for minutes.
fn within(name: &str, value: usize, min: usize, max: usize) -> Result<usize, ConfigError> {
    if !(min..=max).contains(&value) {
        return Err(ConfigError::Invalid(format!(
            "{name} {value} must be between {min} and {max}"
        )));
    }
    Ok(value)
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid duration {s:?}: use e.g. 30s, 5m, 1h or 2d");
        let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => s.split_at(i),
            None => (s, "s"),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let secs = n.checked_mul(scale).ok_or_else(bad)?;
        Ok(Self(Duration::from_secs(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        match s {
            s if s % 86_400 == 0 && s > 0 => write!(f, "{}d", s / 86_400),
            s if s % 3600 == 0 && s > 0 => write!(f, "{}h", s / 3600),
            s if s % 60 == 0 && s > 0 => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where CA keys live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStorage {
    /// 0600 files under `<data_dir>/keys`: a restart keeps the same CA.
    Disk,
    /// Memory only: a restart starts a new CA (old roots stay trusted until
    /// they expire).
    Memory,
}

/// The `[ca.upstream]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// PEM: upstream CA certificate, then its chain.
    pub cert_file: PathBuf,
    /// PKCS#8 key, mode 0600.
    pub key_file: PathBuf,
}

/// The `[ca]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaFile {
    /// `ec-p256` (default) or `ec-p384`.
    pub key_type: Option<String>,
    /// Lifetime of each CA (default `24h`).
    pub ttl: Option<HumanDuration>,
    /// `disk` (default) or `memory`.
    pub keys: Option<KeyStorage>,
    /// Default X509-SVID TTL (`1h`).
    pub x509_svid_ttl: Option<HumanDuration>,
    /// Default JWT-SVID TTL (`5m`).
    pub jwt_svid_ttl: Option<HumanDuration>,
    /// Agent SVID TTL (`1h`).
    pub agent_svid_ttl: Option<HumanDuration>,
    /// Sign with an upstream CA on disk instead of self-signing.
    pub upstream: Option<UpstreamFile>,
}

/// `server.toml` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Trust domain name.
    pub trust_domain: Option<String>,
    /// This server's name among the servers of its trust domain sharing one
    /// PostgreSQL database (default `default`): the key of its CA journal
    /// and of its authorities in the shared bundle. Each must differ.
    pub server_name: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Agent API listen address.
    pub bind_address: Option<String>,
    /// Admin socket path.
    pub socket_path: Option<PathBuf>,
    /// PEM file of CAs trusted for x509pop node attestation (x509pop is off
    /// without it).
    pub x509pop_ca_bundle: Option<PathBuf>,
    /// Address for `/metrics`, `/live` and `/ready` (off if unset).
    pub metrics_address: Option<String>,
    /// Extra uids allowed on the admin socket.
    pub admin_uids: Option<Vec<u32>>,
    /// `info`, `debug`, ...
    pub log_level: Option<String>,
    /// `human` or `json`.
    pub log_format: Option<String>,
    /// sled page cache bound in MiB (default 64).
    pub datastore_cache_mb: Option<u64>,
    /// PostgreSQL instead of sled (`url`, `password_file`, `sslmode`,
    /// `ca_file`, `pool_size`, `statement_timeout`).
    pub datastore: Option<crate::datastore::postgres::DatastoreFile>,
    /// Agent-API calls each agent may make per second, bursts of twice that
    /// (default 500): bounds what one stolen agent key can make the server
    /// sign.
    pub agent_requests_per_second: Option<u32>,
    /// Attestations each node may make per minute (default 60).
    pub attestations_per_minute: Option<u32>,
    /// CSRs in one `SignX509Svids` call (default 1000).
    pub max_csrs_per_call: Option<usize>,
    /// Entries (or entry IDs) in one admin call (default 1000).
    pub max_admin_batch: Option<usize>,
    /// Largest gRPC request message on the agent and admin APIs, in KiB
    /// (default 4096).
    pub max_request_kib: Option<usize>,
    /// Agent-API connections open at once (default 8192, lowered to fit the
    /// open-file limit with 512 descriptors kept for the server's files).
    pub max_connections: Option<usize>,
    /// Agent-API connections open at once from one address that have not
    /// presented an agent SVID (default 64); agents with an SVID are not
    /// counted, so many behind one NAT address still connect.
    pub max_connections_per_address: Option<usize>,
    /// Time after the TLS handshake for the HTTP/2 preface (default `10s`).
    pub connection_preface_timeout: Option<HumanDuration>,
    /// Time a connection may stay open with no call in flight (default
    /// `2m`); an open Sync stream is a call in flight.
    pub connection_idle_timeout: Option<HumanDuration>,
    /// Age at which an agent-API connection is closed (default `30m`,
    /// each connection ±10 % at random): its Sync stream ends saying so and
    /// the agent reconnects, to the next server first, so agents spread
    /// over the servers again after one returns.
    pub max_connection_age: Option<HumanDuration>,
    /// How long the change feed keeps a change (default `24h`, `1m` to
    /// `365d`): an index or agent behind by more reloads (`retention.rs`).
    pub change_retention: Option<HumanDuration>,
    /// The CA.
    pub ca: Option<CaFile>,
}

/// Flags of `oxid-server run` that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--trust-domain`.
    pub trust_domain: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--bind-address`.
    pub bind_address: Option<String>,
    /// `--socket-path`.
    pub socket_path: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--metrics-address`.
    pub metrics_address: Option<String>,
    /// `--datastore-url`.
    pub datastore_url: Option<String>,
    /// `--server-name`.
    pub server_name: Option<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// This server's name (see [`ConfigFile::server_name`]).
    pub server_name: String,
    /// Data directory (datastore, CA keys).
    pub data_dir: PathBuf,
    /// Agent API listen address.
    pub bind_address: std::net::SocketAddr,
    /// x509pop node CA bundle file.
    pub x509pop_ca_bundle: Option<PathBuf>,
    /// Metrics and health listener, if any.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Agent SVID TTL.
    pub agent_svid_ttl: Duration,
    /// Admin socket.
    pub socket_path: PathBuf,
    /// Extra admin uids.
    pub admin_uids: Vec<u32>,
    /// Log level filter.
    pub log_level: String,
    /// `human` or `json`.
    pub log_format: String,
    /// sled cache bound, bytes.
    pub datastore_cache_bytes: u64,
    /// The PostgreSQL datastore; `None`: sled in `<data_dir>/datastore`.
    pub postgres: Option<crate::datastore::PgConfig>,
    /// Agent-API calls per agent per second.
    pub agent_requests_per_second: u32,
    /// Attestations per node per minute.
    pub attestations_per_minute: u32,
    /// Most CSRs in one `SignX509Svids` call.
    pub max_csrs_per_call: usize,
    /// Most entries (or entry IDs) in one admin call.
    pub max_admin_batch: usize,
    /// Largest request message on the agent and admin APIs, bytes.
    pub max_request_bytes: usize,
    /// Agent-API connection caps and timeouts (before fitting them to the
    /// open-file limit).
    pub connections: crate::agent_api::ConnSettings,
    /// CA key type.
    pub ca_key_type: KeyAlgorithm,
    /// CA lifetime.
    pub ca_ttl: Duration,
    /// Where CA keys live.
    pub ca_keys: KeyStorage,
    /// Default X509-SVID TTL.
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID TTL.
    pub jwt_svid_ttl: Duration,
    /// Upstream CA, if any.
    pub upstream: Option<UpstreamFile>,
    /// How long the change feed keeps a change.
    pub change_retention: Duration,
}

/// Default `change_retention`.
pub const DEFAULT_CHANGE_RETENTION: Duration = Duration::from_secs(86_400);

/// `change_retention`, strictly within 1m and 365d.
fn change_retention(value: Option<HumanDuration>) -> Result<Duration, ConfigError> {
    let d = value.map_or(DEFAULT_CHANGE_RETENTION, |d| d.0);
    if d < Duration::from_secs(60) || d > Duration::from_secs(365 * 86_400) {
        return Err(ConfigError::Invalid(format!(
            "change_retention {} must be between 1m and 365d",
            HumanDuration(d)
        )));
    }
    Ok(d)
}

/// A server name: 1 to 64 of `a-z`, `0-9`, `.`, `_`, `-` (it shows in
/// logs, metrics and the database).
fn server_name(name: Option<String>) -> Result<String, ConfigError> {
    let name = name.unwrap_or_else(|| DEFAULT_SERVER_NAME.into());
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !valid {
        return Err(ConfigError::Invalid(format!(
            "server_name {name:?}: expected 1 to 64 of a-z, 0-9, '.', '_', '-'"
        )));
    }
    Ok(name)
}

impl Config {
    /// Reads `path` (if given), applies `overrides`, fills defaults, checks.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                Self::from_toml(&text, p, overrides)
            }
            None => Self::resolve(ConfigFile::default(), overrides),
        }
    }

    /// Parses `server.toml` text (`path` names it in errors), applies
    /// `overrides`, fills defaults, checks.
    pub fn from_toml(text: &str, path: &Path, overrides: Overrides) -> Result<Self, ConfigError> {
        let file = toml::from_str::<ConfigFile>(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })?;
        Self::resolve(file, overrides)
    }

    fn resolve(file: ConfigFile, o: Overrides) -> Result<Self, ConfigError> {
        let connections = conn_settings(&file)?;
        let server_name = server_name(o.server_name.or(file.server_name.clone()))?;
        let mut postgres =
            crate::datastore::PgConfig::resolve(file.datastore.clone(), o.datastore_url)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(pg) = &mut postgres {
            pg.server_name.clone_from(&server_name);
        }
        let td_name = o
            .trust_domain
            .or(file.trust_domain)
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into());
        let trust_domain = TrustDomain::new(&td_name)
            .map_err(|e| ConfigError::Invalid(format!("trust_domain {td_name:?}: {e}")))?;
        let ca = file.ca.unwrap_or(CaFile {
            key_type: None,
            ttl: None,
            keys: None,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            agent_svid_ttl: None,
            upstream: None,
        });
        let ca_key_type: KeyAlgorithm = ca
            .key_type
            .as_deref()
            .unwrap_or("ec-p256")
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("ca.key_type: {e}")))?;
        if ca_key_type == KeyAlgorithm::Rsa {
            return Err(ConfigError::Invalid(
                "ca.key_type: oxid generates only ec-p256 or ec-p384 keys".into(),
            ));
        }
        let ca_ttl = ca.ttl.map_or(Duration::from_secs(86_400), |d| d.0);
        let x509_svid_ttl = ca.x509_svid_ttl.map_or(Duration::from_secs(3600), |d| d.0);
        let jwt_svid_ttl = ca.jwt_svid_ttl.map_or(Duration::from_secs(300), |d| d.0);
        let agent_svid_ttl = ca.agent_svid_ttl.map_or(Duration::from_secs(3600), |d| d.0);
        if ca_ttl < Duration::from_secs(60) {
            return Err(ConfigError::Invalid("ca.ttl must be at least 1m".into()));
        }
        for (name, ttl) in [
            ("x509_svid_ttl", x509_svid_ttl),
            ("jwt_svid_ttl", jwt_svid_ttl),
        ] {
            if ttl.is_zero() || ttl > ca_ttl / 6 {
                return Err(ConfigError::Invalid(format!(
                    "ca.{name} {} must be between 1s and ca.ttl / 6 ({})",
                    HumanDuration(ttl),
                    HumanDuration(ca_ttl / 6)
                )));
            }
        }
        let log_format = o
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "human".into());
        if !matches!(log_format.as_str(), "human" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log_format {log_format:?}: expected human or json"
            )));
        }
        let bind = o
            .bind_address
            .or(file.bind_address)
            .unwrap_or_else(|| DEFAULT_BIND_ADDRESS.into());
        let bind_address = bind.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "bind_address {bind:?}: expected ip:port, e.g. 0.0.0.0:8081"
            ))
        })?;
        let metrics_address = match o.metrics_address.or(file.metrics_address) {
            Some(a) => Some(a.parse().map_err(|_| {
                ConfigError::Invalid(format!("metrics_address {a:?}: expected ip:port"))
            })?),
            None => None,
        };
        Ok(Self {
            connections,
            trust_domain,
            server_name,
            bind_address,
            metrics_address,
            x509pop_ca_bundle: file.x509pop_ca_bundle,
            agent_svid_ttl,
            data_dir: o
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            socket_path: o
                .socket_path
                .or(file.socket_path)
                .unwrap_or_else(|| DEFAULT_SOCKET_PATH.into()),
            admin_uids: file.admin_uids.unwrap_or_default(),
            log_level: file.log_level.unwrap_or_else(|| "info".into()),
            log_format,
            datastore_cache_bytes: file.datastore_cache_mb.unwrap_or(64) * 1024 * 1024,
            postgres,
            agent_requests_per_second: positive(
                "agent_requests_per_second",
                file.agent_requests_per_second.unwrap_or(500),
            )?,
            attestations_per_minute: positive(
                "attestations_per_minute",
                file.attestations_per_minute.unwrap_or(60),
            )?,
            max_csrs_per_call: within(
                "max_csrs_per_call",
                file.max_csrs_per_call.unwrap_or(DEFAULT_MAX_CSRS_PER_CALL),
                1,
                BATCH_CEILING,
            )?,
            max_admin_batch: within(
                "max_admin_batch",
                file.max_admin_batch.unwrap_or(DEFAULT_MAX_ADMIN_BATCH),
                1,
                BATCH_CEILING,
            )?,
            max_request_bytes: within(
                "max_request_kib",
                file.max_request_kib.unwrap_or(DEFAULT_MAX_REQUEST_KIB),
                REQUEST_KIB_FLOOR,
                REQUEST_KIB_CEILING,
            )? * 1024,
            ca_key_type,
            ca_ttl,
            ca_keys: ca.keys.unwrap_or(KeyStorage::Disk),
            x509_svid_ttl,
            jwt_svid_ttl,
            upstream: ca.upstream,
            change_retention: change_retention(file.change_retention)?,
        })
    }
}

/// The agent API's connection caps and timeouts.
fn conn_settings(file: &ConfigFile) -> Result<crate::agent_api::ConnSettings, ConfigError> {
    let max = within(
        "max_connections",
        file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        1,
        10_000_000,
    )?;
    let per_address = within(
        "max_connections_per_address",
        file.max_connections_per_address
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_ADDRESS.min(max)),
        1,
        max,
    )?;
    let timeout = |name: &str, value: Option<HumanDuration>, default: Duration| {
        let d = value.map_or(default, |d| d.0);
        if d.is_zero() || d > Duration::from_secs(86_400) {
            return Err(ConfigError::Invalid(format!(
                "{name} {} must be between 1s and 1d",
                HumanDuration(d)
            )));
        }
        Ok(d)
    };
    let max_age = file
        .max_connection_age
        .map_or(crate::agent_api::DEFAULT_MAX_CONNECTION_AGE, |d| d.0);
    if max_age.is_zero() || max_age > Duration::from_secs(7 * 86_400) {
        return Err(ConfigError::Invalid(format!(
            "max_connection_age {} must be between 1s and 7d",
            HumanDuration(max_age)
        )));
    }
    Ok(crate::agent_api::ConnSettings {
        max,
        per_address,
        max_age,
        timeouts: oxid_telemetry::conn::Timeouts {
            preface: timeout(
                "connection_preface_timeout",
                file.connection_preface_timeout,
                DEFAULT_PREFACE_TIMEOUT,
            )?,
            idle: timeout(
                "connection_idle_timeout",
                file.connection_idle_timeout,
                DEFAULT_IDLE_TIMEOUT,
            )?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "t".into(),
            message: e.to_string(),
        })?;
        Config::resolve(file, Overrides::default())
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = parse("").unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.data_dir, PathBuf::from("./.oxid/server"));
        assert_eq!(c.ca_ttl, Duration::from_secs(86_400));
        assert_eq!(c.x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(c.ca_keys, KeyStorage::Disk);
        assert_eq!(c.bind_address.to_string(), "0.0.0.0:8081");
        assert_eq!(c.agent_svid_ttl, Duration::from_secs(3600));
        assert!(c.x509pop_ca_bundle.is_none());
        assert_eq!(c.max_csrs_per_call, 1000);
        assert_eq!(c.max_admin_batch, 1000);
        assert_eq!(c.max_request_bytes, 4 * 1024 * 1024);
        assert_eq!(c.connections.max, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.connections.per_address, 64);
        assert_eq!(c.connections.timeouts.preface, Duration::from_secs(10));
        assert_eq!(c.connections.timeouts.idle, Duration::from_secs(120));
    }

    #[test]
    fn change_retention_has_a_default_and_strict_bounds() {
        assert_eq!(
            parse("").unwrap().change_retention,
            Duration::from_secs(86_400)
        );
        assert_eq!(
            parse("change_retention = \"1m\"").unwrap().change_retention,
            Duration::from_secs(60)
        );
        assert_eq!(
            parse("change_retention = \"365d\"")
                .unwrap()
                .change_retention,
            Duration::from_secs(365 * 86_400)
        );
        for text in [
            "change_retention = \"59s\"",
            "change_retention = \"0s\"",
            "change_retention = \"366d\"",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains("change_retention") && err.contains("between 1m and 365d"),
                "{text}: {err}"
            );
        }
        assert!(parse("change_retention = \"a day\"").is_err());
    }

    #[test]
    fn max_connection_age_has_a_default_and_bounds() {
        assert_eq!(
            parse("").unwrap().connections.max_age,
            Duration::from_secs(1800)
        );
        assert_eq!(
            parse("max_connection_age = \"2s\"")
                .unwrap()
                .connections
                .max_age,
            Duration::from_secs(2)
        );
        for text in ["max_connection_age = \"0s\"", "max_connection_age = \"8d\""] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains("max_connection_age") && err.contains("between 1s and 7d"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn connection_limits_are_checked() {
        let c = parse("max_connections = 100\nconnection_idle_timeout = \"5s\"").unwrap();
        assert_eq!(c.connections.max, 100);
        assert_eq!(c.connections.per_address, 64);
        assert_eq!(c.connections.timeouts.idle, Duration::from_secs(5));
        for (text, key) in [
            ("max_connections = 0", "max_connections"),
            (
                "max_connections = 10\nmax_connections_per_address = 11",
                "max_connections_per_address",
            ),
            (
                "connection_preface_timeout = \"0s\"",
                "connection_preface_timeout",
            ),
            (
                "connection_idle_timeout = \"2d\"",
                "connection_idle_timeout",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn limits_are_settable_and_bounded() {
        let c = parse("max_csrs_per_call = 3\nmax_admin_batch = 2\nmax_request_kib = 64").unwrap();
        assert_eq!(
            (c.max_csrs_per_call, c.max_admin_batch, c.max_request_bytes),
            (3, 2, 64 * 1024)
        );
        for (text, key) in [
            ("max_csrs_per_call = 0", "max_csrs_per_call"),
            ("max_csrs_per_call = 100001", "max_csrs_per_call"),
            ("max_admin_batch = 0", "max_admin_batch"),
            ("max_admin_batch = 1000000000", "max_admin_batch"),
            ("max_request_kib = 0", "max_request_kib"),
            ("max_request_kib = 63", "max_request_kib"),
            ("max_request_kib = 65537", "max_request_kib"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("between"),
                "{text}: {err}"
            );
        }
        // Negative numbers do not parse as sizes at all.
        assert!(parse("max_admin_batch = -1").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(parse("trust_domian = \"x\"").is_err());
        assert!(parse("[ca]\nttll = \"1h\"").is_err());
        assert!(parse("trust_domain = \"Bad Domain\"").is_err());
        assert!(parse("[ca]\nttl = \"1 hour\"").is_err());
        assert!(parse("[ca]\nkey_type = \"rsa\"").is_err());
        assert!(parse("[ca]\nttl = \"1h\"\nx509_svid_ttl = \"1h\"").is_err());
        assert!(parse("log_format = \"xml\"").is_err());
        assert!(parse("[ca]\nkeys = \"cloud\"").is_err());
        assert!(parse("bind_address = \"localhost\"").is_err());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: ConfigFile = toml::from_str("trust_domain = \"file.org\"").unwrap();
        let c = Config::resolve(
            file,
            Overrides {
                trust_domain: Some("flag.org".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.trust_domain.as_str(), "flag.org");
        let file: ConfigFile = toml::from_str("metrics_address = \"127.0.0.1:9000\"").unwrap();
        let flag = |a: &str| Overrides {
            metrics_address: Some(a.into()),
            ..Default::default()
        };
        let c = Config::resolve(file.clone(), flag("127.0.0.1:9100")).unwrap();
        assert_eq!(c.metrics_address, Some("127.0.0.1:9100".parse().unwrap()));
        assert!(Config::resolve(file, flag("nowhere")).is_err());
    }

    #[test]
    fn server_names_are_checked_and_reach_the_datastore() {
        let load = |text: &str| Config::from_toml(text, Path::new("t.toml"), Overrides::default());
        assert_eq!(load("").unwrap().server_name, DEFAULT_SERVER_NAME);
        let c = load(
            "server_name = \"ca-2.eu\"\n[datastore]\nurl = \"postgresql://a@db/x?sslmode=disable\"\n",
        )
        .unwrap();
        assert_eq!(c.server_name, "ca-2.eu");
        assert_eq!(c.postgres.unwrap().server_name, "ca-2.eu");
        for bad in ["", "Upper", "a/b", &"x".repeat(65)] {
            assert!(
                load(&format!("server_name = {bad:?}\n")).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn durations() {
        for (s, secs) in [
            ("30s", 30),
            ("5m", 300),
            ("1h", 3600),
            ("2d", 172_800),
            ("45", 45),
        ] {
            assert_eq!(s.parse::<HumanDuration>().unwrap().0.as_secs(), secs);
        }
        for bad in ["", "h", "1x", "-1s", "1.5h", "99999999999999999999d"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
        assert_eq!(HumanDuration(Duration::from_secs(3600)).to_string(), "1h");
    }
}
