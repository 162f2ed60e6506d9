#!/usr/bin/env bash
# PostgreSQL for the Batch API's multi-replica tests (tests/test_batch_postgres.py), from Debian's `postgresql`
# package (apt's own registry), installed by apt-install.sh. The tests start their own server (initdb + postgres
# in a temporary directory, on a port of their own, as an unprivileged user); the package's own cluster service
# is not needed.
#
# Idempotent: returns at once when /usr/lib/postgresql/*/bin has initdb and postgres. Without apt-get or root,
# or when the install fails, it says so and exits 0: the PostgreSQL tests then skip with that reason instead of
# `make test` failing before pytest starts.
set -euo pipefail

found() { compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

if ! found; then
  if ! why=$(bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" postgresql 2>&1); then
    echo "install-postgresql: $why; the PostgreSQL tests will be skipped" >&2
    exit 0
  fi
  found || { echo "install-postgresql: installed, but no /usr/lib/postgresql/*/bin/postgres; tests will be skipped" >&2; exit 0; }
fi
dirname "$(compgen -G "/usr/lib/postgresql/*/bin/postgres" | sort -V | tail -1)"
