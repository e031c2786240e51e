//! Reading what a `CdcPipeline` references: its Secrets.
//!
//! The controller watches Secrets' metadata only (names, labels, resourceVersions; never
//! their data) to know when one a pipeline references changes, and reads a referenced
//! Secret's data with a GET only when its resourceVersion differs from the one cached: no GET
//! at all in a steady state. With a `--secret-label KEY=VALUE` restriction, only Secrets
//! carrying that label are watched and used.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};

use crate::crd::CdcPipeline;
use crate::pipeline::config::{secret_value, secret_values, SecretSource, SecretValues};
use crate::pipeline::error::{Error, Result};

/// A label a Secret must carry to be used by a pipeline (`--secret-label KEY=VALUE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretLabel {
    pub key: String,
    pub value: String,
}

impl SecretLabel {
    /// Parses `KEY=VALUE`, with Kubernetes' label syntax: a key is an optional DNS prefix and
    /// `/`, then a name of at most 63 characters; a value at most 63 characters. Names and
    /// values are letters, digits, `-`, `_` and `.`, beginning and ending with a letter or
    /// digit (a value may be empty).
    pub fn parse(s: &str) -> std::result::Result<SecretLabel, String> {
        let bad = || {
            format!(
                "--secret-label {s:?}: expected one Kubernetes label as KEY=VALUE, e.g. philotes.io/use=true"
            )
        };
        let (key, value) = s.split_once('=').ok_or_else(bad)?;
        let segment = |t: &str, empty_ok: bool| {
            (empty_ok && t.is_empty())
                || (t.len() <= 63
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    && t.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && t.ends_with(|c: char| c.is_ascii_alphanumeric()))
        };
        let (prefix, name) = match key.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, key),
        };
        let prefix_ok = prefix.is_none_or(|p| {
            !p.is_empty()
                && p.len() <= 253
                && p.split('.').all(|part| {
                    !part.is_empty()
                        && part
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
        });
        if prefix_ok && segment(name, false) && segment(value, true) {
            Ok(SecretLabel {
                key: key.to_string(),
                value: value.to_string(),
            })
        } else {
            Err(bad())
        }
    }

    /// The watch's label selector.
    pub fn selector(&self) -> String {
        format!("{}={}", self.key, self.value)
    }

    fn carried_by(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.get(&self.key) == Some(&self.value)
    }
}

/// Referenced Secrets' data by namespace, name and the resourceVersion it was read at.
pub struct SecretCache {
    /// Metadata of the watched Secrets, kept by the controller's watch.
    meta: Store<PartialObjectMeta<Secret>>,
    data: Mutex<HashMap<(String, String), (String, SecretValues)>>,
    label: Option<SecretLabel>,
}

impl SecretCache {
    pub fn new(meta: Store<PartialObjectMeta<Secret>>, label: Option<SecretLabel>) -> SecretCache {
        SecretCache {
            meta,
            data: Mutex::new(HashMap::new()),
            label,
        }
    }

    fn cached(&self, namespace: &str, name: &str, version: &str) -> Option<SecretValues> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.get(&(namespace.to_string(), name.to_string()))
            .filter(|(v, _)| v == version)
            .map(|(_, values)| values.clone())
    }

    fn keep(&self, namespace: &str, name: &str, version: String, values: SecretValues) {
        self.data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.to_string(), name.to_string()), (version, values));
    }

    /// Forgets what is no longer referenced by `pipelines` (deleted pipelines' Secrets).
    pub fn retain_referenced<'a>(&self, pipelines: impl Iterator<Item = &'a CdcPipeline>) {
        let wanted: std::collections::HashSet<(String, String)> = pipelines
            .flat_map(|p| {
                let ns = p.namespace().unwrap_or_default();
                referenced(p).into_iter().map(move |n| (ns.clone(), n))
            })
            .collect();
        self.data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| wanted.contains(k));
    }
}

/// What one reference resolved to.
#[derive(Hash)]
enum Found {
    Values(SecretValues),
    Missing,
    /// Exists, but without the label the operator is restricted to.
    Unlabelled(String),
}

