//! A real kube-apiserver + etcd on loopback (envtest style), with static tokens for an admin
//! and for the operator's ServiceAccount, RBAC authorization, the CRD from `crds/` and the
//! RBAC from `deploy/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Config};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub const OPERATOR_USER: &str = "system:serviceaccount:philotes-system:philotes";

pub struct ApiServer {
    _dir: tempfile::TempDir,
    etcd: Child,
    apiserver: Child,
    pub port: u16,
}

static SHARED: OnceLock<ApiServer> = OnceLock::new();

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn assets() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/envtest-assets.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/envtest-assets.sh");
    assert!(out.status.success(), "scripts/envtest-assets.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The binary's API server, started once and stopped after the process exits.
pub fn shared() -> &'static ApiServer {
    SHARED.get_or_init(ApiServer::start)
}

impl ApiServer {
    fn start() -> ApiServer {
        let bin = assets();
        let dir = tempfile::Builder::new()
            .prefix("philotes-apiserver-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let (client_port, peer_port, port) = (free_port(), free_port(), free_port());
        let etcd = Command::new(bin.join("etcd"))
            .args(["--data-dir", d.join("etcd").to_str().unwrap()])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .args(["--unsafe-no-fsync"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("etcd.log")).unwrap())
            .spawn()
            .expect("start etcd");
        // A service-account signing key (ECDSA P-256): the private key signs, the public
        // key (which kube-apiserver 1.20 needs in a file of its own) verifies.
        let key = rcgen::KeyPair::generate().expect("key");
        std::fs::write(d.join("sa.key"), key.serialize_pem()).unwrap();
        std::fs::write(d.join("sa.pub"), key.public_key_pem()).unwrap();
        std::fs::write(
            d.join("tokens.csv"),
            format!(
                "admin-token,admin,1,\"system:masters\"\noperator-token,{OPERATOR_USER},2,\"system:serviceaccounts,system:serviceaccounts:philotes-system\"\n"
            ),
        )
        .unwrap();
        std::fs::create_dir_all(d.join("certs")).unwrap();
        let sa = d.join("sa.key");
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client_port}"))
            .arg(format!("--secure-port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--disable-admission-plugins=ServiceAccount")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("apiserver.log")).unwrap())
            .spawn()
            .expect("start kube-apiserver");
        // Stop both once this test binary exits, whatever way it does.
        let pid = std::process::id();
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; kill -9 {} {} 2>/dev/null",
                apiserver.id(),
                etcd.id()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            // Outlives this process by design: nothing here waits for it.
            .map(drop)
            .expect("watcher");
        let server = ApiServer {
            _dir: dir,
            etcd,
            apiserver,
            port,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let ok = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "exec 3<>/dev/tcp/127.0.0.1/{} && echo ok",
                    self.port
                ))
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "kube-apiserver did not listen within 90s; see its log in {}",
                self._dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn client(&self, token: &str) -> Client {
        philotes::pipeline::conn::install_crypto_provider();
        let mut cfg = Config::new(
            format!("https://127.0.0.1:{}", self.port)
                .parse()
                .expect("url"),
        );
        cfg.accept_invalid_certs = true;
        cfg.auth_info.token = Some(secrecy::SecretString::from(token.to_string()));
        cfg.default_namespace = "default".into();
        Client::try_from(cfg).expect("kube client")
    }

    pub fn admin(&self) -> Client {
        self.client("admin-token")
    }

    /// A client authenticated as the operator's ServiceAccount.
    pub fn operator(&self) -> Client {
        self.client("operator-token")
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.etcd.kill();
    }
}

async fn apply<K>(client: &Client, doc: serde_yaml::Value)
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let obj: K = serde_yaml::from_value(doc).expect("manifest document");
    let name = obj.meta().name.clone().expect("name");
    let api: Api<K> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("philotes-tests").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e:?}"));
}

