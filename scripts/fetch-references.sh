#!/usr/bin/env bash
# The reference documents the tests check against, fetched from their upstream repositories at pinned commits
# into DEST (default: ../shared, beside the checkout, where the tests look for them), and verified byte for byte
# against the checksums below. For machines that have no ../shared: GitHub Actions runs this before `make test`.
#   scripts/fetch-references.sh [DEST]
#
#   openai-openapi/openapi.json   openai/openai-openapi, commit f85dbe2
#   k8s-crds/monitoring.coreos.com_{servicemonitors,podmonitors,prometheusrules}.yaml
#                                 prometheus-operator/prometheus-operator, commit 6adcebc50, example/prometheus-operator-crd/
#   k8s-crds/keda.sh_scaledobjects.yaml
#                                 kedacore/keda, commit 8b4f083ca, config/crd/bases/
#   k8s-crds/gateway.networking.k8s.io_{gateways,httproutes}.yaml
#                                 kubernetes-sigs/gateway-api v1.6.1, config/crd/standard/
#   k8s-crds/inference.networking.k8s.io_inferencepools.yaml
#                                 kubernetes-sigs/gateway-api-inference-extension v1.6.0, config/crd/bases/
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/../shared}"
mkdir -p "$DEST/openai-openapi" "$DEST/k8s-crds"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# fetch REPO REF DIR FILE...: FILEs of REPO at REF (a tag, or a commit: abbreviated ones too) into DIR. A clone
# without file contents, then only the named files: small however long the history.
fetch() {
  local repo=$1 ref=$2 dir=$3
  shift 3
  local src="$work/${repo//\//_}"
  git clone --quiet --filter=blob:none --no-checkout "https://github.com/$repo.git" "$src"
  git -C "$src" checkout --quiet "$ref" -- "$@"
  for file in "$@"; do cp "$src/$file" "$dir/"; done
}

fetch openai/openai-openapi f85dbe2 "$DEST/openai-openapi" openapi.json
crds=example/prometheus-operator-crd
fetch prometheus-operator/prometheus-operator 6adcebc50 "$DEST/k8s-crds" \
  "$crds/monitoring.coreos.com_servicemonitors.yaml" \
  "$crds/monitoring.coreos.com_podmonitors.yaml" \
  "$crds/monitoring.coreos.com_prometheusrules.yaml"
fetch kedacore/keda 8b4f083ca "$DEST/k8s-crds" config/crd/bases/keda.sh_scaledobjects.yaml
fetch kubernetes-sigs/gateway-api v1.6.1 "$DEST/k8s-crds" \
  config/crd/standard/gateway.networking.k8s.io_gateways.yaml \
  config/crd/standard/gateway.networking.k8s.io_httproutes.yaml
fetch kubernetes-sigs/gateway-api-inference-extension v1.6.0 "$DEST/k8s-crds" \
  config/crd/bases/inference.networking.k8s.io_inferencepools.yaml

# The same bytes as ../shared holds: a changed upstream file fails here, not as a puzzling test failure.
(cd "$DEST" && sha256sum --check --quiet) <<'SUMS'
bbfd19abcde0e7412da99378deb2a959ccdd3a812f97c9e35901921e8e973f9a  openai-openapi/openapi.json
25b885f5870b8fff1ae82efa2628b2761cef3745900c2aecf8fb76629a01255a  k8s-crds/gateway.networking.k8s.io_gateways.yaml
a424a0d6c953b162e71d1d97bb7e75012d8f1ac264e7274f2763d1b96ab39852  k8s-crds/gateway.networking.k8s.io_httproutes.yaml
55e0dbf39c50c4bbdd60106493a4573df4bb44479f9ce46762f1af718883e5cd  k8s-crds/inference.networking.k8s.io_inferencepools.yaml
207afc4ca44fd9e3f4bbfb1c8fae08f3a365e098a52714fe8eb672bbd239cbcd  k8s-crds/keda.sh_scaledobjects.yaml
45a93443daa687d3654f7e9631909ff7edcdf3ec09c5e60251b74aa2722aee5d  k8s-crds/monitoring.coreos.com_podmonitors.yaml
78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d  k8s-crds/monitoring.coreos.com_prometheusrules.yaml
a99047972c9dd7679ce2050b9968e8a08773492e671b3e17abd476d42aa78a32  k8s-crds/monitoring.coreos.com_servicemonitors.yaml
SUMS
echo "fetch-references: $DEST verified"
