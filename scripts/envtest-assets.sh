#!/usr/bin/env bash
# Prints a directory holding `kube-apiserver` and `etcd` for the operator's integration tests
# (envtest style), getting them if needed:
#   - $KUBEBUILDER_ASSETS, when it holds both (users with setup-envtest point it there);
#   - otherwise a cache under ~/.cache/philotes/envtest: etcd from Debian's etcd-server
#     package, kube-apiserver built once from Debian's kubernetes source package (1.20).
# Needs root for apt-get when the cache is empty. Progress goes to stderr.
set -euo pipefail

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ]; then
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

cache="${PHILOTES_ENVTEST_CACHE:-$HOME/.cache/philotes/envtest}"
mkdir -p "$cache"
log() { echo "envtest-assets: $*" >&2; }

if [ ! -x "$cache/etcd" ]; then
  if ! command -v etcd >/dev/null 2>&1; then
    log "installing etcd (Debian etcd-server)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >&2
  fi
  ln -sf "$(command -v etcd)" "$cache/etcd"
fi

# The stamp marks a binary built with the reflect2 fix below (an older cache lacks it).
if [ ! -x "$cache/kube-apiserver" ] || [ ! -f "$cache/kube-apiserver.reflect2-1.0.2" ]; then
  log "building kube-apiserver from Debian's kubernetes source package (once; a few minutes)"
  if ! grep -rqs "deb-src" /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null; then
    cat > /etc/apt/sources.list.d/philotes-deb-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go rsync jq dpkg-dev \
    golang-github-modern-go-reflect2-dev >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get source -qq kubernetes >&2)
  src="$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -n1)"
  [ -n "$src" ] || { log "apt-get source kubernetes gave no source tree"; exit 1; }
  # Kubernetes 1.20 vendors reflect2 1.0.1, which crashes (SIGSEGV in map iteration) when
  # built with Go >= 1.18; Debian's reflect2 1.0.2 is the fixed, API-compatible release.
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
  mkdir -p "$work/.go/src/k8s.io"
  ln -s "$src" "$work/.go/src/k8s.io/kubernetes"
  (
    cd "$work/.go/src/k8s.io/kubernetes"
    export GOPATH="$work/.go" CGO_ENABLED=0 GOFLAGS=-mod=vendor GO111MODULE=off HOME="$work"
    make WHAT=cmd/kube-apiserver >&2
  )
  bin="$(find "$src/_output" -type f -name kube-apiserver | head -n1)"
  [ -n "$bin" ] || { log "the build produced no kube-apiserver"; exit 1; }
  install -m 0755 "$bin" "$cache/kube-apiserver"
  touch "$cache/kube-apiserver.reflect2-1.0.2"
fi
echo "$cache"
