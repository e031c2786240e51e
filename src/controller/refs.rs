//! Reading what a `CdcPipeline` references: its Secrets.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::crd::CdcPipeline;
use crate::pipeline::config::{secret_value, secret_values, SecretSource, SecretValues};
use crate::pipeline::error::{Error, Result};

/// The referenced secrets' data, fetched once per reconcile.
#[derive(Default)]
pub struct Secrets {
    data: BTreeMap<String, Option<SecretValues>>,
}

impl Secrets {
    /// Fetches every secret the pipeline references. A missing secret is recorded as such
    /// (the error names it when a key is asked for); API errors are returned.
    pub async fn fetch(
        client: &Client,
        p: &CdcPipeline,
        namespace: &str,
    ) -> Result<Secrets, kube::Error> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let mut data = BTreeMap::new();
        for name in referenced(p) {
            if data.contains_key(&name) {
                continue;
            }
            let values = api.get_opt(&name).await?.map(secret_values);
            data.insert(name, values);
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
            Some(Some(values)) => secret_value(values, namespace, name, key),
            _ => Err(Error::Secret(format!(
                "secret {namespace}/{name} not found; create it in namespace {namespace}"
            ))),
        }
    }
}
