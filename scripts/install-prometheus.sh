#!/usr/bin/env bash
# Prometheus and promtool for tests/test_observability.py, from Debian's `prometheus` package (apt's own
# registry; nothing from GitHub). The .deb is fetched with `apt-get download` and unpacked into
# .cache/prometheus/: no root needed, nothing installed system-wide, no service started. Both binaries are
# static apart from libc.
#
# Idempotent: returns at once when .cache/prometheus/bin has both. Without apt-get, or when the package cannot
# be fetched, it says so and exits 0: the observability tests then skip with that reason instead of
# `make test` failing before pytest starts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/prometheus"
BIN="$DEST/bin"

if [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]]; then
  echo "$BIN"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "install-prometheus: apt-get/dpkg-deb not found; the observability tests will be skipped" >&2
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fetch() { (cd "$work" && apt-get download prometheus >/dev/null 2>&1); }
if ! fetch; then
  # Package lists missing or stale: refresh them when we may (root, or passwordless sudo), then retry.
  if [[ "$(id -u)" == 0 ]]; then
    apt-get update -qq >/dev/null 2>&1 || true
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo -n apt-get update -qq >/dev/null 2>&1 || true
  fi
  fetch || { echo "install-prometheus: apt-get download prometheus failed; the observability tests will be skipped" >&2; exit 0; }
fi

dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
mkdir -p "$BIN"
for tool in prometheus promtool; do
  install -m 0755 "$work/root/usr/bin/$tool" "$BIN/$tool.tmp"
  mv "$BIN/$tool.tmp" "$BIN/$tool"
done
"$BIN/prometheus" --version 2>&1 | head -1 >&2
echo "$BIN"
