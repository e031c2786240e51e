# One place for developer commands; CI (.ci/run) calls the same targets.
.PHONY: test test-deps lint unit demo crd deploy fuzz

# The whole test suite: formatting, lints, unit and integration tests (real PostgreSQL servers,
# a real kube-apiserver and etcd, Helm's engine for the chart).
test: lint test-deps
	cargo test --all-targets

# What the tests need beyond Rust and PostgreSQL: Helm's engine (a PyPI wheel), and gdb (a
# snapshot test holds a server backend half way through its commit: tests/common/hold.rs;
# installed with apt as root). etcd and kube-apiserver are fetched/built on first use by
# scripts/envtest-assets.sh (root, apt).
test-deps:
	@python3 -c 'import helm_python' 2>/dev/null || python3 -m pip install -q helm-python-sdk
	@command -v gdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gdb >/dev/null; } || \
	  echo "gdb is missing and cannot be installed here: install it (apt-get install gdb)" >&2

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

unit:
	cargo test --lib

demo:
	cargo run --release -- demo

# Regenerate deploy/02-philotes.yaml: the chart rendered with default values (pip install helm-python-sdk).
deploy:
	python3 scripts/helm.py template charts/philotes > deploy/02-philotes.yaml

# Regenerate the committed CRD (crds/, and its copies in deploy/ and the chart) from the Rust types.
crd:
	cargo run -q -- crd > crds/cdcpipelines.philotes.io.yaml
	cp crds/cdcpipelines.philotes.io.yaml deploy/01-crd.yaml
	cp crds/cdcpipelines.philotes.io.yaml charts/philotes/crds/cdcpipelines.philotes.io.yaml

# Grow the fuzz corpus (cargo install cargo-fuzz; runs on stable via RUSTC_BOOTSTRAP, no sanitizer).
fuzz:
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode -s none -- -max_total_time=60
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run manifest -s none -- -max_total_time=60
