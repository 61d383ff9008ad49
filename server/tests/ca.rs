//! The CA manager with an injected clock: rotation through prepare and
//! activate, retirement, restart from the journal, forced steps, upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use oxid_pki::bundle::Bundle;
use oxid_pki::jwt::verify_jwt_svid;
use oxid_pki::x509::{ExtendedKeyUsage, PublicKey, SvidParams, X509Ca, verify_x509_svid};
use oxid_pki::{KeyAlgorithm, KeyPair, SpiffeId, TrustDomain};
use oxid_server::ca::{Action, AuthorityState, CaConfig, CaError, CaManager, UpstreamConfig};
use oxid_server::clock::{Clock, ManualClock};
use oxid_server::datastore::{DataStore, SledStore};

const CA_TTL: Duration = Duration::from_secs(600);

fn start_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn config(key_dir: Option<std::path::PathBuf>) -> CaConfig {
    CaConfig {
        trust_domain: td(),
        key_type: KeyAlgorithm::EcdsaP256,
        ca_ttl: CA_TTL,
        key_dir,
        upstream: None,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    clock: Arc<ManualClock>,
    store: Arc<SledStore>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let store = Arc::new(SledStore::open(&path.join("db"), 8 << 20).unwrap());
    Setup {
        _dir: dir,
        dir: path,
        clock: Arc::new(ManualClock::new(start_time())),
        store,
    }
}

async fn start(s: &Setup, cfg: CaConfig) -> Arc<CaManager> {
    CaManager::start(cfg, s.clock.clone(), s.store.clone())
        .await
        .unwrap()
}

fn web() -> SpiffeId {
    "spiffe://example.org/web".parse().unwrap()
}

/// Issues an SVID and returns its chain.
fn issue(ca: &CaManager, ttl: Duration) -> oxid_pki::x509::X509Svid {
    let key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let pk = PublicKey::from_spki_der(key.public_key_spki()).unwrap();
    ca.sign_x509_svid(&SvidParams {
        spiffe_id: &web(),
        public_key: &pk,
        ttl,
        dns_names: &[],
    })
    .unwrap()
}

fn verifies(svid: &oxid_pki::x509::X509Svid, bundle: &Bundle, at: SystemTime) -> bool {
    verify_x509_svid(svid.cert_chain(), bundle, ExtendedKeyUsage::Any, at).is_ok()
}

/// Only the authority in `bundle` at index `i` (by insertion) verifies it.
fn signed_by_root(
    svid: &oxid_pki::x509::X509Svid,
    bundle: &Bundle,
    i: usize,
    at: SystemTime,
) -> bool {
    let mut only = Bundle::new(td());
    only.add_x509_authority(bundle.x509_authorities()[i].clone())
        .unwrap();
    verifies(svid, &only, at)
}

#[tokio::test]
async fn a_fresh_server_has_one_active_authority_published() {
    let s = setup();
    let ca = start(&s, config(None)).await;
    let auths = ca.authorities();
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0].state, AuthorityState::Active);
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities().len(), 1);
    assert_eq!(bundle.jwt_authorities().len(), 1);
    let stored = s.store.get_bundle(&td()).await.unwrap();
    assert_eq!(
        Bundle::from_spiffe_json(td(), stored.spiffe_json.as_bytes()).unwrap(),
        bundle
    );
    assert_eq!(ca.max_svid_ttl(), CA_TTL / 6);
    assert!(verifies(
        &issue(&ca, Duration::from_secs(60)),
        &bundle,
        s.clock.now()
    ));
}

#[tokio::test]
async fn rotation_prepares_publishes_activates_and_retires() {
    let s = setup();
    let ca = start(&s, config(None)).await;
    let t0 = s.clock.now();
    assert_eq!(ca.rotate().await.unwrap(), Action::None);

    // 1/2: the next authority is prepared and published, but does not sign.
    s.clock.set(t0 + CA_TTL / 2);
    assert_eq!(ca.rotate().await.unwrap(), Action::Prepare);
    let bundle = ca.bundle();
    assert_eq!(
        bundle.x509_authorities().len(),
        2,
        "old and new roots both published"
    );
    assert_eq!(bundle.jwt_authorities().len(), 2);
    let svid = issue(&ca, Duration::from_secs(60));
    assert!(
        signed_by_root(&svid, &bundle, 0, s.clock.now()),
        "still signed by the first"
    );
    assert!(!signed_by_root(&svid, &bundle, 1, s.clock.now()));

    // 5/6: the prepared one becomes active; the old one stays in the bundle.
    s.clock.set(t0 + CA_TTL * 5 / 6);
    assert_eq!(ca.rotate().await.unwrap(), Action::Activate);
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities().len(), 2);
    let svid = issue(&ca, Duration::from_secs(60));
    assert!(
        signed_by_root(&svid, &bundle, 1, s.clock.now()),
        "now signed by the second"
    );
    let states: Vec<AuthorityState> = ca.authorities().iter().map(|a| a.state).collect();
    assert_eq!(states, [AuthorityState::Old, AuthorityState::Active]);
    // JWT-SVIDs move to the new key too, and verify against the bundle.
    let jwt = ca
        .mint_jwt_svid(&web(), &["db".into()], Duration::from_secs(60))
        .unwrap();
    verify_jwt_svid(&jwt.token, &bundle, "db", s.clock.now()).unwrap();

    // Past the first authority's notAfter, it leaves the bundle.
    s.clock.set(t0 + CA_TTL + Duration::from_secs(1));
    assert_eq!(ca.rotate().await.unwrap(), Action::Prune(vec![1]));
    assert_eq!(ca.bundle().x509_authorities().len(), 1);
    let stored = s.store.get_bundle(&td()).await.unwrap();
    assert_eq!(
        Bundle::from_spiffe_json(td(), stored.spiffe_json.as_bytes())
            .unwrap()
            .x509_authorities()
            .len(),
        1
    );
}

