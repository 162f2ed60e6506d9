#!/usr/bin/env bash
# Install Debian's Chromium for the playground's browser tests (tests/test_playground.py drives it with
# playwright; playwright's own browser download cannot reach its host from here). Idempotent: returns at once
# when /usr/bin/chromium (or $CHROMIUM) is there.
#
# Without apt-get, or without root, it says so and exits 0: the browser tests then skip with that reason
# instead of `make test` failing before pytest starts.
set -euo pipefail

BROWSER="${CHROMIUM:-/usr/bin/chromium}"
if [[ -x "${BROWSER}" ]]; then
  echo "${BROWSER}"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: apt-get not found; the playground's browser tests will be skipped" >&2
  exit 0
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "install-browser: not root and no sudo; the playground's browser tests will be skipped" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; then
  "${sudo[@]}" apt-get update -qq >/dev/null 2>&1 || true
  "${sudo[@]}" apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
    || { echo "install-browser: apt-get install chromium failed; browser tests will be skipped" >&2; exit 0; }
fi
echo "${BROWSER}"
