//! Resolved names as Envoy `Secret`s: an SVID as a `tls_certificate` (PEM
//! chain and PKCS#8 key), bundles as a `validation_context`, either in the
//! SPIFFE validator form (one trust_domains entry per trust domain, Envoy
//! picking the bundle by the peer's trust domain) or as one trust domain's
//! `trusted_ca`.

use envoy_types::pb::envoy::config::core::v3::{
    BuildVersion, DataSource, Node, TypedExtensionConfig, data_source, node,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::google::protobuf::{Any, value};
use prost::{Message as _, Name as _};

use crate::sds::names::Resolved;

/// The type URL of every resource SDS sends.
pub(crate) const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The SPIFFE certificate validator's extension name (not the
/// `envoy.transport_sockets.tls...` form).
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        ..DataSource::default()
    })
}

/// Encodes `r`. `None` when a certificate chain the agent holds does not
/// split (it was checked when signed, so that is a bug, logged).
pub(crate) fn to_secret(r: &Resolved, validator: bool) -> Option<Secret> {
    match r {
        Resolved::Svid { name, held } => {
            let chain = match oxid_pki::x509::split_der_certs(&held.chain_der) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "a held X509-SVID chain does not parse");
                    return None;
                }
            };
            let key = oxid_pki::x509::pem_encode("PRIVATE KEY", held.key.der());
            Some(Secret {
                name: name.clone(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(oxid_pki::x509::certs_to_pem(&chain).into_bytes()),
                    private_key: inline(key.into_bytes()),
                    ..TlsCertificate::default()
                })),
            })
        }
        Resolved::Bundles { name, bundles } => {
            let context = if validator {
                let config = SpiffeCertValidatorConfig {
                    trust_domains: bundles
                        .iter()
                        .map(|(td, b)| spiffe_cert_validator_config::TrustDomain {
                            name: td.as_str().to_owned(),
                            trust_bundle: inline(b.x509_authorities_pem().into_bytes()),
                            ..Default::default()
                        })
                        .collect(),
                    ..SpiffeCertValidatorConfig::default()
                };
                CertificateValidationContext {
                    custom_validator_config: Some(TypedExtensionConfig {
                        name: SPIFFE_VALIDATOR.into(),
                        typed_config: Some(Any {
                            type_url: SpiffeCertValidatorConfig::type_url(),
                            value: config.encode_to_vec(),
                        }),
                    }),
                    ..CertificateValidationContext::default()
                }
            } else {
                // names::View refuses several trust domains without the
                // validator, so this is one trust domain's roots.
                let pem: String = bundles
                    .iter()
                    .map(|(_, b)| b.x509_authorities_pem())
                    .collect();
                CertificateValidationContext {
                    trusted_ca: inline(pem.into_bytes()),
                    ..CertificateValidationContext::default()
                }
            };
            Some(Secret {
                name: name.clone(),
                r#type: Some(secret::Type::ValidationContext(context)),
            })
        }
    }
}

/// `secret` as a DiscoveryResponse resource.
pub(crate) fn to_any(secret: &Secret) -> Any {
    Any {
        type_url: SECRET_TYPE_URL.into(),
        value: secret.encode_to_vec(),
    }
}

/// The node metadata key that overrides the agent's
/// `disable_spiffe_cert_validation` for one Envoy (SPIRE's).
const DISABLE_KEY: &str = "disable_spiffe_cert_validation";

/// Whether bundles go to this node in the SPIFFE validator form: not when
/// the node's metadata `disable_spiffe_cert_validation` (a bool, or a
/// string reading as one; anything else is ignored) or else the agent's
/// setting disables it, nor for an Envoy that tells its build version and
/// is older than 1.18 (the first with the validator, SPIRE's rule); an
/// Envoy that says nothing gets it.
pub(crate) fn use_validator(disabled: bool, node: Option<&Node>) -> bool {
    let from_node = node
        .and_then(|n| n.metadata.as_ref())
        .and_then(|m| m.fields.get(DISABLE_KEY))
        .and_then(|v| match &v.kind {
            Some(value::Kind::BoolValue(b)) => Some(*b),
            Some(value::Kind::StringValue(s)) => parse_bool(s),
            _ => None,
        });
    if from_node.unwrap_or(disabled) {
        return false;
    }
    let version = node.and_then(|n| match &n.user_agent_version_type {
        Some(node::UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
            version: Some(v),
            ..
        })) => Some((v.major_number, v.minor_number)),
        _ => None,
    });
    version.is_none_or(|(major, minor)| major > 1 || (major == 1 && minor >= 18))
}

/// A bool as Go's `strconv.ParseBool` reads one, as SPIRE does.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;

    use super::*;

    fn node(major: u32, minor: u32) -> Node {
        Node {
            user_agent_version_type: Some(node::UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: major,
                        minor_number: minor,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Node::default()
        }
    }

    #[test]
    fn the_validator_follows_the_envoy_version_as_spire_decides() {
        assert!(use_validator(false, None));
        assert!(use_validator(false, Some(&Node::default())));
        assert!(use_validator(false, Some(&node(1, 18))));
        assert!(use_validator(false, Some(&node(1, 40))));
        assert!(use_validator(false, Some(&node(2, 0))));
        assert!(!use_validator(false, Some(&node(1, 17))));
        assert!(!use_validator(true, Some(&node(1, 40))));
        assert!(!use_validator(true, None));
    }

    fn with_metadata(kind: value::Kind) -> Node {
        let mut n = node(1, 40);
        n.metadata = Some(envoy_types::pb::google::protobuf::Struct {
            fields: [(
                DISABLE_KEY.to_owned(),
                envoy_types::pb::google::protobuf::Value { kind: Some(kind) },
            )]
            .into(),
        });
        n
    }

    #[test]
    fn node_metadata_overrides_the_setting_both_ways() {
        let on = with_metadata(value::Kind::BoolValue(true));
        assert!(!use_validator(false, Some(&on)));
        let off = with_metadata(value::Kind::StringValue("false".into()));
        assert!(use_validator(true, Some(&off)));
        let junk = with_metadata(value::Kind::StringValue("maybe".into()));
        assert!(use_validator(false, Some(&junk)));
        assert!(!use_validator(true, Some(&junk)));
        let number = with_metadata(value::Kind::NumberValue(1.0));
        assert!(use_validator(false, Some(&number)));
        // An old Envoy gets trusted_ca whatever its metadata says.
        let mut old = with_metadata(value::Kind::BoolValue(false));
        old.user_agent_version_type = node(1, 17).user_agent_version_type;
        assert!(!use_validator(false, Some(&old)));
    }
}
