//! Interoperability: what oxid issues is accepted by OpenSSL and by the Rust
//! `spiffe` crate (the client's own code, used here as a dev-dependency).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use oxid_pki::bundle::Bundle;
use oxid_pki::jwt::{JwtAlgorithm, JwtSigner};
use oxid_pki::x509::{Csr, SvidParams, X509Ca, X509Svid, certs_to_pem, concat_der};
use oxid_pki::{KeyAlgorithm, KeyPair};
use rustls_pki_types::CertificateDer;

use common::{HOUR, id, now, openssl_rsa_key, root_ca, run_tool, td, workload_key};

fn issue(ca: &X509Ca, key: &KeyPair) -> X509Svid {
    let csr = Csr::parse(&Csr::create(key).unwrap()).unwrap();
    ca.issue_x509_svid(
        &SvidParams {
            spiffe_id: &id("spiffe://example.org/ns/prod/web"),
            public_key: csr.public_key(),
            ttl: HOUR,
            dns_names: &["web.example.org".to_owned()],
        },
        now(),
    )
    .unwrap()
}

fn write_pem(dir: &Path, name: &str, certs: &[CertificateDer<'_>]) {
    std::fs::write(dir.join(name), certs_to_pem(certs)).unwrap();
}

/// `openssl verify` with the given arguments; returns (success, output).
fn openssl_verify(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let out = run_tool("openssl", &all, dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn openssl_verifies_an_svid_for_client_and_server_use() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root_ca("example.org", 24 * HOUR);
    let svid = issue(&ca, &workload_key());
    write_pem(dir.path(), "root.pem", &[ca.root().clone()]);
    write_pem(dir.path(), "svid.pem", svid.cert_chain());
    for purpose in ["sslclient", "sslserver"] {
        let (ok, text) = openssl_verify(
            dir.path(),
            &["-CAfile", "root.pem", "-purpose", purpose, "svid.pem"],
        );
        assert!(ok, "openssl verify -purpose {purpose}: {text}");
        assert!(text.contains("svid.pem: OK"), "{text}");
    }
    // The check can fail: another root does not verify it.
    write_pem(
        dir.path(),
        "other.pem",
        &[root_ca("example.org", HOUR).root().clone()],
    );
    let (ok, text) = openssl_verify(dir.path(), &["-CAfile", "other.pem", "svid.pem"]);
    assert!(!ok, "{text}");
}

#[test]
fn openssl_verifies_an_svid_under_an_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = root_ca("example.org", 48 * HOUR);
    let inter = X509Ca::new_intermediate(
        &upstream,
        td("example.org"),
        workload_key(),
        24 * HOUR,
        now(),
    )
    .unwrap();
    let svid = issue(&inter, &workload_key());
    assert_eq!(svid.cert_chain().len(), 2);
    write_pem(dir.path(), "root.pem", &[inter.root().clone()]);
    write_pem(dir.path(), "leaf.pem", &svid.cert_chain()[..1]);
    write_pem(dir.path(), "inter.pem", &svid.cert_chain()[1..]);
    for purpose in ["sslclient", "sslserver"] {
        let (ok, text) = openssl_verify(
            dir.path(),
            &[
                "-CAfile",
                "root.pem",
                "-untrusted",
                "inter.pem",
                "-purpose",
                purpose,
                "leaf.pem",
            ],
        );
        assert!(ok, "{purpose}: {text}");
    }
}

#[test]
fn openssl_reads_the_profile_we_claim() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root_ca("example.org", HOUR);
    write_pem(
        dir.path(),
        "svid.pem",
        issue(&ca, &workload_key()).cert_chain(),
    );
    let out = run_tool(
        "openssl",
        &["x509", "-in", "svid.pem", "-noout", "-text"],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "X509v3 Key Usage: critical",
        "Digital Signature, Key Encipherment, Key Agreement",
        "CA:FALSE",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "URI:spiffe://example.org/ns/prod/web",
        "DNS:web.example.org",
        "X509v3 Subject Key Identifier",
        "X509v3 Authority Key Identifier",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn spiffe_crate_parses_oxid_x509_svids_and_bundles() {
    for ca in [
        root_ca("example.org", HOUR),
        X509Ca::new_intermediate(
            &root_ca("example.org", 2 * HOUR),
            td("example.org"),
            workload_key(),
            HOUR,
            now(),
        )
        .unwrap(),
    ] {
        let key = workload_key();
        let svid = issue(&ca, &key);
        let parsed =
            spiffe::X509Svid::parse_from_der(&concat_der(svid.cert_chain()), key.pkcs8_der())
                .unwrap();
        assert_eq!(
            parsed.spiffe_id().to_string(),
            "spiffe://example.org/ns/prod/web"
        );
        assert_eq!(parsed.cert_chain().len(), svid.cert_chain().len());

        let mut bundle = Bundle::new(td("example.org"));
        bundle.add_x509_authority(ca.root().clone()).unwrap();
        let spiffe_bundle = spiffe::X509Bundle::parse_from_der(
            spiffe::TrustDomain::new("example.org").unwrap(),
            &bundle.x509_authorities_der(),
        )
        .unwrap();
        assert_eq!(spiffe_bundle.authorities().len(), 1);
    }
    // The client's leaf rules are real: a CA certificate offered as a leaf fails.
    let ca = root_ca("example.org", HOUR);
    assert!(spiffe::X509Svid::parse_from_der(ca.cert(), ca.key().pkcs8_der()).is_err());
}

#[test]
fn spiffe_crate_validates_oxid_jwt_svids() {
    let cases = [
        (KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap(), None),
        (KeyPair::generate(KeyAlgorithm::EcdsaP384).unwrap(), None),
        (openssl_rsa_key(2048), Some(JwtAlgorithm::Rs256)),
        (openssl_rsa_key(2048), Some(JwtAlgorithm::Ps256)),
    ];
    for (key, alg) in cases {
        let kid = JwtSigner::key_id_for(&key);
        let signer = JwtSigner::new(td("example.org"), key, kid, alg, now() + HOUR).unwrap();
        let mut bundle = Bundle::new(td("example.org"));
        bundle
            .add_jwt_authority(signer.authority().clone())
            .unwrap();

        let spiffe_td = spiffe::TrustDomain::new("example.org").unwrap();
        let jwt_bundle =
            spiffe::JwtBundle::from_jwt_authorities(spiffe_td, bundle.to_jwks_json().as_bytes())
                .unwrap();
        let mut set = spiffe::JwtBundleSet::new();
        set.add_bundle(jwt_bundle);

        let auds = vec!["spiffe://example.org/db".to_owned(), "other".to_owned()];
        let token = signer
            .mint(
                &id("spiffe://example.org/web"),
                &auds,
                Duration::from_secs(300),
                now(),
            )
            .unwrap()
            .token;
        let name = signer.algorithm().name();
        let svid = spiffe::JwtSvid::parse_and_validate(&token, &set, &["spiffe://example.org/db"])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
        assert_eq!(svid.audience(), auds.as_slice());
        assert!(
            spiffe::JwtSvid::parse_and_validate(&token, &set, &["somebody-else"]).is_err(),
            "{name}: wrong audience must fail"
        );
    }
}

#[test]
fn rsa_upstream_ca_signs_an_ecdsa_intermediate_that_openssl_accepts() {
    let dir = tempfile::tempdir().unwrap();
    // An organisation's RSA root, made by openssl (oxid never generates RSA).
    let out = run_tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "up.key",
            "-out",
            "up.pem",
            "-days",
            "2",
            "-subj",
            "/O=Corp/CN=Corp Root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt as _;
    let key_path = dir.path().join("up.key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let upstream =
        X509Ca::load_upstream(td("example.org"), &dir.path().join("up.pem"), &key_path).unwrap();
    assert_eq!(upstream.key().algorithm(), KeyAlgorithm::Rsa);
    let inter = X509Ca::new_intermediate(&upstream, td("example.org"), workload_key(), HOUR, now())
        .unwrap();
    let svid = issue(&inter, &workload_key());
    write_pem(dir.path(), "leaf.pem", &svid.cert_chain()[..1]);
    write_pem(dir.path(), "inter.pem", &svid.cert_chain()[1..]);
    let (ok, text) = openssl_verify(
        dir.path(),
        &[
            "-CAfile",
            "up.pem",
            "-untrusted",
            "inter.pem",
            "-purpose",
            "sslclient",
            "leaf.pem",
        ],
    );
    assert!(ok, "{text}");
    let mut bundle = Bundle::new(td("example.org"));
    bundle.add_x509_authority(inter.root().clone()).unwrap();
    oxid_pki::x509::verify_x509_svid(
        svid.cert_chain(),
        &bundle,
        oxid_pki::x509::ExtendedKeyUsage::ClientAuth,
        now(),
    )
    .unwrap();
}

#[test]
fn rsa_keys_under_2048_bits_are_refused_on_import() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_tool(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
            "k.pem",
        ],
        dir.path(),
    );
    assert!(out.status.success());
    let pem = std::fs::read(dir.path().join("k.pem")).unwrap();
    let err = KeyPair::from_pkcs8_pem_or_der(&pem).unwrap_err();
    assert!(matches!(err, oxid_pki::KeyError::RsaTooSmall), "{err}");
    // 2048 is accepted, and its PKCS#8 survives a store/load round trip.
    let key = openssl_rsa_key(2048);
    key.store(&dir.path().join("rsa.key")).unwrap();
    assert_eq!(
        KeyPair::load(&dir.path().join("rsa.key"))
            .unwrap()
            .fingerprint(),
        key.fingerprint()
    );
}

/// An organisation's root and issuing CA made by openssl; returns the
/// upstream chain file (issuing CA, then root) and the issuing CA's key.
fn openssl_issuing_ca(dir: &Path, subject: &str, pathlen: Option<u32>) -> (PathBuf, PathBuf) {
    let sh = |args: &[&str]| {
        let out = run_tool("openssl", args, dir);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "root.key",
        "-out",
        "root.pem",
        "-days",
        "2",
        "-subj",
        "/O=Corp/CN=Root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    sh(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "issuing.key",
        "-out",
        "issuing.csr",
        "-subj",
        subject,
    ]);
    let bc = match pathlen {
        Some(n) => format!("basicConstraints=critical,CA:TRUE,pathlen:{n}\n"),
        None => "basicConstraints=critical,CA:TRUE\n".to_owned(),
    };
    std::fs::write(
        dir.join("ext.cnf"),
        bc + "keyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "issuing.csr",
        "-CA",
        "root.pem",
        "-CAkey",
        "root.key",
        "-CAcreateserial",
        "-out",
        "issuing.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    let chain = [
        std::fs::read_to_string(dir.join("issuing.pem")).unwrap(),
        std::fs::read_to_string(dir.join("root.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(dir.join("upstream.pem"), chain).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    let key = dir.join("issuing.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir.join("upstream.pem"), key)
}

#[test]
fn upstream_issuing_ca_chain_works_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = openssl_issuing_ca(dir.path(), "/O=Corp/OU=PKI/CN=Issuing CA", None);
    let upstream = X509Ca::load_upstream(td("example.org"), &chain, &key).unwrap();
    assert_eq!(upstream.chain().len(), 2);
    let inter = X509Ca::new_intermediate(&upstream, td("example.org"), workload_key(), HOUR, now())
        .unwrap();
    let svid = issue(&inter, &workload_key());
    assert_eq!(
        svid.cert_chain().len(),
        3,
        "leaf, our intermediate, the issuing CA"
    );
    write_pem(dir.path(), "leaf.pem", &svid.cert_chain()[..1]);
    write_pem(dir.path(), "inters.pem", &svid.cert_chain()[1..]);
    let (ok, text) = openssl_verify(
        dir.path(),
        &[
            "-CAfile",
            "root.pem",
            "-untrusted",
            "inters.pem",
            "-purpose",
            "sslclient",
            "leaf.pem",
        ],
    );
    assert!(ok, "{text}");
}

#[test]
fn upstream_with_path_length_zero_is_refused_at_load() {
    // Our intermediate under it would be invalid for every client: say so now.
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = openssl_issuing_ca(dir.path(), "/O=Corp/CN=Issuing CA", Some(0));
    let upstream = X509Ca::load_upstream(td("example.org"), &chain, &key).unwrap();
    let err = X509Ca::new_intermediate(&upstream, td("example.org"), workload_key(), HOUR, now())
        .unwrap_err();
    assert!(
        matches!(err, oxid_pki::x509::X509Error::UnusableChain(_)),
        "{err}"
    );
}

#[test]
fn upstream_with_repeated_name_attributes_is_reproduced_or_refused() {
    // A subject with two DC attributes: the issuer name of what we sign must
    // match it byte for byte, or loading must fail with a clear error.
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = openssl_issuing_ca(dir.path(), "/DC=com/DC=example/CN=Issuing CA", None);
    match X509Ca::load_upstream(td("example.org"), &chain, &key) {
        Ok(upstream) => {
            let inter =
                X509Ca::new_intermediate(&upstream, td("example.org"), workload_key(), HOUR, now())
                    .unwrap();
            let svid = issue(&inter, &workload_key());
            write_pem(dir.path(), "leaf.pem", &svid.cert_chain()[..1]);
            write_pem(dir.path(), "inters.pem", &svid.cert_chain()[1..]);
            let (ok, text) = openssl_verify(
                dir.path(),
                &[
                    "-CAfile",
                    "root.pem",
                    "-untrusted",
                    "inters.pem",
                    "leaf.pem",
                ],
            );
            assert!(ok, "{text}");
        }
        Err(err) => {
            assert!(
                matches!(err, oxid_pki::x509::X509Error::UnusableChain(_)),
                "{err}"
            );
        }
    }
}

#[test]
fn upstream_file_with_an_unrelated_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = openssl_issuing_ca(dir.path(), "/O=Corp/CN=Issuing CA", None);
    let mut pem = std::fs::read_to_string(&chain).unwrap();
    pem.push_str(&certs_to_pem([root_ca("evil.example", HOUR).cert()]));
    std::fs::write(&chain, pem).unwrap();
    let err = X509Ca::load_upstream(td("example.org"), &chain, &key).unwrap_err();
    assert!(
        matches!(err, oxid_pki::x509::X509Error::UnusableChain(_)),
        "{err}"
    );
}

