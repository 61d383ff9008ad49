//! Agent configuration: `agent.toml`, then flags (flags win), then defaults.
//! Unknown keys are errors.

use std::path::{Path, PathBuf};

use oxid_pki::TrustDomain;
use serde::Deserialize;

use crate::AgentError;
use crate::identity::Attestation;

/// Default server address.
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:8081";
/// Default `server_keepalive_secs`: a server that stops answering is left
/// within about 5 s.
pub const DEFAULT_SERVER_KEEPALIVE_SECS: u64 = 2;
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./.oxid/agent";
/// Default Workload API socket.
pub const DEFAULT_SOCKET_PATH: &str = "/run/oxid-agent/public/api.sock";

/// Default bound on cached JWT-SVIDs.
pub const DEFAULT_JWT_SVID_CACHE_SIZE: usize = 1000;

/// Default bound on the cached JWT-SVIDs one uid's requests minted.
pub const DEFAULT_JWT_SVID_CACHE_PER_UID: usize = 100;

/// Default JWT-SVID mints a second the agent asks of the server for all
/// workloads together: half the server's default `agent_requests_per_second`
/// (500), so the agent's own calls (Sync, Renew, SignX509Svids) keep the
/// other half however hard workloads push.
pub const DEFAULT_JWT_MINTS_PER_SECOND: u32 = 250;

/// Default JWT-SVID mints a second for one uid: five busy uids are needed
/// to use up [`DEFAULT_JWT_MINTS_PER_SECOND`].
pub const DEFAULT_JWT_MINTS_PER_SECOND_PER_UID: u32 = 50;

/// Largest accepted mint rate; more than any server signs.
const MAX_JWT_MINTS_PER_SECOND: u32 = 100_000;

/// Default bound on Workload API streams open at once by one uid.
pub const DEFAULT_MAX_STREAMS_PER_UID: usize = 2048;

/// Default bound on Workload API connections open at once, all uids
/// together (lowered to fit the open-file limit, see `limits`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Default bound on Workload API connections open at once by one uid.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 1024;

/// Default seconds a new connection has to send the HTTP/2 preface.
pub const DEFAULT_PREFACE_TIMEOUT_SECS: u64 = 10;

/// Default seconds a connection may stay open with no call in flight (an
/// open stream is a call in flight).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 120;

/// Longest accepted timeout: a day.
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// Default bound on one Workload API request, KiB (tonic's own default).
/// Well-formed requests are a few KiB at most: a token to validate is capped
/// at 64 KiB and 32 audiences at 1 KiB each.
pub const DEFAULT_MAX_REQUEST_KIB: usize = 4096;

