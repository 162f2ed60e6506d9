#!/usr/bin/env bash
# Redis for the shared per-key limits' tests (tests/test_rate_limit_store.py), from Debian's `redis-server`
# package (apt's own registry; bookworm has 7.0.15). The tests start their own server (redis-server in a temporary
# directory, on a port of their own, without persistence); the package's own service is not needed. The server
# links shared libraries of the distribution, so the package is installed, not unpacked: that needs root or
# passwordless sudo.
#
# Idempotent: returns at once when redis-server is on the PATH (or in /usr/bin), printing its path. Without
# apt-get or root, or when the install fails, it says so and exits 0: the Redis tests then skip with that reason
# instead of `make test` failing before pytest starts.
set -euo pipefail

found() { command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]]; }
where() { command -v redis-server 2>/dev/null || echo /usr/bin/redis-server; }

if found; then
  where
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-redis: apt-get not found; the Redis tests will be skipped" >&2
  exit 0
fi
if [[ "$(id -u)" == 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install-redis: needs root or passwordless sudo; the Redis tests will be skipped" >&2
  exit 0
fi
install() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1; }
if ! install; then
  "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 || true
  install || { echo "install-redis: apt-get install redis-server failed; the Redis tests will be skipped" >&2; exit 0; }
fi
found || { echo "install-redis: installed, but no redis-server; the Redis tests will be skipped" >&2; exit 0; }
where