/// Creates or replaces the CRD the way Helm and a client-side `kubectl apply` do. A server
/// before 1.23 drops the CEL rules (`x-kubernetes-validations`) it does not know on create
/// or update, while its server-side apply refuses them as undeclared fields.
async fn install_crd(client: &Client, doc: serde_yaml::Value) {
    let crd: CustomResourceDefinition = serde_yaml::from_value(doc).expect("crd document");
    let name = crd.metadata.name.clone().expect("name");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    // Tests install concurrently: a create or replace that lost a race is tried again.
    for _ in 0..20 {
        let result = match api.get_opt(&name).await.expect("read crd") {
            None => api.create(&Default::default(), &crd).await,
            Some(existing) => {
                let mut crd = crd.clone();
                crd.metadata.resource_version = existing.metadata.resource_version;
                api.replace(&name, &Default::default(), &crd).await
            }
        };
        match result {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("install {name}: {e:?}"),
        }
    }
    panic!("install {name}: still conflicting after 20 tries");
}

async fn apply_namespaced<K>(client: &Client, doc: serde_yaml::Value)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let obj: K = serde_yaml::from_value(doc).expect("manifest document");
    let name = obj.meta().name.clone().expect("name");
    let ns = obj
        .meta()
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    api.patch(
        &name,
        &PatchParams::apply("philotes-tests").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name}: {e:?}"));
}

/// Applies the documents of a manifest file (the kinds `crds/` and `deploy/` use).
pub async fn apply_file(client: &Client, path: &Path) {
    let text = std::fs::read_to_string(path).expect("read manifest");
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "CustomResourceDefinition" => install_crd(client, value).await,
            "Namespace" => apply::<Namespace>(client, value).await,
            "ClusterRole" => apply::<ClusterRole>(client, value).await,
            "ClusterRoleBinding" => apply::<ClusterRoleBinding>(client, value).await,
            "ServiceAccount" => apply_namespaced::<ServiceAccount>(client, value).await,
            "Role" => apply_namespaced::<Role>(client, value).await,
            "RoleBinding" => apply_namespaced::<RoleBinding>(client, value).await,
            // The Deployment needs a kubelet to mean anything (its Service with it); the
            // tests run the controller in-process under the same identity instead.
            "Deployment" | "Service" => {}
            other => panic!("apply_file: unexpected kind {other}"),
        }
    }
}

/// Installs the CRD from `crds/` and everything in `deploy/` but the Deployment, then waits
/// for the CRD to be served.
pub async fn install(client: &Client) {
    let started = Instant::now();
    loop {
        match client.apiserver_version().await {
            Ok(_) => break,
            Err(e) if started.elapsed() > Duration::from_secs(90) => {
                panic!("kube-apiserver not serving after 90s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    apply_file(client, &root.join("crds/cdcpipelines.philotes.io.yaml")).await;
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("deploy"))
        .expect("deploy/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        apply_file(client, &f).await;
    }
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let started = Instant::now();
    loop {
        let crd = api.get("cdcpipelines.philotes.io").await.expect("crd");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "CRD not established"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The shared API server set up for a test in namespace `ns` (the CRD and the deploy/ RBAC
/// installed, the namespace created), its admin client, and the namespace's `CdcPipeline`s.
pub async fn namespace(ns: &str) -> (&'static ApiServer, Client, Api<philotes::crd::CdcPipeline>) {
    super::log();
    let api = shared();
    let admin = api.admin();
    install(&admin).await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let _ = namespaces
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))
                .expect("namespace"),
        )
        .await;
    let pipelines = Api::namespaced(admin.clone(), ns);
    (api, admin, pipelines)
}

/// Creates or replaces Secret `name` in `ns` holding a connection `uri`.
pub async fn put_secret(admin: &Client, ns: &str, name: &str, uri: &str) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), ns);
    let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "stringData": {"uri": uri}
    }))
    .expect("secret");
    secrets
        .patch(
            name,
            &PatchParams::apply("philotes-tests").force(),
            &Patch::Apply(&s),
        )
        .await
        .expect("put secret");
}