/// `agent.toml` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// host:port of the server's agent API (one server).
    pub server_address: Option<String>,
    /// host:port of each server's agent API (several servers of one trust
    /// domain; the agent fails over between them). Not with
    /// `server_address`.
    pub server_addresses: Option<Vec<String>>,
    /// Seconds without a frame from the server before the agent pings it
    /// (default 2, 1 to 60); unanswered for half as long again, the
    /// connection is dropped and the next server tried.
    pub server_keepalive_secs: Option<u64>,
    /// Trust domain.
    pub trust_domain: Option<String>,
    /// Bootstrap bundle (PEM).
    pub trust_bundle: Option<PathBuf>,
    /// Join token (prefer `join_token_file`: tokens are secrets).
    pub join_token: Option<String>,
    /// A file holding the join token: mode 0600 or stricter, owned by the
    /// agent's user or root (under systemd's `$CREDENTIALS_DIRECTORY`, the
    /// 0400/0440 root-owned file `LoadCredential=` makes is accepted).
    pub join_token_file: Option<PathBuf>,
    /// x509pop node certificate chain (PEM).
    pub node_cert: Option<PathBuf>,
    /// x509pop node key (PKCS#8, 0600).
    pub node_key: Option<PathBuf>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Workload API socket.
    pub socket_path: Option<PathBuf>,
    /// Address for `/metrics`, `/live`, `/ready` (off if unset).
    pub metrics_address: Option<String>,
    /// X509-SVIDs signed ahead of any request (default 1000); the rest are
    /// signed when a workload first asks.
    pub max_presigned_svids: Option<usize>,
    /// JWT-SVIDs kept for reuse (default 1000); bounds the memory a
    /// workload can make the agent spend by asking for many audiences.
    pub jwt_svid_cache_size: Option<usize>,
    /// Of those, the most that one uid's requests may fill (default 100, at
    /// most `jwt_svid_cache_size`): one workload asking for many audiences
    /// evicts its own tokens, not everyone's.
    pub jwt_svid_cache_per_uid: Option<usize>,
    /// JWT-SVIDs the agent mints at the server a second for all workloads
    /// together, bursts of twice that (default 250; keep it below the
    /// server's `agent_requests_per_second`); cache hits are free.
    pub jwt_mints_per_second: Option<u32>,
    /// JWT-SVIDs minted a second for one uid, bursts of twice that
    /// (default 50, at most `jwt_mints_per_second`).
    pub jwt_mints_per_second_per_uid: Option<u32>,
    /// Workload API streams one uid may hold open at once (default 2048);
    /// bounds what one user's processes can make the agent hold.
    pub max_streams_per_uid: Option<usize>,
    /// Largest Workload API request decoded, KiB (default 4096, 64 to
    /// 65536); larger ones get `OutOfRange` unread.
    pub max_request_kib: Option<usize>,
    /// Workload API connections open at once, all uids together (default
    /// 4096, lowered to fit the open-file limit with 512 descriptors kept
    /// for the agent's own files).
    pub max_connections: Option<usize>,
    /// Workload API connections one uid may hold open at once (default
    /// 1024, at most `max_connections`): enough for a dense node whose
    /// workloads all run as one uid (root in most containers).
    pub max_connections_per_uid: Option<usize>,
    /// Seconds a new connection has to send the HTTP/2 preface (default 10).
    pub connection_preface_timeout_secs: Option<u64>,
    /// Seconds a connection may stay open with no call in flight (default
    /// 120); an open stream is a call in flight and is never timed out.
    pub connection_idle_timeout_secs: Option<u64>,
    /// Log level.
    pub log_level: Option<String>,
    /// `human` or `json`.
    pub log_format: Option<String>,
    /// `[sds]`: Envoy SDS on the Workload API socket.
    pub sds: Option<crate::sds::SdsFile>,
    /// `[[files]]`: SVIDs kept as files by writers the agent supervises.
    #[serde(default)]
    pub files: Vec<crate::files::config::FilesFile>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The servers' addresses, checked, in the order given.
    pub server_addresses: crate::servers::ServerAddresses,
    /// HTTP/2 keepalive ping interval on the connection to the server.
    pub server_keepalive: std::time::Duration,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Bootstrap bundle file.
    pub trust_bundle: Option<PathBuf>,
    /// How to attest when no saved identity exists.
    pub attestation: Option<Attestation>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Metrics and health listener, if any.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// X509-SVIDs signed ahead of any request.
    pub max_presigned_svids: usize,
    /// JWT-SVIDs kept for reuse.
    pub jwt_svid_cache_size: usize,
    /// Cached JWT-SVIDs one uid's requests may fill.
    pub jwt_svid_cache_per_uid: usize,
    /// JWT-SVID mints a second for all workloads together.
    pub jwt_mints_per_second: u32,
    /// JWT-SVID mints a second for one uid.
    pub jwt_mints_per_second_per_uid: u32,
    /// Workload API streams one uid may hold open at once.
    pub max_streams_per_uid: usize,
    /// Largest Workload API request decoded, bytes.
    pub max_request_bytes: usize,
    /// Connection caps and timeouts of the Workload API socket.
    pub connections: crate::workload::limits::ConnSettings,
    /// Log level.
    pub log_level: String,
    /// Log format.
    pub log_format: String,
    /// Envoy SDS.
    pub sds: crate::sds::SdsSettings,
    /// `[[files]]` writers (file only; no flags).
    pub files: Vec<crate::files::config::FilesTable>,
    /// The wall clock (the system's; tests shift it to stage jumps).
    pub clock: crate::clock::WallClock,
}

