#!/usr/bin/env bash
# PostgreSQL for the Batch API's multi-replica tests (tests/test_batch_postgres.py), from Debian's `postgresql`
# package (apt's own registry). The tests start their own server (initdb + postgres in a temporary directory, on
# a port of their own, as an unprivileged user); the package's own cluster service is not needed. Unlike
# Prometheus, the server links many shared libraries, so the package is installed, not unpacked: that needs
# root or passwordless sudo.
#
# Idempotent: returns at once when /usr/lib/postgresql/*/bin has initdb and postgres. Without apt-get or root,
# or when the install fails, it says so and exits 0: the PostgreSQL tests then skip with that reason instead of
# `make test` failing before pytest starts.
set -euo pipefail

found() { compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

if found; then
  dirname "$(compgen -G "/usr/lib/postgresql/*/bin/postgres" | sort -V | tail -1)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-postgresql: apt-get not found; the PostgreSQL tests will be skipped" >&2
  exit 0
fi
if [[ "$(id -u)" == 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install-postgresql: needs root or passwordless sudo; the PostgreSQL tests will be skipped" >&2
  exit 0
fi
install() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1; }
if ! install; then
  "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 || true
  install || { echo "install-postgresql: apt-get install postgresql failed; the PostgreSQL tests will be skipped" >&2; exit 0; }
fi
found || { echo "install-postgresql: installed, but no /usr/lib/postgresql/*/bin/postgres; tests will be skipped" >&2; exit 0; }
dirname "$(compgen -G "/usr/lib/postgresql/*/bin/postgres" | sort -V | tail -1)"
