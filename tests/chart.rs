//! The Helm chart, rendered and linted by Helm's own engine (scripts/helm.py over the
//! helm-python-sdk wheel), its rendered objects applied to a real API server with a
//! server-side dry run, and every manifest in examples/ checked the same way.

mod common;

use std::path::Path;
use std::process::Command;

use common::apiserver;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::discovery::{Discovery, Scope};
use serde_json::{json, Value};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn helm(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(root().join("scripts/helm.py"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("python3 scripts/helm.py");
    assert!(
        out.status.success(),
        "scripts/helm.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn render(values: Value) -> String {
    helm(&[
        "template",
        "charts/philotes",
        "--set-json",
        &values.to_string(),
    ])
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn chart_lints_clean_in_strict_mode() {
    let out = helm(&["lint", "charts/philotes"]);
    assert!(out.contains("no warnings"), "{out}");
    let out = helm(&[
        "lint",
        "charts/philotes",
        "--set-json",
        r#"{"watchNamespace": "shop", "serviceMonitor": {"enabled": true}, "replicas": 2}"#,
    ]);
    assert!(out.contains("no warnings"), "{out}");
}

/// deploy/ is the chart rendered with default values; regenerate with `make deploy`.
#[test]
fn deploy_is_the_chart_rendered_with_defaults_and_crds_match() {
    let rendered = render(json!({}));
    let committed = std::fs::read_to_string(root().join("deploy/02-philotes.yaml")).unwrap();
    assert!(
        rendered == committed,
        "deploy/02-philotes.yaml differs from the rendered chart: run `make deploy`"
    );
    let crd = std::fs::read_to_string(root().join("crds/cdcpipelines.philotes.io.yaml")).unwrap();
    let chart_crd =
        std::fs::read_to_string(root().join("charts/philotes/crds/cdcpipelines.philotes.io.yaml"))
            .unwrap();
    assert!(
        crd == chart_crd,
        "the chart's CRD differs from crds/: run `make crd`"
    );
}

#[test]
fn default_values_give_a_hardened_cluster_wide_operator() {
    let d = docs(&render(json!({})));
    let dep = find(&d, "Deployment")[0];
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(c["args"][0], "controller");
    assert!(!c["args"].to_string().contains("--namespace"));
    assert_eq!(find(&d, "ClusterRole").len(), 1);
    assert_eq!(find(&d, "ClusterRoleBinding").len(), 1);
    assert_eq!(find(&d, "ServiceMonitor").len(), 0);
    assert_eq!(find(&d, "Service")[0]["spec"]["ports"][0]["port"], 8080);
    // The lease Role is namespaced in the release namespace.
    let roles = find(&d, "Role");
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0]["metadata"]["namespace"], "philotes-system");
}

#[test]
fn non_default_values_are_honoured() {
    let d = docs(&render(json!({
        "watchNamespace": "shop",
        "replicas": 3,
        "image": {"repository": "philotes", "tag": "dev", "pullPolicy": "Never"},
        "logLevel": "debug", "logFormat": "text",
        "serviceMonitor": {"enabled": true, "labels": {"release": "prom"}},
        "nodeSelector": {"disk": "ssd"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "cdc", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
             "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "philotes"}}}}]}},
        "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        "podAnnotations": {"example.com/team": "data"},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
    })));
    let dep = find(&d, "Deployment")[0];
    let pod = &dep["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    assert_eq!(dep["spec"]["replicas"], 3);
    assert_eq!(c["image"], "philotes:dev");
    assert_eq!(c["imagePullPolicy"], "Never");
    let args = c["args"].to_string();
    assert!(
        args.contains("--namespace=shop") && args.contains("--log-format=text"),
        "{args}"
    );
    let env = c["env"].to_string();
    assert!(
        env.contains("RUST_BACKTRACE") && env.contains("\"debug\""),
        "{env}"
    );
    assert_eq!(pod["spec"]["nodeSelector"]["disk"], "ssd");
    assert_eq!(pod["spec"]["tolerations"][0]["value"], "cdc");
    assert!(pod["spec"]["affinity"]["podAntiAffinity"].is_object());
    assert_eq!(pod["metadata"]["annotations"]["example.com/team"], "data");
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    // A single namespace: a Role there instead of cluster-wide rights.
    assert_eq!(find(&d, "ClusterRole").len(), 0);
    let roles = find(&d, "Role");
    assert!(roles
        .iter()
        .any(|r| r["metadata"]["namespace"] == "shop"
            && r["rules"].to_string().contains("cdcpipelines")));
    let bindings = find(&d, "RoleBinding");
    assert!(bindings
        .iter()
        .any(|b| b["metadata"]["namespace"] == "shop"));
    let sm = find(&d, "ServiceMonitor")[0];
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
}

/// Applies every document with a server-side dry run; returns how many were checked.
async fn dry_run_apply(client: &kube::Client, discovery: &Discovery, docs: &[Value]) -> usize {
    let mut checked = 0;
    for doc in docs {
        let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("object");
        let types = obj.types.clone().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(&types).expect("gvk");
        if gvk.kind == "ServiceMonitor" {
            continue; // its CRD belongs to the Prometheus Operator, not installed here
        }
        let (ar, caps) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("the API server does not serve {gvk:?}"));
        let name = obj.metadata.name.clone().expect("name");
        let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
            let ns = obj
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            Api::namespaced_with(client.clone(), &ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        api.patch(
            &name,
            &PatchParams::apply("philotes-tests").dry_run(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("the API server refused {} {name}: {e}", gvk.kind));
        checked += 1;
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_chart_and_examples_apply_to_a_real_api_server() {
    let api = apiserver::shared();
    let admin = api.admin();
    apiserver::install(&admin).await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    for ns in ["shop", "philotes-system"] {
        let _ = namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await;
    }
    // A freshly established CRD shows up in discovery a moment later: wait for it.
    let cdcp = GroupVersionKind::gvk("philotes.io", "v1alpha1", "CdcPipeline");
    let started = std::time::Instant::now();
    let discovery = loop {
        let d = Discovery::new(admin.clone())
            .run()
            .await
            .expect("discovery");
        if d.resolve_gvk(&cdcp).is_some() {
            break d;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "CdcPipeline not in discovery after 30s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let mut checked = 0;
    for values in [
        json!({}),
        json!({"watchNamespace": "shop", "replicas": 2, "serviceMonitor": {"enabled": true}}),
    ] {
        checked += dry_run_apply(&admin, &discovery, &docs(&render(values))).await;
    }
    // Every manifest in examples/, CdcPipelines included (validated by the CRD's schema).
    let mut examples = Vec::new();
    for dir in ["examples", "examples/kind"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                examples.push(p);
            }
        }
    }
    assert!(examples.len() >= 3);
    let mut pipelines = 0;
    for p in &examples {
        let d = docs(&std::fs::read_to_string(p).unwrap());
        pipelines += find(&d, "CdcPipeline").len();
        for ns in d.iter().filter_map(|x| x["metadata"]["namespace"].as_str()) {
            let _ = namespaces
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
                )
                .await;
        }
        checked += dry_run_apply(&admin, &discovery, &d).await;
    }
    assert!(pipelines >= 2, "examples hold CdcPipelines");
    assert!(checked > 20, "{checked}");

    // And the schema does refuse a broken example.
    let mut broken =
        docs(&std::fs::read_to_string(root().join("examples/kind/pipeline.yaml")).unwrap());
    broken[0]["spec"]["batchSize"] = json!(0);
    let refused = std::panic::AssertUnwindSafe(dry_run_apply(&admin, &discovery, &broken));
    let outcome = futures_util::FutureExt::catch_unwind(refused).await;
    assert!(
        outcome.is_err(),
        "batchSize 0 must be refused by the schema"
    );
}