#[tokio::test]
async fn svids_never_outlive_their_authority() {
    let s = setup();
    let ca = start(&s, config(None)).await;
    s.clock.advance(CA_TTL - Duration::from_secs(30));
    let svid = issue(&ca, Duration::from_secs(3600));
    let ca_end = ca.authorities()[0].not_after;
    let svid_end = svid
        .not_after()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(svid_end, ca_end);
    let jwt = ca
        .mint_jwt_svid(&web(), &["db".into()], Duration::from_secs(3600))
        .unwrap();
    assert!(
        jwt.expiry
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            <= ca_end
    );
}

#[tokio::test]
async fn a_restart_with_keys_on_disk_keeps_the_same_ca() {
    let s = setup();
    let keys = s.dir.join("keys");
    let (bundle, kid) = {
        let ca = start(&s, config(Some(keys.clone()))).await;
        s.clock.advance(CA_TTL / 2);
        ca.rotate().await.unwrap();
        (ca.bundle(), ca.authorities()[0].jwt_key_id.clone())
    };
    for f in std::fs::read_dir(&keys).unwrap() {
        let mode = f.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let ca = start(&s, config(Some(keys))).await;
    assert_eq!(ca.bundle().x509_authorities(), bundle.x509_authorities());
    assert_eq!(ca.authorities()[0].jwt_key_id, kid);
    assert!(ca.authorities().iter().all(|a| a.can_sign));
    let svid = issue(&ca, Duration::from_secs(60));
    assert!(
        signed_by_root(&svid, &bundle, 0, s.clock.now()),
        "the same authority signs"
    );
}

#[tokio::test]
async fn a_restart_with_in_memory_keys_starts_a_new_authority() {
    let s = setup();
    let old_root = {
        let ca = start(&s, config(None)).await;
        ca.bundle().x509_authorities()[0].clone()
    };
    let ca = start(&s, config(None)).await;
    let auths = ca.authorities();
    assert_eq!(auths.len(), 2);
    assert_eq!(
        (auths[0].state, auths[0].can_sign),
        (AuthorityState::Old, false)
    );
    assert_eq!(auths[1].state, AuthorityState::Active);
    let bundle = ca.bundle();
    assert!(
        bundle.x509_authorities().contains(&old_root),
        "old SVIDs stay trusted"
    );
    let svid = issue(&ca, Duration::from_secs(60));
    assert!(signed_by_root(&svid, &bundle, 1, s.clock.now()));
}

#[tokio::test]
async fn forced_rotation_and_taint() {
    let s = setup();
    let ca = start(&s, config(None)).await;
    assert!(matches!(
        ca.force_activate().await,
        Err(CaError::InvalidTransition(_))
    ));
    ca.force_prepare().await.unwrap();
    assert!(matches!(
        ca.force_prepare().await,
        Err(CaError::InvalidTransition(_))
    ));
    assert!(
        matches!(ca.taint(1).await, Err(CaError::InvalidTransition(_))),
        "active"
    );
    assert!(
        matches!(ca.taint(2).await, Err(CaError::InvalidTransition(_))),
        "prepared"
    );
    ca.force_activate().await.unwrap();
    ca.taint(1).await.unwrap();
    let auths = ca.authorities();
    assert!(auths[0].tainted && !auths[1].tainted);
    assert!(matches!(
        ca.taint(9).await,
        Err(CaError::InvalidTransition(_))
    ));
    let seq_before = ca.bundle().sequence_number();
    ca.force_prepare().await.unwrap();
    assert!(
        ca.bundle().sequence_number() > seq_before,
        "every change bumps the sequence"
    );
}

#[tokio::test]
async fn an_upstream_ca_signs_the_intermediates() {
    let s = setup();
    let upstream_key = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let upstream = X509Ca::new_root(
        td(),
        upstream_key,
        Duration::from_secs(86_400),
        start_time(),
    )
    .unwrap();
    let cert_file = s.dir.join("upstream.pem");
    let key_file = s.dir.join("upstream.key");
    std::fs::write(&cert_file, oxid_pki::x509::certs_to_pem([upstream.cert()])).unwrap();
    upstream.key().store(&key_file).unwrap();
    let mut cfg = config(None);
    cfg.upstream = Some(UpstreamConfig {
        cert_file,
        key_file,
    });
    let ca = start(&s, cfg).await;
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities(), &[upstream.cert().clone()]);
    let svid = issue(&ca, Duration::from_secs(60));
    assert_eq!(
        svid.cert_chain().len(),
        2,
        "leaf and the server's intermediate"
    );
    assert!(verifies(&svid, &bundle, s.clock.now()));
    // Rotation adds an intermediate, not a root.
    ca.force_prepare().await.unwrap();
    assert_eq!(ca.bundle().x509_authorities().len(), 1);
}

#[tokio::test]
async fn a_damaged_journal_is_a_clear_error() {
    let s = setup();
    s.store.put_ca_journal(b"{not json".to_vec()).await.unwrap();
    let err = CaManager::start(config(None), s.clock.clone(), s.store.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, CaError::Journal(_)), "{err}");
}