impl AgentConfig {
    /// Reads `path` (if any), then applies `flags` over it.
    pub fn load(path: Option<&Path>, flags: AgentFile) -> Result<Self, AgentError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| AgentError::Config(format!("{}: {e}", p.display())))?;
                Self::from_toml(&text, flags).map_err(|e| match e {
                    AgentError::Config(m) => AgentError::Config(format!("{}: {m}", p.display())),
                    other => other,
                })
            }
            None => Self::resolve(AgentFile::default(), flags),
        }
    }

    /// Parses `agent.toml` text, then applies `flags` over it.
    pub fn from_toml(text: &str, flags: AgentFile) -> Result<Self, AgentError> {
        let file = toml::from_str::<AgentFile>(text)
            .map_err(|e| AgentError::Config(e.message().to_owned()))?;
        Self::resolve(file, flags)
    }

    fn resolve(file: AgentFile, flags: AgentFile) -> Result<Self, AgentError> {
        let jwt = JwtLimits::resolve(&file, &flags)?;
        let connections = conn_settings(&file, &flags)?;
        let server_addresses = server_addresses(&file, &flags)?;
        let keepalive = flags
            .server_keepalive_secs
            .or(file.server_keepalive_secs)
            .unwrap_or(DEFAULT_SERVER_KEEPALIVE_SECS);
        if !(1..=60).contains(&keepalive) {
            return Err(AgentError::Config(format!(
                "server_keepalive_secs {keepalive} must be between 1 and 60"
            )));
        }
        let pick = |f: Option<String>, d: Option<String>| f.or(d);
        let td_name =
            pick(flags.trust_domain, file.trust_domain).unwrap_or_else(|| "example.org".into());
        let trust_domain = TrustDomain::new(&td_name)
            .map_err(|e| AgentError::Config(format!("trust_domain {td_name:?}: {e}")))?;
        let join_token = match (
            pick(flags.join_token, file.join_token),
            flags.join_token_file.or(file.join_token_file),
        ) {
            (Some(_), Some(_)) => {
                return Err(AgentError::Config(
                    "give either --join-token or --join-token-file, not both".into(),
                ));
            }
            (Some(t), None) => Some(t),
            (None, Some(path)) => Some(read_join_token_file(&path)?),
            (None, None) => None,
        };
        let node_cert = flags.node_cert.or(file.node_cert);
        let node_key = flags.node_key.or(file.node_key);
        let attestation = match (join_token, node_cert, node_key) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(AgentError::Config(
                    "give either a join token or x509pop node credentials, not both".into(),
                ));
            }
            (Some(t), None, None) => Some(Attestation::JoinToken(t)),
            (None, Some(cert), Some(key)) => Some(Attestation::X509Pop { cert, key }),
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(AgentError::Config(
                    "x509pop needs both --node-cert and --node-key".into(),
                ));
            }
            (None, None, None) => None,
        };
        let log_format = pick(flags.log_format, file.log_format).unwrap_or_else(|| "human".into());
        if !matches!(log_format.as_str(), "human" | "json") {
            return Err(AgentError::Config(format!(
                "log_format {log_format:?}: expected human or json"
            )));
        }
        let metrics_address = match flags.metrics_address.or(file.metrics_address) {
            Some(a) => Some(a.parse().map_err(|_| {
                AgentError::Config(format!("metrics_address {a:?}: expected ip:port"))
            })?),
            None => None,
        };
        let max_request_kib = flags
            .max_request_kib
            .or(file.max_request_kib)
            .unwrap_or(DEFAULT_MAX_REQUEST_KIB);
        if !(64..=65_536).contains(&max_request_kib) {
            return Err(AgentError::Config(format!(
                "max_request_kib {max_request_kib} must be between 64 and 65536"
            )));
        }
        let max_streams_per_uid = flags
            .max_streams_per_uid
            .or(file.max_streams_per_uid)
            .unwrap_or(DEFAULT_MAX_STREAMS_PER_UID);
        if max_streams_per_uid == 0 {
            return Err(AgentError::Config(
                "max_streams_per_uid 0 would refuse every stream; use at least 1".into(),
            ));
        }
        let sds =
            crate::sds::SdsSettings::resolve(file.sds, flags.sds).map_err(AgentError::Config)?;
        let files = crate::files::config::resolve(&file.files).map_err(AgentError::Config)?;
        Ok(Self {
            sds,
            files,
            connections,
            jwt_svid_cache_size: jwt.cache_size,
            jwt_svid_cache_per_uid: jwt.cache_per_uid,
            jwt_mints_per_second: jwt.mints_per_second,
            jwt_mints_per_second_per_uid: jwt.mints_per_second_per_uid,
            metrics_address,
            max_request_bytes: max_request_kib * 1024,
            max_streams_per_uid,
            max_presigned_svids: flags
                .max_presigned_svids
                .or(file.max_presigned_svids)
                .unwrap_or(1000),
            server_addresses,
            server_keepalive: std::time::Duration::from_secs(keepalive),
            trust_domain,
            trust_bundle: flags.trust_bundle.or(file.trust_bundle),
            attestation,
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            socket_path: socket_path(flags.socket_path.or(file.socket_path))?,
            log_level: pick(flags.log_level, file.log_level).unwrap_or_else(|| "info".into()),
            log_format,
            clock: crate::clock::WallClock::default(),
        })
    }
}

