//! The servers an agent may talk to, and which one it talks to now.
//!
//! The operator gives one or more `host:port` addresses (`--server-address`
//! repeated, or `server_addresses` in agent.toml). Each is checked strictly
//! here ([`ServerAddress::parse`], [`ServerAddresses::new`]); a DNS name is
//! resolved at every connection attempt and each address it resolves to is
//! a candidate of its own. The agent keeps one connection: [`Servers`]
//! dials the candidates in order, starting with the server it was on (a new
//! channel for a renewed SVID) or the one after it (its connection failed,
//! or the server ended it at its maximum age), and remembers where it got
//! through, so sync can tell a failover from a reconnection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

/// Most addresses an agent takes: more is a mistake, not a deployment.
pub const MAX_SERVER_ADDRESSES: usize = 32;
/// Longest address accepted (a DNS name is at most 253 bytes).
const MAX_ADDRESS_LEN: usize = 261;
/// How long one DNS lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP connect to one address may take: short enough that a
/// silent address does not hold up the next one for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the TLS handshake with one address may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One checked `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    /// As given (the host in lower case).
    text: String,
    /// The port, 1 to 65535.
    port: u16,
    /// The host as an IP address, if it is one.
    ip: Option<IpAddr>,
}

impl std::fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl ServerAddress {
    /// Parses `host:port`: an IPv4 address, an IPv6 address in brackets
    /// (`[::1]:8081`), or a DNS name; the port 1 to 65535. Anything else
    /// (a URL, a path, spaces, a bare IPv6 address, port 0) is refused,
    /// saying why.
    pub fn parse(given: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("server address {given:?}: {why}"));
        if given.is_empty() {
            return bad("empty; expected host:port");
        }
        if given.len() > MAX_ADDRESS_LEN {
            return bad("too long; expected host:port");
        }
        if given.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad("contains spaces or control characters");
        }
        if given.contains("://") {
            return bad("expected host:port, not a URL");
        }
        let (host, port) = if let Some(rest) = given.strip_prefix('[') {
            let Some((v6, port)) = rest.split_once("]:") else {
                return bad("expected [IPv6 address]:port");
            };
            match v6.parse::<std::net::Ipv6Addr>() {
                Ok(_) => (v6, port),
                Err(_) => return bad("not an IPv6 address in the brackets"),
            }
        } else {
            let Some((host, port)) = given.rsplit_once(':') else {
                return bad("no port; expected host:port");
            };
            if host.contains(':') {
                return bad("an IPv6 address needs brackets, as in [::1]:8081");
            }
            (host, port)
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return bad("the port must be a number");
        }
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => return bad("the port must be between 1 and 65535"),
            Ok(p) => p,
        };
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                check_dns_name(host).map_err(|why| format!("server address {given:?}: {why}"))?;
                None
            }
        };
        let text = match ip {
            Some(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            Some(IpAddr::V4(v4)) => format!("{v4}:{port}"),
            None => format!("{}:{port}", host.to_ascii_lowercase()),
        };
        Ok(Self { text, port, ip })
    }

    /// The socket addresses this resolves to, in the resolver's order.
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Some(ip) = self.ip {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(&self.text))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS lookup timed out")
            })??;
        Ok(found.collect())
    }
}

/// A DNS name as a host: letters, digits and hyphens in labels of 1 to 63,
/// at most 253 in all, no label starting or ending with a hyphen, and not
/// all digits in the last label (that is a mistyped IPv4 address).
fn check_dns_name(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("no host; expected host:port".into());
    }
    if host.len() > 253 {
        return Err("the host name is longer than 253 characters".into());
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("the host name has an empty label or one past 63 characters".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(
                "the host must be an IP address or a DNS name (letters, digits, hyphens)".into(),
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a host name label may not start or end with a hyphen".into());
        }
    }
    if host
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("not a valid IPv4 address".into());
    }
    Ok(())
}

/// The checked list: at least one, at most [`MAX_SERVER_ADDRESSES`], no
/// address twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddresses(Vec<ServerAddress>);

impl ServerAddresses {
    /// Checks every address in `given`, in order.
    pub fn new<S: AsRef<str>>(given: &[S]) -> Result<Self, String> {
        if given.is_empty() {
            return Err("no server address given".into());
        }
        if given.len() > MAX_SERVER_ADDRESSES {
            return Err(format!(
                "{} server addresses given, more than the {MAX_SERVER_ADDRESSES} accepted",
                given.len()
            ));
        }
        let mut out: Vec<ServerAddress> = Vec::with_capacity(given.len());
        for g in given {
            let address = ServerAddress::parse(g.as_ref())?;
            if out.contains(&address) {
                return Err(format!("server address {address} is given twice"));
            }
            out.push(address);
        }
        Ok(Self(out))
    }

