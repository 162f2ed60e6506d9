#!/usr/bin/env bash
# Install one Debian package that a test needs a real server from (install-redis.sh, install-postgresql.sh):
# servers that link the distribution's shared libraries are installed, not unpacked, which needs root or
# passwordless sudo. A first failure refreshes apt's package lists once and tries again.
#
# Usage: apt-install.sh PACKAGE. Exit 0 once installed; otherwise 1, with the reason as the one line on stderr
# (the caller says what its tests do then).
set -euo pipefail

package="$1"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-get not found" >&2
  exit 1
fi
if [[ "$(id -u)" == 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "needs root or passwordless sudo" >&2
  exit 1
fi
install() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1; }
if ! install; then
  "${as_root[@]}" apt-get update -qq >/dev/null 2>&1 || true
  install || { echo "apt-get install $package failed" >&2; exit 1; }
fi
