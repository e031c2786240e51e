#!/usr/bin/env bash
# The operator at fleet scale: BENCH_PIPELINES (200) CdcPipelines over two source servers,
# BENCH_REPLICAS (3) `philotes controller` processes against a real kube-apiserver, as the
# deploy/ ServiceAccount. Reports time to all Ready, RSS and database connections per
# pipeline, API server requests per pipeline per minute at steady state (from the API server's
# audit log), takeover after SIGKILL and shutdown time. See bench/README.md.
#
#   bench/operator-scale.sh
#   BENCH_PIPELINES=40 BENCH_STEADY_SECONDS=30 bench/operator-scale.sh   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
command -v pg_config >/dev/null || { echo "pg_config not found: PostgreSQL server binaries are needed" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl not found (Debian package openssl)" >&2; exit 1; }
python3 -c 'import yaml' 2>/dev/null || { echo "python3 yaml not found (Debian package python3-yaml)" >&2; exit 1; }
echo "==> building philotes (release)" >&2
cargo build --release --quiet --bin philotes
ASSETS="$(bash scripts/envtest-assets.sh)"
python3 bench/operator_scale.py "$PWD/target/release/philotes" "$ASSETS" bench/out
