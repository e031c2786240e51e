//! Reading a manifest file the way `kubectl apply -f` would: one or more YAML documents, the
//! `CdcPipeline`s plus the `v1` `Secret`s they reference.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

use crate::crd::CdcPipeline;
use crate::pipeline::config::{secret_value, secret_values, SecretSource, SecretValues};
use crate::pipeline::error::{Error, Result};

/// The documents of a manifest that Philotes uses.
#[derive(Debug, Default)]
pub struct Manifest {
    pub pipelines: Vec<CdcPipeline>,
    /// `(namespace, name)` → key → value.
    secrets: BTreeMap<(String, String), SecretValues>,
    /// Documents of other kinds, skipped, as `kind name` for a warning.
    pub skipped: Vec<String>,
}

pub const DEFAULT_NAMESPACE: &str = "default";

impl Manifest {
    /// Parses every document. `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest> {
        let mut manifest = Manifest::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let n = i + 1;
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).map_err(|e| {
                Error::InvalidSpec(format!("{origin}: document {n} is not valid YAML: {e}"))
            })?;
            if value.is_null() {
                continue;
            }
            let field = |f: &str| value.get(f).and_then(|v| v.as_str()).unwrap_or("");
            let (api_version, kind) = (field("apiVersion").to_string(), field("kind").to_string());
            let bad = |e: serde_path_to_error::Error<serde_yaml::Error>| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path.is_empty() || path == "." {
                    Error::InvalidSpec(format!("{origin}: document {n} ({kind}): {inner}"))
                } else {
                    Error::InvalidSpec(format!("{origin}: document {n} ({kind}): {path}: {inner}"))
                }
            };
            match (api_version.as_str(), kind.as_str()) {
                ("philotes.io/v1alpha1", "CdcPipeline") => {
                    let mut p: CdcPipeline = serde_path_to_error::deserialize(value).map_err(bad)?;
                    if p.metadata.name.as_deref().unwrap_or("").is_empty() {
                        return Err(Error::InvalidSpec(format!(
                            "{origin}: document {n} (CdcPipeline) has no metadata.name"
                        )));
                    }
                    p.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.into());
                    manifest.pipelines.push(p);
                }
                ("v1", "Secret") => {
                    let s: Secret = serde_path_to_error::deserialize(value).map_err(bad)?;
                    let name = s.metadata.name.clone().unwrap_or_default();
                    let ns = s
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
                    manifest.secrets.insert((ns, name), secret_values(s));
                }
                (_, "CdcPipeline") => {
                    return Err(Error::InvalidSpec(format!(
                        "{origin}: document {n} is a CdcPipeline of apiVersion `{api_version}`; this version of Philotes reads philotes.io/v1alpha1"
                    )))
                }
                ("", _) | (_, "") => {
                    return Err(Error::InvalidSpec(format!(
                        "{origin}: document {n} has no apiVersion or kind; every document needs both"
                    )))
                }
                _ => manifest.skipped.push(format!(
                    "{kind} {}",
                    value
                        .get("metadata")
                        .and_then(|m| m.get("name"))
                        .and_then(|v| v.as_str())
                        .unwrap_or("?")
                )),
            }
        }
        Ok(manifest)
    }

    /// The pipeline to run: the only one, or the one named.
    pub fn pipeline(&self, name: Option<&str>, origin: &str) -> Result<&CdcPipeline> {
        let names = || {
            self.pipelines
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (name, self.pipelines.as_slice()) {
            (_, []) => Err(Error::InvalidSpec(format!(
                "{origin} holds no CdcPipeline (apiVersion philotes.io/v1alpha1, kind CdcPipeline)"
            ))),
            (None, [one]) => Ok(one),
            (None, _) => Err(Error::InvalidSpec(format!(
                "{origin} holds several CdcPipelines ({}); choose one with --pipeline NAME",
                names()
            ))),
            (Some(wanted), all) => all
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(wanted))
                .ok_or_else(|| {
                    Error::InvalidSpec(format!(
                        "{origin} has no CdcPipeline named {wanted} (it has: {})",
                        names()
                    ))
                }),
        }
    }

    /// Replaces one key of a secret (used by the demo to point at its throwaway server).
    pub fn set_secret(&mut self, namespace: &str, name: &str, key: &str, value: String) {
        self.secrets
            .entry((namespace.to_string(), name.to_string()))
            .or_default()
            .insert(key.to_string(), Some(value));
    }
}

impl SecretSource for Manifest {
    fn get(&self, namespace: &str, name: &str, key: &str) -> Result<String> {
        let secret = self
            .secrets
            .get(&(namespace.to_string(), name.to_string()))
            .ok_or_else(|| {
                Error::Secret(format!(
                    "secret {namespace}/{name} not found; add a v1 Secret document named {name} in namespace {namespace} to the manifest"
                ))
            })?;
        secret_value(secret, namespace, name, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::config::PipelineConfig;

    const GOOD: &str = r#"
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {name: orders, namespace: shop}
spec:
  source:
    connectionSecretRef: {name: source-db, key: uri}
    tables: [public.orders]
  buffer:
    connectionSecretRef: {name: buffer-db}
  flushInterval: 250ms
---
apiVersion: v1
kind: Secret
metadata: {name: source-db, namespace: shop}
stringData:
  uri: postgres://app:pw@src:5433/source
---
apiVersion: v1
kind: Secret
metadata: {name: buffer-db, namespace: shop}
data:
  uri: cG9zdGdyZXM6Ly9hcHA6cHdAYnVmOjU0MzIvYnVmZmVy
"#;

    #[test]
    fn reads_pipeline_and_both_secret_forms() {
        let m = Manifest::parse(GOOD, "p.yaml").unwrap();
        let p = m.pipeline(None, "p.yaml").unwrap();
        let c = PipelineConfig::resolve("shop", "orders", &p.spec, &m).unwrap();
        assert_eq!(c.source.host, "src");
        assert_eq!(c.buffer.host, "buf");
        assert_eq!(c.buffer.dbname, "buffer");
        assert_eq!(c.flush_interval, std::time::Duration::from_millis(250));
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let typo = GOOD.replace("tables:", "tabels:");
        let err = Manifest::parse(&typo, "p.yaml").unwrap_err().to_string();
        assert!(
            err.contains("document 1 (CdcPipeline)") && err.contains("tabels"),
            "{err}"
        );
        let wrong = GOOD.replace("flushInterval: 250ms", "batchSize: lots");
        let err = Manifest::parse(&wrong, "p.yaml").unwrap_err().to_string();
        assert!(
            err.contains("batchSize") || err.contains("invalid type"),
            "{err}"
        );
        let neg = GOOD.replace("flushInterval: 250ms", "batchSize: -5");
        assert!(Manifest::parse(&neg, "p.yaml").is_err());
    }

    #[test]
    fn no_pipeline_or_several_say_what_to_do() {
        let err = Manifest::parse("apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n", "f")
            .unwrap()
            .pipeline(None, "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no CdcPipeline"), "{err}");
        let two = format!(
            "{GOOD}\n---\n{}",
            GOOD.replace("name: orders", "name: other")
        );
        let m = Manifest::parse(&two, "f").unwrap();
        assert!(m
            .pipeline(None, "f")
            .unwrap_err()
            .to_string()
            .contains("--pipeline"));
        assert_eq!(
            m.pipeline(Some("other"), "f")
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("other")
        );
    }
}
