//! A PostgreSQL cluster of one test's own, for a test that stops and starts
//! the database under a running server (the shared cluster `scripts/test`
//! starts must stay up for the others). It listens only on a Unix socket in
//! its temp dir (PostgreSQL cannot bind port 0). Debian keeps `initdb` and
//! `pg_ctl` under `/usr/lib/postgresql/<version>/bin`; they refuse root, so
//! as root they run as the `postgres` user.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The socket's port number (it names the socket file only).
const PORT: u16 = 5432;

pub struct PrivateCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl PrivateCluster {
    /// A new cluster, initialised and running.
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|d| {
                let d = d.ok()?;
                let version: u32 = d.file_name().to_str()?.parse().ok()?;
                Some((version, d.path().join("bin")))
            })
            .filter(|(_, bin)| bin.join("initdb").exists())
            .max()
            .map(|(_, bin)| bin)
            .unwrap_or_else(|| {
                panic!(
                    "no /usr/lib/postgresql/<version>/bin/initdb: install PostgreSQL \
                     (apt-get install -y postgresql; ./scripts/test does)"
                )
            });
        // Under /tmp: a socket path is at most 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("oxid-pg-private")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        if is_root() {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let cluster = Self { dir, bin };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--no-sync",
            ],
        );
        cluster.start_again();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `tool args…`; panics with its output if it fails.
    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `tool` from the cluster's bin directory, as `postgres` when root.
    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Starts the (stopped) cluster again, on the same socket, and waits
    /// until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-k {} -p {PORT} -c listen_addresses='' -c max_connections=100 -c fsync=off",
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
                "-o",
                &options,
            ],
        );
    }

    /// Stops the cluster the way an operator's `pg_ctl stop` does (fast:
    /// every session is ended, then a clean shutdown), and waits for it.
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL of database `db` over the socket, as `--datastore-url`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@/{db}?host={}&port={PORT}",
            self.dir.path().display()
        )
    }

    /// A raw connection (not through a store) to database `db`.
    pub async fn raw(&self, db: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(self.dir.path())
            .port(PORT)
            .user("postgres")
            .dbname(db)
            .application_name("oxid-test")
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the private cluster: {e}"));
        tokio::spawn(connection);
        client
    }

    /// A new, empty database; its name.
    pub async fn create_database(&self, name: &str) -> String {
        self.raw("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        name.to_owned()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Whatever state the test left it in; an error means it was stopped.
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    // /proc/self/status names the real, effective, saved and fs uids.
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split(':').collect();
            (fields.first() == Some(&"postgres"))
                .then(|| (fields[2].parse().unwrap(), fields[3].parse().unwrap()))
        })
        .expect("no postgres user: install PostgreSQL from Debian (apt-get install -y postgresql)")
}