    /// The addresses, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &ServerAddress> {
        self.0.iter()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true (there is at least one); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for ServerAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

/// `server_address` and `server_addresses` as one place (the flags, or
/// agent.toml) gives them.
pub type Given<'a> = (Option<&'a String>, Option<&'a Vec<String>>);

/// The addresses to use: the flags' if they give any (all of them: flags
/// replace the file's list, they do not add to it), else the file's, else
/// `default`. Both keys in one place is an error, as is an empty list.
pub fn choose(flags: Given<'_>, file: Given<'_>, default: &str) -> Result<ServerAddresses, String> {
    // `place` prefixes the flags' errors; the file's get its path from
    // `AgentConfig::load`.
    let one_place = |given: Given<'_>, place: &str| -> Result<Option<Vec<String>>, String> {
        match given {
            (Some(_), Some(_)) => Err(format!(
                "{place}give either server_address or server_addresses, not both"
            )),
            (Some(one), None) => Ok(Some(vec![one.clone()])),
            (None, Some(list)) if list.is_empty() => Err(format!(
                "{place}server_addresses is empty; give at least one host:port"
            )),
            (None, Some(list)) => Ok(Some(list.clone())),
            (None, None) => Ok(None),
        }
    };
    let given = match one_place(flags, "flags: ")? {
        Some(list) => list,
        None => one_place(file, "")?.unwrap_or_else(|| vec![default.to_owned()]),
    };
    ServerAddresses::new(&given)
}

/// Where a connection got through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    /// The configured address it came from.
    pub address: String,
    /// The socket address dialled.
    pub socket: SocketAddr,
}

impl std::fmt::Display for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.address == self.socket.to_string() {
            f.write_str(&self.address)
        } else {
            write!(f, "{} ({})", self.address, self.socket)
        }
    }
}

/// Which candidate a connection attempt tries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The server the agent is on (or the first, before any).
    Same,
    /// The one after it: the agent's server failed or asked it to move.
    Next,
}

/// The configured servers and the one the agent's connection is on.
#[derive(Debug)]
pub struct Servers {
    addresses: ServerAddresses,
    connected: Mutex<Option<Connected>>,
}

impl Servers {
    /// No connection yet.
    pub fn new(addresses: ServerAddresses) -> Self {
        Self {
            addresses,
            connected: Mutex::new(None),
        }
    }

    /// The configured addresses.
    pub fn addresses(&self) -> &ServerAddresses {
        &self.addresses
    }

