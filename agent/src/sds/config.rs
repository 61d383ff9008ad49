//! The `[sds]` settings of agent.toml and their flags.

use serde::Deserialize;

/// `[sds]` in agent.toml, and the `--sds-*` flags (which win field by
/// field).
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct SdsFile {
    /// Serve Envoy SDS on the Workload API socket (default true).
    #[arg(long = "sds-enabled")]
    pub enabled: Option<bool>,
    /// The name that means the caller's first X509-SVID (default `default`).
    #[arg(long = "sds-default-svid-name")]
    pub default_svid_name: Option<String>,
    /// The name that means the own trust domain's bundle (default `ROOTCA`).
    #[arg(long = "sds-default-bundle-name")]
    pub default_bundle_name: Option<String>,
    /// The name that means every bundle the caller may see, in the SPIFFE
    /// validator form (default `ALL`).
    #[arg(long = "sds-default-all-bundles-name")]
    pub default_all_bundles_name: Option<String>,
    /// Send bundles as one trust domain's `trusted_ca` instead of the SPIFFE
    /// certificate validator, for every Envoy (default false; Envoys older
    /// than 1.18 get `trusted_ca` anyway).
    #[arg(long = "sds-disable-spiffe-cert-validation")]
    pub disable_spiffe_cert_validation: Option<bool>,
}

/// The resolved SDS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsSettings {
    /// Whether the agent serves SDS.
    pub enabled: bool,
    /// See [`SdsFile::default_svid_name`].
    pub default_svid_name: String,
    /// See [`SdsFile::default_bundle_name`].
    pub default_bundle_name: String,
    /// See [`SdsFile::default_all_bundles_name`].
    pub default_all_bundles_name: String,
    /// See [`SdsFile::disable_spiffe_cert_validation`].
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsSettings {
    /// SPIRE's defaults, which Istio-style configurations name.
    fn default() -> Self {
        Self {
            enabled: true,
            default_svid_name: "default".into(),
            default_bundle_name: "ROOTCA".into(),
            default_all_bundles_name: "ALL".into(),
            disable_spiffe_cert_validation: false,
        }
    }
}

impl SdsSettings {
    /// `flags` over `file` over the defaults; the three names must be
    /// non-empty and distinct, or one would hide another.
    pub fn resolve(file: Option<SdsFile>, flags: Option<SdsFile>) -> Result<Self, String> {
        let file = file.unwrap_or_default();
        let flags = flags.unwrap_or_default();
        let d = Self::default();
        let settings = Self {
            enabled: flags.enabled.or(file.enabled).unwrap_or(d.enabled),
            default_svid_name: flags
                .default_svid_name
                .or(file.default_svid_name)
                .unwrap_or(d.default_svid_name),
            default_bundle_name: flags
                .default_bundle_name
                .or(file.default_bundle_name)
                .unwrap_or(d.default_bundle_name),
            default_all_bundles_name: flags
                .default_all_bundles_name
                .or(file.default_all_bundles_name)
                .unwrap_or(d.default_all_bundles_name),
            disable_spiffe_cert_validation: flags
                .disable_spiffe_cert_validation
                .or(file.disable_spiffe_cert_validation)
                .unwrap_or(d.disable_spiffe_cert_validation),
        };
        let names = [
            ("default_svid_name", &settings.default_svid_name),
            ("default_bundle_name", &settings.default_bundle_name),
            (
                "default_all_bundles_name",
                &settings.default_all_bundles_name,
            ),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(format!("sds.{key} must not be empty"));
            }
            if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                return Err(format!("sds.{key} {name:?} is also sds.{other}"));
            }
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn flags_win_and_names_must_differ() {
        let file = SdsFile {
            enabled: Some(false),
            default_svid_name: Some("svid".into()),
            ..SdsFile::default()
        };
        let flags = SdsFile {
            default_svid_name: Some("mine".into()),
            ..SdsFile::default()
        };
        let s = SdsSettings::resolve(Some(file), Some(flags)).unwrap();
        assert!(!s.enabled);
        assert_eq!(s.default_svid_name, "mine");
        assert_eq!(s.default_bundle_name, "ROOTCA");
        let clash = SdsFile {
            default_all_bundles_name: Some("ROOTCA".into()),
            ..SdsFile::default()
        };
        let e = SdsSettings::resolve(Some(clash), None).unwrap_err();
        assert!(e.contains("default_all_bundles_name"), "{e}");
        let empty = SdsFile {
            default_svid_name: Some(String::new()),
            ..SdsFile::default()
        };
        assert!(SdsSettings::resolve(None, Some(empty)).is_err());
    }
}
