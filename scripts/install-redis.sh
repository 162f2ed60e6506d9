#!/usr/bin/env bash
# Redis for the shared per-key limits' tests (tests/test_rate_limit_store.py), from Debian's `redis-server`
# package (apt's own registry; bookworm has 7.0.15), installed by apt-install.sh. The tests start their own server
# (redis-server in a temporary directory, on a port of their own, without persistence); the package's own service
# is not needed.
#
# Idempotent: returns at once when redis-server is on the PATH (or in /usr/bin), printing its path. Without
# apt-get or root, or when the install fails, it says so and exits 0: the Redis tests then skip with that reason
# instead of `make test` failing before pytest starts.
set -euo pipefail

found() { command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]]; }
where() { command -v redis-server 2>/dev/null || echo /usr/bin/redis-server; }

if ! found; then
  if ! why=$(bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" redis-server 2>&1); then
    echo "install-redis: $why; the Redis tests will be skipped" >&2
    exit 0
  fi
  found || { echo "install-redis: installed, but no redis-server; the Redis tests will be skipped" >&2; exit 0; }
fi
where