/// The server addresses: the flags' if any are given, else the file's,
/// else [`DEFAULT_SERVER_ADDRESS`] (see [`crate::servers::choose`]).
fn server_addresses(
    file: &AgentFile,
    flags: &AgentFile,
) -> Result<crate::servers::ServerAddresses, AgentError> {
    crate::servers::choose(
        (
            flags.server_address.as_ref(),
            flags.server_addresses.as_ref(),
        ),
        (file.server_address.as_ref(), file.server_addresses.as_ref()),
        DEFAULT_SERVER_ADDRESS,
    )
    .map_err(AgentError::Config)
}

/// Largest join token file read; a token is a few dozen bytes.
const MAX_JOIN_TOKEN_FILE_LEN: u64 = 4096;

/// Reads a join token file: a regular file owned by the agent's user or
/// root that no one else can read, holding one token (a trailing newline is
/// dropped). systemd's `LoadCredential=` makes its files 0400 owned by root
/// and, for a service with `User=`, adds an ACL entry for that user, which
/// shows as group read (0440): that is accepted under
/// `$CREDENTIALS_DIRECTORY`, where only the ACL's user can read it.
pub fn read_join_token_file(path: &Path) -> Result<String, AgentError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    read_token_file(path, credentials.as_deref())
}

/// [`read_join_token_file`], with systemd's credentials directory given.
fn read_token_file(path: &Path, credentials: Option<&Path>) -> Result<String, AgentError> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let shown = path.display();
    let bad = |m: String| AgentError::Config(format!("join token file {shown}: {m}"));
    // O_NONBLOCK: a FIFO must not hang the start; it is refused below.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(bad(format!(
            "owned by uid {}; it must be owned by the agent's user ({me}) or root",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    let allowed = if credentials.is_some_and(|dir| is_in(path, dir)) {
        0o440
    } else {
        0o600
    };
    if mode & !allowed != 0 {
        return Err(bad(format!(
            "mode {mode:04o} lets others read the token; chmod 600 it (or use systemd's \
             LoadCredential=)"
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_JOIN_TOKEN_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_JOIN_TOKEN_FILE_LEN {
        return Err(bad("larger than a join token".into()));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not text".into()))?;
    let token = text
        .strip_suffix('\n')
        .map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
    if token.is_empty() {
        return Err(bad("empty".into()));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("expected one token on one line".into()));
    }
    Ok(token.to_owned())
}

/// Whether `path` is directly in `dir`, both resolved.
fn is_in(path: &Path, dir: &Path) -> bool {
    match (std::fs::canonicalize(dir), std::fs::canonicalize(path)) {
        (Ok(dir), Ok(file)) => file.parent() == Some(dir.as_path()),
        _ => false,
    }
}

/// The Workload API socket's connection caps and timeouts.
fn conn_settings(
    file: &AgentFile,
    flags: &AgentFile,
) -> Result<crate::workload::limits::ConnSettings, AgentError> {
    let bad = |m: String| Err(AgentError::Config(m));
    let max = flags
        .max_connections
        .or(file.max_connections)
        .unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let per_uid = match flags
        .max_connections_per_uid
        .or(file.max_connections_per_uid)
    {
        None => DEFAULT_MAX_CONNECTIONS_PER_UID.min(max),
        Some(n) => n,
    };
    if max == 0 || per_uid == 0 {
        return bad("max_connections and max_connections_per_uid must be at least 1".into());
    }
    if per_uid > max {
        return bad(format!(
            "max_connections_per_uid {per_uid} must not exceed max_connections {max}"
        ));
    }
    let secs = |name: &str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
        s @ 1..=MAX_TIMEOUT_SECS => Ok(std::time::Duration::from_secs(s)),
        s => Err(AgentError::Config(format!(
            "{name} {s} must be between 1 and {MAX_TIMEOUT_SECS}"
        ))),
    };
    Ok(crate::workload::limits::ConnSettings {
        max,
        per_uid,
        timeouts: oxid_telemetry::conn::Timeouts {
            preface: secs(
                "connection_preface_timeout_secs",
                flags
                    .connection_preface_timeout_secs
                    .or(file.connection_preface_timeout_secs),
                DEFAULT_PREFACE_TIMEOUT_SECS,
            )?,
            idle: secs(
                "connection_idle_timeout_secs",
                flags
                    .connection_idle_timeout_secs
                    .or(file.connection_idle_timeout_secs),
                DEFAULT_IDLE_TIMEOUT_SECS,
            )?,
        },
    })
}

/// The JWT-SVID cache bounds and mint budgets, checked against each other.
struct JwtLimits {
    cache_size: usize,
    cache_per_uid: usize,
    mints_per_second: u32,
    mints_per_second_per_uid: u32,
}

impl JwtLimits {
    fn resolve(file: &AgentFile, flags: &AgentFile) -> Result<Self, AgentError> {
        let bad = |m: String| Err(AgentError::Config(m));
        let cache_size = flags
            .jwt_svid_cache_size
            .or(file.jwt_svid_cache_size)
            .unwrap_or(DEFAULT_JWT_SVID_CACHE_SIZE);
        let cache_per_uid = match flags.jwt_svid_cache_per_uid.or(file.jwt_svid_cache_per_uid) {
            // Unset: the default, but never more than the whole cache.
            None => DEFAULT_JWT_SVID_CACHE_PER_UID.min(cache_size),
            Some(n) if n > cache_size => {
                return bad(format!(
                    "jwt_svid_cache_per_uid {n} must not exceed jwt_svid_cache_size {cache_size}"
                ));
            }
            Some(0) if cache_size > 0 => {
                return bad(
                    "jwt_svid_cache_per_uid 0 would cache nothing; set jwt_svid_cache_size = 0 \
                     to turn the cache off"
                        .into(),
                );
            }
            Some(n) => n,
        };
        let rate = |name: &str, v: Option<u32>, default: u32| match v.unwrap_or(default) {
            r @ 1..=MAX_JWT_MINTS_PER_SECOND => Ok(r),
            r => Err(AgentError::Config(format!(
                "{name} {r} must be between 1 and {MAX_JWT_MINTS_PER_SECOND}"
            ))),
        };
        let mints_per_second = rate(
            "jwt_mints_per_second",
            flags.jwt_mints_per_second.or(file.jwt_mints_per_second),
            DEFAULT_JWT_MINTS_PER_SECOND,
        )?;
        let mints_per_second_per_uid = rate(
            "jwt_mints_per_second_per_uid",
            flags
                .jwt_mints_per_second_per_uid
                .or(file.jwt_mints_per_second_per_uid),
            DEFAULT_JWT_MINTS_PER_SECOND_PER_UID.min(mints_per_second),
        )?;
        if mints_per_second_per_uid > mints_per_second {
            return bad(format!(
                "jwt_mints_per_second_per_uid {mints_per_second_per_uid} must not exceed \
                 jwt_mints_per_second {mints_per_second}"
            ));
        }
        Ok(Self {
            cache_size,
            cache_per_uid,
            mints_per_second,
            mints_per_second_per_uid,
        })
    }
}

/// `socket_path` as a path or a `unix:` URI, as `SPIFFE_ENDPOINT_SOCKET`
/// names it, so the value a workload is given works here too.
fn socket_path(given: Option<PathBuf>) -> Result<PathBuf, AgentError> {
    let Some(path) = given else {
        return Ok(DEFAULT_SOCKET_PATH.into());
    };
    // A path that is not UTF-8 cannot be a URI: it is taken as it is.
    match path.to_str() {
        Some(s) => oxid_tls::socket::parse_socket_address(s)
            .map_err(|e| AgentError::Config(format!("socket_path: {e}"))),
        None => Ok(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_conflicts() {
        let c = AgentConfig::load(None, AgentFile::default()).unwrap();
        assert_eq!(c.server_addresses.to_string(), "127.0.0.1:8081");
        assert!(c.attestation.is_none());
        assert_eq!(c.jwt_svid_cache_size, DEFAULT_JWT_SVID_CACHE_SIZE);
        let both = AgentFile {
            join_token: Some("t".into()),
            node_cert: Some("c".into()),
            node_key: Some("k".into()),
            ..Default::default()
        };
        assert!(AgentConfig::load(None, both).is_err());
        let half = AgentFile {
            node_cert: Some("c".into()),
            ..Default::default()
        };
        assert!(AgentConfig::load(None, half).is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, "jwt_svid_cache_size = 7\n").unwrap();
        let c = AgentConfig::load(Some(&f), AgentFile::default()).unwrap();
        assert_eq!(c.jwt_svid_cache_size, 7);
        std::fs::write(&f, "sever_address = \"x\"\n").unwrap();
        assert!(AgentConfig::load(Some(&f), AgentFile::default()).is_err());
    }

    #[test]
    fn server_addresses_come_from_one_place_and_are_checked() {
        let toml = |text: &str, flags: AgentFile| AgentConfig::from_toml(text, flags);
        let list = |c: AgentConfig| c.server_addresses.to_string();
        assert_eq!(
            list(toml("server_address = \"a.example:1\"\n", AgentFile::default()).unwrap()),
            "a.example:1"
        );
        let three = "server_addresses = [\"a.example:1\", \"10.0.0.2:1\", \"[::1]:1\"]\n";
        assert_eq!(
            list(toml(three, AgentFile::default()).unwrap()),
            "a.example:1, 10.0.0.2:1, [::1]:1"
        );
        // Flags replace the file's list.
        let flags = AgentFile {
            server_addresses: Some(vec!["b.example:2".into(), "c.example:3".into()]),
            ..Default::default()
        };
        assert_eq!(
            list(toml(three, flags).unwrap()),
            "b.example:2, c.example:3"
        );
        for (text, why) in [
            (
                "server_address = \"a:1\"\nserver_addresses = [\"b:1\"]\n",
                "either server_address or server_addresses",
            ),
            ("server_addresses = []\n", "server_addresses is empty"),
            ("server_addresses = [\"a:1\", \"A:1\"]\n", "given twice"),
            (
                "server_addresses = [\"a:1\", \"http://b:1\"]\n",
                "not a URL",
            ),
            ("server_address = \"a\"\n", "no port"),
            ("server_addresses = \"a:1\"\n", "sequence"),
            ("server_keepalive_secs = 0\n", "between 1 and 60"),
            ("server_keepalive_secs = 61\n", "between 1 and 60"),
        ] {
            let e = toml(text, AgentFile::default()).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let both = AgentFile {
            server_address: Some("a:1".into()),
            server_addresses: Some(vec!["b:1".into()]),
            ..Default::default()
        };
        let e = AgentConfig::load(None, both).unwrap_err().to_string();
        assert!(e.contains("flags: give either"), "{e}");
    }

    #[test]
    fn connection_limits_have_defaults_and_are_checked() {
        let c = AgentConfig::load(None, AgentFile::default()).unwrap();
        assert_eq!(c.connections.max, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.connections.per_uid, DEFAULT_MAX_CONNECTIONS_PER_UID);
        assert_eq!(c.connections.timeouts.preface.as_secs(), 10);
        assert_eq!(c.connections.timeouts.idle.as_secs(), 120);
        let load = |toml: &str| AgentConfig::from_toml(toml, AgentFile::default());
        // A small global cap lowers the unset per-uid default.
        assert_eq!(
            load("max_connections = 20\n").unwrap().connections.per_uid,
            20
        );
        for (toml, names) in [
            ("max_connections = 0\n", "at least 1"),
            ("max_connections_per_uid = 0\n", "at least 1"),
            (
                "max_connections = 10\nmax_connections_per_uid = 11\n",
                "must not exceed max_connections 10",
            ),
            (
                "connection_preface_timeout_secs = 0\n",
                "connection_preface_timeout_secs 0",
            ),
            (
                "connection_idle_timeout_secs = 90000\n",
                "connection_idle_timeout_secs 90000",
            ),
        ] {
            let e = load(toml).unwrap_err().to_string();
            assert!(e.contains(names), "{toml}: {e}");
        }
    }

    #[test]
    fn jwt_budgets_and_cache_shares_are_checked() {
        let c = AgentConfig::load(None, AgentFile::default()).unwrap();
        assert_eq!(c.jwt_svid_cache_per_uid, DEFAULT_JWT_SVID_CACHE_PER_UID);
        assert_eq!(c.jwt_mints_per_second, DEFAULT_JWT_MINTS_PER_SECOND);
        assert_eq!(
            c.jwt_mints_per_second_per_uid,
            DEFAULT_JWT_MINTS_PER_SECOND_PER_UID
        );
        let load = |toml: &str| AgentConfig::from_toml(toml, AgentFile::default());
        // A small cache or agent budget lowers the unset per-uid defaults.
        let c = load("jwt_svid_cache_size = 7\njwt_mints_per_second = 3\n").unwrap();
        assert_eq!(c.jwt_svid_cache_per_uid, 7);
        assert_eq!(c.jwt_mints_per_second_per_uid, 3);
        for (toml, names) in [
            (
                "jwt_svid_cache_size = 7\njwt_svid_cache_per_uid = 8\n",
                "jwt_svid_cache_per_uid",
            ),
            ("jwt_svid_cache_per_uid = 0\n", "jwt_svid_cache_per_uid 0"),
            ("jwt_mints_per_second = 0\n", "jwt_mints_per_second 0"),
            (
                "jwt_mints_per_second_per_uid = 0\n",
                "jwt_mints_per_second_per_uid 0",
            ),
            (
                "jwt_mints_per_second = 1000000\n",
                "jwt_mints_per_second 1000000",
            ),
            (
                "jwt_mints_per_second = 10\njwt_mints_per_second_per_uid = 11\n",
                "must not exceed jwt_mints_per_second 10",
            ),
        ] {
            let e = load(toml).unwrap_err().to_string();
            assert!(e.contains(names), "{toml}: {e}");
        }
        assert_eq!(
            load("jwt_svid_cache_size = 0\njwt_svid_cache_per_uid = 0\n")
                .unwrap()
                .jwt_svid_cache_per_uid,
            0,
            "no cache at all"
        );
    }

    #[test]
    fn a_join_token_file_is_checked_and_read() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        let chmod = |mode| {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        std::fs::write(&f, "abc123\n").unwrap();
        chmod(0o600);
        assert_eq!(read_join_token_file(&f).unwrap(), "abc123");
        chmod(0o400);
        assert_eq!(read_join_token_file(&f).unwrap(), "abc123");
        for mode in [0o640, 0o604, 0o644, 0o440, 0o700] {
            chmod(mode);
            let e = read_join_token_file(&f).unwrap_err().to_string();
            assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
        }
        chmod(0o600);
        for (bad, says) in [
            ("", "empty"),
            ("\n", "empty"),
            ("a b\n", "one token"),
            ("a\nb\n", "one token"),
        ] {
            std::fs::write(&f, bad).unwrap();
            let e = read_join_token_file(&f).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        std::fs::write(&f, "tok\r\n").unwrap();
        assert_eq!(read_join_token_file(&f).unwrap(), "tok");
        let e = read_join_token_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // Another user's file: refused even at 0600 (root can chown).
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
            let e = read_join_token_file(&f).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
            std::os::unix::fs::chown(&f, Some(0), None).unwrap();
        }
        // Through the configuration, and never together with a token.
        std::fs::write(&f, "fromfile\n").unwrap();
        let flags = AgentFile {
            join_token_file: Some(f.clone()),
            ..Default::default()
        };
        match AgentConfig::load(None, flags).unwrap().attestation {
            Some(Attestation::JoinToken(t)) => assert_eq!(t, "fromfile"),
            other => panic!("{other:?}"),
        }
        let both = AgentFile {
            join_token: Some("t".into()),
            join_token_file: Some(f.clone()),
            ..Default::default()
        };
        let e = AgentConfig::load(None, both).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        let toml = format!("join_token_file = {:?}\n", f.display().to_string());
        assert!(AgentConfig::from_toml(&toml, AgentFile::default()).is_ok());
    }

    #[test]
    fn a_systemd_credential_may_show_group_read() {
        use std::os::unix::fs::PermissionsExt as _;
        // What LoadCredential= makes for a service with User=: 0400 owned by
        // root plus an ACL entry for the user, which stat shows as 0440.
        let creds = tempfile::tempdir().unwrap();
        let f = creds.path().join("join-token");
        std::fs::write(&f, "cred\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o440)).unwrap();
        assert!(read_token_file(&f, None).is_err(), "0440 outside it");
        let elsewhere = tempfile::tempdir().unwrap();
        assert!(read_token_file(&f, Some(elsewhere.path())).is_err());
        assert_eq!(read_token_file(&f, Some(creds.path())).unwrap(), "cred");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert!(
            read_token_file(&f, Some(creds.path())).is_err(),
            "readable by others even there"
        );
    }
}