    /// Where the last connection got through.
    pub fn connected(&self) -> Option<Connected> {
        self.connected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every candidate, in order: each configured address's resolved
    /// socket addresses (an address that does not resolve is skipped and
    /// reported), without repeats.
    async fn candidates(&self, errors: &mut Vec<String>) -> Vec<Connected> {
        let mut resolved = Vec::with_capacity(self.addresses.len());
        for address in self.addresses.iter() {
            resolved.push((address.to_string(), address.resolve().await));
        }
        flatten(resolved, errors)
    }

    /// The candidates in the order to try them from `start`.
    fn ordered(&self, mut candidates: Vec<Connected>, start: Start) -> Vec<Connected> {
        let current = self.connected();
        let at = current
            .and_then(|c| candidates.iter().position(|x| x.socket == c.socket))
            .map_or(0, |i| match start {
                Start::Same => i,
                Start::Next => i + 1,
            });
        if !candidates.is_empty() {
            let n = candidates.len();
            candidates.rotate_left(at % n);
        }
        candidates
    }

    /// Dials the candidates from `start` until one completes a TCP connect
    /// and `handshake`; records it. The error names every address tried.
    pub async fn connect<T, F, Fut>(&self, start: Start, handshake: F) -> std::io::Result<T>
    where
        F: Fn(tokio::net::TcpStream) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<T>>,
    {
        let mut errors = vec![];
        let candidates = self.candidates(&mut errors).await;
        for candidate in self.ordered(candidates, start) {
            match dial(candidate.socket, &handshake).await {
                Ok(stream) => {
                    tracing::debug!(server = %candidate, "connected to a server");
                    *self.connected.lock().unwrap_or_else(|e| e.into_inner()) = Some(candidate);
                    return Ok(stream);
                }
                Err(e) => {
                    tracing::info!(server = %candidate, error = %e, "cannot reach this server; trying the next");
                    errors.push(format!("{candidate}: {e}"));
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("no server reachable: {}", errors.join("; ")),
        ))
    }
}

/// The candidates from each configured address's lookup, in order: every
/// socket address a name resolved to is one candidate (tried address by
/// address), a socket address already listed is not repeated, and an
/// address that resolved to nothing or failed goes to `errors`.
fn flatten(
    resolved: Vec<(String, std::io::Result<Vec<SocketAddr>>)>,
    errors: &mut Vec<String>,
) -> Vec<Connected> {
    let mut out: Vec<Connected> = vec![];
    for (address, sockets) in resolved {
        match sockets {
            Ok(sockets) if sockets.is_empty() => {
                errors.push(format!("{address}: resolves to no address"));
            }
            Ok(sockets) => {
                for socket in sockets {
                    if !out.iter().any(|c| c.socket == socket) {
                        out.push(Connected {
                            address: address.clone(),
                            socket,
                        });
                    }
                }
            }
            Err(e) => errors.push(format!("{address}: {e}")),
        }
    }
    out
}

/// One TCP connect and handshake, each bounded.
async fn dial<T, F, Fut>(socket: SocketAddr, handshake: &F) -> std::io::Result<T>
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let timed_out = |what: &str| std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_owned());
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(socket))
        .await
        .map_err(|_| timed_out("TCP connect timed out"))??;
    // Small gRPC writes must not wait for the server's delayed ACK
    // (Nagle): that cost 40 ms per SVID batch.
    tcp.set_nodelay(true)?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp))
        .await
        .map_err(|_| timed_out("TLS handshake timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_addresses_parse_and_normalise() {
        for (given, text) in [
            ("127.0.0.1:8081", "127.0.0.1:8081"),
            ("[::1]:8081", "[::1]:8081"),
            ("[0:0::1]:1", "[::1]:1"),
            ("Oxid-Server.Example.COM:443", "oxid-server.example.com:443"),
            ("localhost:65535", "localhost:65535"),
            ("a1.b-2.c:8081", "a1.b-2.c:8081"),
        ] {
            assert_eq!(ServerAddress::parse(given).unwrap().to_string(), text);
        }
    }

    #[test]
    fn bad_addresses_are_refused_saying_why() {
        for (given, why) in [
            ("", "empty"),
            ("server", "no port"),
            ("server:", "must be a number"),
            ("server:http", "must be a number"),
            ("server:+80", "must be a number"),
            ("server:0", "between 1 and 65535"),
            ("server:65536", "between 1 and 65535"),
            ("server:080x", "must be a number"),
            ("https://server:8081", "not a URL"),
            ("server:8081/path", "must be a number"),
            (" server:8081", "spaces"),
            ("ser ver:8081", "spaces"),
            ("server\n:8081", "spaces or control"),
            ("::1:8081", "needs brackets"),
            ("[::1]8081", "expected [IPv6 address]:port"),
            ("[not-v6]:8081", "not an IPv6 address"),
            (":8081", "no host"),
            ("under_score:8081", "letters, digits, hyphens"),
            ("-lead.example:8081", "hyphen"),
            ("trail-.example:8081", "hyphen"),
            ("a..b:8081", "empty label"),
            ("trailing.:8081", "empty label"),
            ("300.1.1.1:8081", "not a valid IPv4"),
            ("1.2.3:8081", "not a valid IPv4"),
            ("user@server:8081", "letters, digits, hyphens"),
        ] {
            let e = ServerAddress::parse(given).unwrap_err();
            assert!(e.contains(why), "{given:?}: {e}");
            assert!(e.contains("server address"), "{e}");
        }
        let long = format!("{}.example:8081", "a".repeat(64));
        assert!(ServerAddress::parse(&long).unwrap_err().contains("63"));
        let huge = format!("{}:1", ["abc"; 64].join("."));
        assert!(ServerAddress::parse(&huge).unwrap_err().contains("253"));
        assert!(
            ServerAddress::parse(&"a".repeat(300))
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn the_list_refuses_none_too_many_and_duplicates() {
        let none: [&str; 0] = [];
        assert!(
            ServerAddresses::new(&none)
                .unwrap_err()
                .contains("no server")
        );
        let many: Vec<String> = (1..=33).map(|p| format!("10.0.0.1:{p}")).collect();
        assert!(
            ServerAddresses::new(&many)
                .unwrap_err()
                .contains("more than the 32")
        );
        for pair in [
            ["10.0.0.1:8081", "10.0.0.1:8081"],
            ["a.example:1", "A.EXAMPLE:1"],
            ["[::1]:1", "[0::1]:1"],
        ] {
            let e = ServerAddresses::new(&pair).unwrap_err();
            assert!(e.contains("given twice"), "{pair:?}: {e}");
        }
        let ok = ServerAddresses::new(&["a.example:1", "a.example:2", "10.0.0.1:1"]).unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok.to_string(), "a.example:1, a.example:2, 10.0.0.1:1");
    }

    fn at(port: u16) -> Connected {
        Connected {
            address: format!("127.0.0.1:{port}"),
            socket: SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
        }
    }

    #[test]
    fn rotation_starts_after_the_failed_one_and_wraps() {
        let servers = Servers::new(
            ServerAddresses::new(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]).unwrap(),
        );
        let all = || vec![at(1), at(2), at(3)];
        let ports = |v: Vec<Connected>| v.iter().map(|c| c.socket.port()).collect::<Vec<_>>();
        // Before any connection: in the order given, either way.
        assert_eq!(ports(servers.ordered(all(), Start::Same)), [1, 2, 3]);
        assert_eq!(ports(servers.ordered(all(), Start::Next)), [1, 2, 3]);
        *servers.connected.lock().unwrap() = Some(at(2));
        assert_eq!(ports(servers.ordered(all(), Start::Same)), [2, 3, 1]);
        assert_eq!(ports(servers.ordered(all(), Start::Next)), [3, 1, 2]);
        *servers.connected.lock().unwrap() = Some(at(3));
        assert_eq!(ports(servers.ordered(all(), Start::Next)), [1, 2, 3]);
        // The server it was on no longer resolves: from the start.
        *servers.connected.lock().unwrap() = Some(at(9));
        assert_eq!(ports(servers.ordered(all(), Start::Next)), [1, 2, 3]);
    }

    #[test]
    fn a_name_resolving_to_several_addresses_gives_one_candidate_each() {
        let socket = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut errors = vec![];
        let found = flatten(
            vec![
                (
                    "ca.example:8081".into(),
                    Ok(vec![socket("10.0.0.1:8081"), socket("[2001:db8::1]:8081")]),
                ),
                ("gone.example:8081".into(), Ok(vec![])),
                (
                    "broken.example:8081".into(),
                    Err(std::io::Error::other("lookup failed")),
                ),
                // The same server under another name is not dialled twice.
                (
                    "alias.example:8081".into(),
                    Ok(vec![socket("10.0.0.1:8081"), socket("10.0.0.2:8081")]),
                ),
            ],
            &mut errors,
        );
        let listed: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            listed,
            [
                "ca.example:8081 (10.0.0.1:8081)",
                "ca.example:8081 ([2001:db8::1]:8081)",
                "alias.example:8081 (10.0.0.2:8081)",
            ]
        );
        assert_eq!(
            errors,
            [
                "gone.example:8081: resolves to no address",
                "broken.example:8081: lookup failed"
            ]
        );
    }

    #[tokio::test]
    async fn connect_goes_past_dead_addresses_and_names_them_all_when_none_answers() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_port = live.local_addr().unwrap().port();
        // Bound then dropped: nothing listens there (connect refused).
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let servers = Servers::new(
            ServerAddresses::new(&[
                format!("127.0.0.1:{dead_port}"),
                format!("127.0.0.1:{live_port}"),
            ])
            .unwrap(),
        );
        let peer = servers
            .connect(Start::Same, |tcp| async move { tcp.peer_addr() })
            .await
            .unwrap();
        assert_eq!(peer.port(), live_port);
        assert_eq!(servers.connected().unwrap().socket.port(), live_port);
        // A DNS name goes through the resolver.
        let by_name =
            Servers::new(ServerAddresses::new(&[format!("localhost:{live_port}")]).unwrap());
        let peer = by_name
            .connect(Start::Same, |tcp| async move { tcp.peer_addr() })
            .await
            .unwrap();
        assert_eq!(peer.port(), live_port);
        assert_eq!(
            by_name.connected().unwrap().address,
            format!("localhost:{live_port}")
        );
        drop(live);
        let e = servers
            .connect(Start::Next, |tcp| async move { tcp.peer_addr() })
            .await
            .unwrap_err();
        let message = e.to_string();
        assert!(message.contains("no server reachable"), "{message}");
        assert!(message.contains(&dead_port.to_string()), "{message}");
        assert!(message.contains(&live_port.to_string()), "{message}");
        // A failed round leaves the last server it got through to.
        assert_eq!(servers.connected().unwrap().socket.port(), live_port);
    }
}
