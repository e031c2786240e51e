//! The commands a newcomer runs first, and the generated files that must not drift.

mod common;

use common::run_cli;

/// The README's first command works: a real pipeline on a throwaway PostgreSQL.
#[test]
fn demo_runs_end_to_end() {
    let (code, out) = run_cli(&["demo"]);
    assert_eq!(code, 0, "{out}");
    for phrase in [
        "starting a throwaway PostgreSQL",
        "caught up: 12 events written",
        "SNAPSHOT customers   → {\"id\":1,\"name\":\"Existing\"",
        "UPDATE   customers",
        "DELETE   orders     {\"id\":5}",
        "==> done",
    ] {
        assert!(out.contains(phrase), "missing {phrase:?} in:\n{out}");
    }
}

/// crds/ is generated from the Rust types; regenerate with `make crd` when this fails.
#[test]
fn committed_crd_matches_the_types() {
    let (code, out) = run_cli(&["crd"]);
    assert_eq!(code, 0);
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/cdcpipelines.philotes.io.yaml"
    ))
    .expect("crds/cdcpipelines.philotes.io.yaml");
    assert!(
        out == committed,
        "crds/cdcpipelines.philotes.io.yaml is stale: run `make crd`"
    );
    let deployed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/01-crd.yaml"))
            .expect("deploy/01-crd.yaml");
    assert!(
        deployed == committed,
        "deploy/01-crd.yaml differs from crds/: run `make crd`"
    );
}