/// Keys outside the policy, made by openssl: refused on import and in CSRs,
/// each with an error that names the problem.
#[test]
fn key_types_outside_the_policy_are_refused_on_import_and_in_csrs() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 4] = [
        ("ed25519", &["-algorithm", "ed25519"]),
        (
            "p521",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
        ),
        (
            "secp256k1",
            &[
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:secp256k1",
            ],
        ),
        (
            "rsa1024",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
        ),
    ];
    for (name, spec) in cases {
        let key = format!("{name}.pem");
        let mut args = vec!["genpkey"];
        args.extend_from_slice(spec);
        args.extend(["-out", &key]);
        let out = run_tool("openssl", &args, dir.path());
        assert!(out.status.success(), "openssl genpkey {name}");
        let pem = std::fs::read(dir.path().join(&key)).unwrap();
        let err = KeyPair::from_pkcs8_pem_or_der(&pem)
            .err()
            .unwrap_or_else(|| panic!("a {name} key was imported"));
        let text = err.to_string();
        assert!(
            text.contains("expected a PKCS#8 ECDSA P-256/P-384 or RSA key")
                || text.contains("smaller than 2048 bits"),
            "{name}: {text}"
        );
        // The same key in a CSR (self-signed by openssl) is refused too.
        let csr = format!("{name}.csr");
        let out = run_tool(
            "openssl",
            &[
                "req", "-new", "-key", &key, "-subj", "/CN=node", "-outform", "DER", "-out", &csr,
            ],
            dir.path(),
        );
        assert!(out.status.success(), "openssl req {name}");
        let der = std::fs::read(dir.path().join(&csr)).unwrap();
        let err = Csr::parse(&der)
            .err()
            .unwrap_or_else(|| panic!("a CSR with a {name} key was accepted"));
        let text = err.to_string();
        assert!(
            text.contains("unsupported public key") || text.contains("not accepted"),
            "{name}: {text}"
        );
    }
}
