#!/usr/bin/env bash
# GPU smoke test: our vLLM plugin on NVIDIA GPUs, as vLLM runs it there by default (torch.compile + CUDA
# graphs), against transformers on the same machine. Run it unchanged from the repository root:
#
#   bash scripts/gpu-smoke.sh                 # install the CUDA build into .venv-gpu, run every case
#   bash scripts/gpu-smoke.sh --skip-install  # reuse the venv
#   bash scripts/gpu-smoke.sh --dry-run       # print the cases and the commands, run nothing
#
# Cases: the tiny checkpoint, the real-width checkpoint (DeepSeek-V2-Lite's shapes, 2 layers), its AWQ
# export (group 64), and the tiny checkpoint with a generated LoRA adapter (vLLM's LoRA layers against
# transformers on the merged weights), bf16, at TP=1 and, when two GPUs exist, TP=2. Each prints one line
# (`<case>: OK ...` or `<case>: MISMATCH ...`); the script exits non-zero when any case mismatches or fails.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/gpu-smoke.sh [options]
  --venv DIR        virtual environment to create/use (default: .venv-gpu)
  --work DIR        where checkpoints and references go (default: ${TMPDIR:-/tmp}/dsv2-gpu-smoke)
  --tokens N        greedy tokens per prompt (default: 32)
  --cases LIST      comma-separated subset of: tiny,real,awq,lora (default: all)
  --gpus N          number of GPUs to use (default: what nvidia-smi lists)
  --skip-install    use the venv as it is
  --eager           also run every case with --enforce-eager
  --dry-run         print the plan and exit
  -h, --help        this text
EOF
}

VENV=.venv-gpu
WORK="${TMPDIR:-/tmp}/dsv2-gpu-smoke"
TOKENS=32
CASES=tiny,real,awq,lora
GPUS=""
SKIP_INSTALL=0
EAGER=0
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --tokens) TOKENS="$2"; shift 2 ;;
    --cases) CASES="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --eager) EAGER=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-smoke: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$TOKENS" in ''|*[!0-9]*) echo "gpu-smoke: --tokens must be a positive integer, got '$TOKENS'" >&2; exit 2 ;; esac
IFS=, read -r -a CASE_LIST <<<"$CASES"
for c in "${CASE_LIST[@]}"; do
  case "$c" in tiny|real|awq|lora) ;; *) echo "gpu-smoke: unknown case '$c' (tiny, real, awq, lora)" >&2; exit 2 ;; esac
done

if [ -z "$GPUS" ]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
case "$GPUS" in ''|*[!0-9]*) echo "gpu-smoke: --gpus must be a number, got '$GPUS'" >&2; exit 2 ;; esac
if [ "$GPUS" -lt 1 ]; then
  echo "gpu-smoke: no NVIDIA GPU found (nvidia-smi lists none); this script needs at least one" >&2
  exit 2
fi
TP_SIZES=(1)
if [ "$GPUS" -ge 2 ]; then TP_SIZES=(1 2); fi

PY="$VENV/bin/python"
declare -A CKPT_ARGS=(
  [tiny]=""
  [real]="--real-widths"
  [awq]="--real-widths --awq --awq-group-size 64"
  [lora]=""
)
# The lora case: a rank-8 adapter on q_proj, o_proj and the dense and shared-expert MLPs of its checkpoint.
lora_args() {
  if [ "$1" = lora ]; then echo "--lora $WORK/lora-adapter"; fi
}

plan() {
  if [ "$SKIP_INSTALL" -eq 0 ]; then
    echo "install: python3 -m venv $VENV && $PY -m pip install -e '.[cuda]'"
  fi
  for c in "${CASE_LIST[@]}"; do
    echo "checkpoint $c: $PY -m server tiny-model $WORK/$c ${CKPT_ARGS[$c]}"
    if [ "$c" = lora ]; then
      echo "adapter lora: $PY -m server tiny-lora $WORK/lora-adapter --base $WORK/lora"
    fi
    echo "reference $c: $PY scripts/gpu_smoke.py reference --model $WORK/$c --out $WORK/$c.ref.json --tokens $TOKENS$(lora_args "$c" | sed 's/^/ /')"
    for tp in "${TP_SIZES[@]}"; do
      echo "case $c-tp$tp: $PY scripts/gpu_smoke.py run --model $WORK/$c --ref $WORK/$c.ref.json --case $c-tp$tp --tp $tp$(lora_args "$c" | sed 's/^/ /')"
      if [ "$EAGER" -eq 1 ]; then
        echo "case $c-tp$tp-eager: $PY scripts/gpu_smoke.py run --model $WORK/$c --ref $WORK/$c.ref.json --case $c-tp$tp-eager --tp $tp --eager$(lora_args "$c" | sed 's/^/ /')"
      fi
    done
  done
}

echo "gpu-smoke: $GPUS GPU(s), TP sizes ${TP_SIZES[*]}, cases ${CASE_LIST[*]}, $TOKENS tokens"
if [ "$DRY_RUN" -eq 1 ]; then
  plan
  exit 0
fi

cd "$(dirname "$0")/.."
if [ "$SKIP_INSTALL" -eq 0 ]; then
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet -e ".[cuda]"
fi
mkdir -p "$WORK"

failed=0
results=()
for c in "${CASE_LIST[@]}"; do
  # shellcheck disable=SC2086  # the checkpoint flags are words
  [ -f "$WORK/$c/config.json" ] || "$PY" -m server tiny-model "$WORK/$c" ${CKPT_ARGS[$c]} >/dev/null
  read -r -a lora <<<"$(lora_args "$c")"
  if [ "$c" = lora ] && [ ! -f "$WORK/lora-adapter/adapter_config.json" ]; then
    "$PY" -m server tiny-lora "$WORK/lora-adapter" --base "$WORK/lora" >/dev/null
  fi
  [ -f "$WORK/$c.ref.json" ] || "$PY" scripts/gpu_smoke.py reference --model "$WORK/$c" --out "$WORK/$c.ref.json" --tokens "$TOKENS" "${lora[@]}"
  for tp in "${TP_SIZES[@]}"; do
    modes=(compiled)
    if [ "$EAGER" -eq 1 ]; then modes+=(eager); fi
    for mode in "${modes[@]}"; do
      name="$c-tp$tp"; extra=()
      if [ "$mode" = eager ]; then name="$name-eager"; extra=(--eager); fi
      log="$WORK/$name.log"
      if line=$("$PY" scripts/gpu_smoke.py run --model "$WORK/$c" --ref "$WORK/$c.ref.json" --case "$name" --tp "$tp" "${extra[@]}" "${lora[@]}" 2>"$log" | tail -n 1) \
          && [[ "$line" == *": OK "* ]]; then
        results+=("$line")
      else
        results+=("${line:-$name: FAILED (see $log)}")
        failed=1
      fi
      echo "${results[-1]}"
    done
  done
done

echo "gpu-smoke: ${#results[@]} case(s), $([ "$failed" -eq 0 ] && echo "all OK" || echo "FAILURES")"
exit "$failed"
