//! A real `oxid-server` process on a temp dir, driven by the real CLI over
//! its admin socket and by a raw admin client (`cli_operator.rs`,
//! `cli_import.rs`).

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use oxid_proto::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_oxid-server");
pub(crate) const AGENT: &str = "spiffe://example.org/oxid/agent/join_token/abc";

pub(crate) struct Server {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) child: Option<Child>,
}

impl Server {
    pub(crate) fn start(extra_args: &[&str]) -> Self {
        Self::start_with_config("", extra_args)
    }

    /// A server whose server.toml is `config`.
    pub(crate) fn start_with_config(config: &str, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Self::start_in(dir, config, extra_args)
    }

    /// A server on `dir` (a stopped server's, to start it again), with
    /// server.toml rewritten to `config` and the log started anew.
    pub(crate) fn start_in(dir: tempfile::TempDir, config: &str, extra_args: &[&str]) -> Self {
        std::fs::write(dir.path().join("server.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--log-format", "json", "--config"])
            .arg(dir.path().join("server.toml"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket-path")
            .arg(dir.path().join("run/admin.sock"))
            .args(["--bind-address", "127.0.0.1:0"])
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = Self {
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.cli(&["healthcheck"]).status.success() {
            if let Some(status) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited early: {status}: {}", s.log());
            }
            assert!(Instant::now() < deadline, "server did not become healthy");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.path().join("run/admin.sock")
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A field of the "oxid-server ready" log line.
    pub(crate) fn ready_field(&self, field: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = self
                .log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["fields"]["message"] == "oxid-server ready");
            if let Some(line) = ready {
                return line["fields"][field].as_str().unwrap().to_owned();
            }
            assert!(Instant::now() < deadline, "no ready line");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--socket-path")
            .arg(self.socket())
            .output()
            .unwrap()
    }

    /// stdout and stderr of a command that must succeed.
    pub(crate) fn ok2(&self, args: &[&str]) -> (String, String) {
        let out = self.cli(args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{args:?} failed: {err}");
        (String::from_utf8(out.stdout).unwrap(), err)
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        self.ok2(args).0
    }

    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// A command that must fail with one error line; that line.
    pub(crate) fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        stderr
    }

    /// The agent API's address, from the ready line.
    pub(crate) fn agent_addr(&self) -> std::net::SocketAddr {
        self.ready_field("agent_api").parse().unwrap()
    }

    pub(crate) fn create(&self, spiffe_id: &str, extra: &[&str]) -> serde_json::Value {
        self.create_under(spiffe_id, AGENT, extra)
    }

    /// `entry create` of `spiffe_id` under `parent`; the created entry.
    pub(crate) fn create_under(
        &self,
        spiffe_id: &str,
        parent: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent,
        ];
        args.extend_from_slice(extra);
        let r = self.json(&args);
        r["results"][0]["entry"].clone()
    }

    /// An entry for `spiffe://example.org/<name>` and uid 1000 under
    /// `parent`; its ID.
    pub(crate) fn create_id(&self, name: &str, parent: &str) -> String {
        let spiffe_id = format!("spiffe://example.org/{name}");
        self.create_under(&spiffe_id, parent, &["--selector", "unix:uid:1000"])["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The server's own bundle, from `bundle show --format spiffe`.
    pub(crate) fn spiffe_bundle(&self) -> oxid_pki::bundle::Bundle {
        let json = self.ok(&["bundle", "show", "--format", "spiffe"]);
        let td = oxid_pki::TrustDomain::new("example.org").unwrap();
        oxid_pki::bundle::Bundle::from_spiffe_json(td, json.as_bytes()).unwrap()
    }

    pub(crate) async fn admin(&self) -> AdminClient<Channel> {
        let path = self.socket();
        let channel = Endpoint::try_from("http://admin.invalid")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                }
            }))
            .await
            .unwrap();
        AdminClient::new(channel)
    }
}

impl Server {
    /// Stops the process (SIGKILL: the store is durable) and hands back its
    /// directory.
    pub(crate) fn stop(mut self) -> tempfile::TempDir {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
