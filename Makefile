# One place for developer commands; CI (.ci/run) calls the same targets.
.PHONY: test lint unit demo crd

# The whole test suite: formatting, lints, unit and integration tests (real PostgreSQL).
test: lint
	cargo test --all-targets

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

unit:
	cargo test --lib

demo:
	cargo run --release -- demo

# Regenerate the committed CRD from the Rust types.
crd:
	cargo run -q -- crd > crds/cdcpipelines.philotes.io.yaml
	cp crds/cdcpipelines.philotes.io.yaml deploy/01-crd.yaml
