//! java-spiffe (io.spiffe:java-spiffe-core 0.8.11, grpc-java over Netty's
//! epoll transport) against a real oxid server and agent: X509-SVID and
//! JWT-SVID fetch and validation. grpc-java sends the socket path as the
//! HTTP/2 `:authority`, which the agent rewrites (hyperium/h2#487), so this
//! is the client that exercises that path.
//!
//! The program is `tests/java` (Maven, built into `target/java`).

// A test reports failure by panicking, with the process output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use oxid_e2e::{Agent, Server};

const TD: &str = "spiffe://example.org";

/// The java-spiffe check's classpath (its jar first), built once.
fn classpath() -> &'static str {
    static BUILT: OnceLock<String> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let status = std::process::Command::new("mvn")
            .args(["-q", "-B", "-Dstyle.color=never", "-f"])
            .arg(root.join("java/pom.xml"))
            .arg("package")
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run `mvn` ({e}): install it with apt-get install -y maven openjdk-17-jdk")
            });
        assert!(status.success(), "mvn package of tests/java failed ({status})");
        let target = root.join("../target/java");
        let deps = std::fs::read_to_string(target.join("classpath.txt")).unwrap();
        format!("{}:{}", target.join("java-spiffe-check-1.jar").display(), deps.trim())
    })
}

/// The `java` executable as /proc shows it, for a `unix:path` selector.
fn java() -> PathBuf {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v java"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !path.is_empty(),
        "java is not on PATH: install it with apt-get install -y openjdk-17-jdk"
    );
    std::fs::canonicalize(path).unwrap()
}

async fn check(agent: &Agent, args: &[&str]) -> serde_json::Value {
    let out = agent
        .workload(&java())
        .args(["-cp", classpath(), "oxid.JavaSpiffeCheck"])
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "JavaSpiffeCheck {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// A server, an agent, and an entry for `java` run by this uid.
async fn cluster(dir: &Path, path: &str) -> (Server, Agent) {
    let server = Server::start(dir).await;
    let (token, agent_id) = server.join_token().await;
    let agent = Agent::start(dir, &server, &token).await;
    let exe = format!("unix:path:{}", java().display());
    let uid = format!("unix:uid:{}", rustix::process::getuid().as_raw());
    server
        .create_entry(
            &format!("{TD}{path}"),
            &agent_id,
            &["--selector", &exe, "--selector", &uid],
        )
        .await;
    (server, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn java_x509_source_gets_the_svid_and_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent) = cluster(dir.path(), "/java/x509").await;
    let v = check(&agent, &["x509"]).await;
    assert_eq!(v["spiffe_id"], format!("{TD}/java/x509"), "{v}");
    assert_eq!(v["key_matches_leaf"], true, "{v}");
    assert_eq!(v["chain_signed_by_bundle"], true, "{v}");
    assert_eq!(v["bundle_trust_domain"], "example.org", "{v}");
    assert!(v["bundle_authorities"].as_u64().unwrap() >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn java_jwt_source_fetches_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent) = cluster(dir.path(), "/java/jwt").await;
    let audiences = format!("{TD}/api,{TD}/audit");
    let v = check(&agent, &["jwt", &audiences]).await;
    assert_eq!(v["spiffe_id"], format!("{TD}/java/jwt"), "{v}");
    assert_eq!(v["audiences"], 2, "{v}");
    assert_eq!(v["parsed_id"], format!("{TD}/java/jwt"), "{v}");
    assert_eq!(v["api_validated_id"], format!("{TD}/java/jwt"), "{v}");
    assert!(v["jwt_authorities"].as_u64().unwrap() >= 1, "{v}");
    assert_ne!(
        v["other_audience_error"], "",
        "a token for other audiences validated: {v}"
    );
}