/// The referenced secrets' data, as of one reconcile.
#[derive(Default)]
pub struct Secrets {
    data: BTreeMap<String, Found>,
}

impl Secrets {
    /// Every secret the pipeline references: from the cache when the watched metadata shows
    /// it unchanged, else read (and cached). A missing or unlabelled secret is recorded as
    /// such (the error names it when a key is asked for); API errors are returned.
    pub async fn fetch(
        client: &Client,
        cache: &SecretCache,
        p: &CdcPipeline,
        namespace: &str,
    ) -> Result<Secrets, kube::Error> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let mut data = BTreeMap::new();
        for name in referenced(p) {
            if data.contains_key(&name) {
                continue;
            }
            let watched = cache
                .meta
                .get(&ObjectRef::new(&name).within(namespace))
                .and_then(|m| m.resource_version());
            if let Some(values) = watched
                .as_deref()
                .and_then(|v| cache.cached(namespace, &name, v))
            {
                data.insert(name, Found::Values(values));
                continue;
            }
            // Restricted to labelled Secrets: one not watched is looked at by its metadata
            // first, so an unlabelled Secret's data is never read.
            if let (Some(label), None) = (&cache.label, &watched) {
                match api.get_metadata_opt(&name).await? {
                    None => {
                        data.insert(name, Found::Missing);
                        continue;
                    }
                    Some(m) if !label.carried_by(m.labels()) => {
                        data.insert(name, Found::Unlabelled(label.selector()));
                        continue;
                    }
                    Some(_) => {}
                }
            }
            let found = match api.get_opt(&name).await? {
                None => Found::Missing,
                Some(s) => match &cache.label {
                    // Labelled when looked at, unlabelled since: its data goes unused.
                    Some(label) if !label.carried_by(s.labels()) => {
                        Found::Unlabelled(label.selector())
                    }
                    _ => {
                        let version = s.resource_version().unwrap_or_default();
                        let values = secret_values(s);
                        cache.keep(namespace, &name, version, values.clone());
                        Found::Values(values)
                    }
                },
            };
            data.insert(name, found);
        }
        Ok(Secrets { data })
    }

    /// A hash of every value: changes when a secret is rotated.
    pub fn fingerprint(&self, state: &mut impl Hasher) {
        self.data.hash(state);
    }
}

/// Names of the secrets a pipeline references.
pub fn referenced(p: &CdcPipeline) -> Vec<String> {
    vec![
        p.spec.source.connection_secret_ref.name.clone(),
        p.spec.buffer.connection_secret_ref.name.clone(),
    ]
}

impl SecretSource for Secrets {
    fn get(&self, namespace: &str, name: &str, key: &str) -> Result<String> {
        match self.data.get(name) {
            Some(Found::Values(values)) => secret_value(values, namespace, name, key),
            Some(Found::Unlabelled(selector)) => Err(Error::Secret(format!(
                "secret {namespace}/{name} does not carry the label {selector}, which this operator requires of the \
                 Secrets a CdcPipeline uses (--secret-label, chart value secretLabel); label it: \
                 kubectl -n {namespace} label secret {name} {selector}"
            ))),
            _ => Err(Error::Secret(format!(
                "secret {namespace}/{name} not found; create it in namespace {namespace}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_label_is_one_key_and_value() {
        assert_eq!(
            SecretLabel::parse("philotes.io/use=true"),
            Ok(SecretLabel {
                key: "philotes.io/use".into(),
                value: "true".into()
            })
        );
        assert!(
            SecretLabel::parse("team=").is_ok(),
            "an empty value is a label"
        );
        for bad in [
            "",
            "=x",
            "novalue",
            "a=b,c=d",
            "a=b=c",
            "a=has space",
            "Bad_Prefix/x=y",
            "x=-y",
        ] {
            let e = SecretLabel::parse(bad).expect_err(bad);
            assert!(e.contains("KEY=VALUE"), "{e}");
        }
    }
}
