#!/usr/bin/env bash
# `make loadtest`: serve the tiny checkpoint, wait for /ready, run a bounded headless locust run, stop the server.
#
#   bash loadtests/run.sh [extra locust flags, e.g. --slo-ttft-p95-ms 2000]
#
# Reports land in $LOADTEST_REPORT_DIR (reports/loadtest): loadtest_stats.csv, loadtest_stats_history.csv,
# loadtest_failures.csv, loadtest_exceptions.csv, loadtest_summary.json, report.html, server.log.
# A rate sweep (LOADTEST_RATES) writes sweep.json, requests.jsonl, throughput.png, ttft.png, tpot.png,
# latency_hist.png and report.html there, and locust's own HTML report as locust.html.
# The exit code is locust's: 0 when every SLO holds (see loadtests/locustfile.py); 2 when the run cannot start
# (a workload that does not fit the server's context, say so).
#
# Knobs (environment):
#   DSV2_TARGET            URL of a server that is already running: start none, test that one.
#   LOADTEST_MODEL_DIR     checkpoint to serve (default .cache/tiny-dsv2, written when missing).
#   LOADTEST_SERVER        dsv2 (python -m server serve, default) or vllm (vLLM's own OpenAI server).
#   LOADTEST_SERVER_ARGS   extra server flags (default "--max-model-len 2048").
#   LOADTEST_PORT          port for the server (default: a free one).
#   LOADTEST_USERS / LOADTEST_SPAWN_RATE / LOADTEST_RUN_TIME   locust -u / -r / -t (4 / 2 / 30s).
#   LOADTEST_RATES         open-loop sweep over these request rates (2,4,8); LOADTEST_RUN_TIME is then per rate,
#                          LOADTEST_ARRIVAL poisson (default) or constant.
#   LOADTEST_INPUT_LEN / LOADTEST_OUTPUT_LEN   random-token prompts of exactly these lengths (ignore_eos).
#   LOADTEST_DATASET       a ShareGPT-format JSON file to draw prompts from.
#   LOADTEST_TOKENIZER     counts prompts against the context (default: the served checkpoint, when run.sh serves).
#   LOADTEST_READY_TIMEOUT seconds to wait for the server (default 300).
#   LOADTEST_REPORT_DIR    where the reports go (default reports/loadtest).
# plus every LOADTEST_* variable the locustfile reads (SLOs, goodput SLOs, shape, prompts, ...).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOCUST=${LOCUST:-$(dirname "$PY")/locust}
MODEL_DIR=${LOADTEST_MODEL_DIR:-.cache/tiny-dsv2}
SERVER=${LOADTEST_SERVER:-dsv2}
SERVER_ARGS=${LOADTEST_SERVER_ARGS:---max-model-len 2048}
USERS=${LOADTEST_USERS:-4}
SPAWN_RATE=${LOADTEST_SPAWN_RATE:-2}
RUN_TIME=${LOADTEST_RUN_TIME:-30s}
READY_TIMEOUT=${LOADTEST_READY_TIMEOUT:-300}
REPORT_DIR=${LOADTEST_REPORT_DIR:-reports/loadtest}
# The tiny model needs little KV cache; vLLM's CPU default would reserve far more.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

if [[ ! -x $LOCUST ]]; then
    echo "run.sh: $LOCUST not found; install it with: $(dirname "$PY")/pip install 'locust>=2.30'" >&2
    exit 2
fi
export LOADTEST_REPORT_DIR=$REPORT_DIR
mkdir -p "$REPORT_DIR"
rm -f "$REPORT_DIR"/loadtest_*.csv "$REPORT_DIR"/loadtest_summary.json "$REPORT_DIR"/report.html \
    "$REPORT_DIR"/locust.html "$REPORT_DIR"/sweep.json "$REPORT_DIR"/requests.jsonl \
    "$REPORT_DIR"/{throughput,ttft,tpot,latency_hist}.png

server_pid=""
stop_server() {
    [[ -n $server_pid ]] || return 0
    # SIGTERM to the server alone: it drains, then stops its engine processes itself.
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "run.sh: server $server_pid still running 60 s after SIGTERM; killing its process group" >&2
        kill -KILL -- "-$server_pid" 2>/dev/null || kill -KILL "$server_pid" 2>/dev/null || true
    else
        # Stragglers of its process group (setsid below made the server its leader), if any.
        kill -TERM -- "-$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${DSV2_TARGET:-} ]]; then
    target=$DSV2_TARGET
    ready_path=/health
    echo "run.sh: testing the running server at $target"
else
    if [[ ! -f $MODEL_DIR/config.json ]]; then
        "$PY" -m server tiny-model "$MODEL_DIR"
    fi
    export LOADTEST_TOKENIZER=${LOADTEST_TOKENIZER-$MODEL_DIR}
    port=${LOADTEST_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    target=http://127.0.0.1:$port
    name=$(basename "$MODEL_DIR")
    # shellcheck disable=SC2206  # word splitting of the extra flags is intended
    extra=($SERVER_ARGS)
    case $SERVER in
        dsv2)
            cmd=("$PY" -m server serve --model "$MODEL_DIR" --host 127.0.0.1 --port "$port" "${extra[@]}")
            ready_path=/ready ;;
        vllm)
            cmd=("$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name "$name"
                 --host 127.0.0.1 --port "$port" "${extra[@]}")
            ready_path=/health ;;
        *)
            echo "run.sh: LOADTEST_SERVER=$SERVER; use dsv2 or vllm" >&2
            exit 2 ;;
    esac
    echo "run.sh: starting ${cmd[*]} (log: $REPORT_DIR/server.log)"
    if command -v setsid >/dev/null; then
        setsid "${cmd[@]}" >"$REPORT_DIR/server.log" 2>&1 &
    else
        "${cmd[@]}" >"$REPORT_DIR/server.log" 2>&1 &
    fi
    server_pid=$!
fi

echo "run.sh: waiting up to ${READY_TIMEOUT}s for $target$ready_path"
deadline=$((SECONDS + READY_TIMEOUT))
probe() {  # 0 when the URL answers 2xx; curl when there is one, else the venv's Python
    if command -v curl >/dev/null; then
        curl -fsS -o /dev/null --max-time 10 "$1" 2>/dev/null
    else
        "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$1" 2>/dev/null
    fi
}
until probe "$target$ready_path"; do
    if [[ -n $server_pid ]] && ! kill -0 "$server_pid" 2>/dev/null; then
        server_pid=""
        echo "run.sh: the server exited before it was ready; last lines of $REPORT_DIR/server.log:" >&2
        tail -n 30 "$REPORT_DIR/server.log" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "run.sh: $target$ready_path not ready after ${READY_TIMEOUT}s" >&2
        [[ -z $server_pid ]] || tail -n 30 "$REPORT_DIR/server.log" >&2
        exit 1
    fi
    sleep 1
done

if [[ -n ${LOADTEST_RATES:-} ]]; then
    # The sweep is its own load shape: one open-loop user, each rate for LOADTEST_RUN_TIME, then it stops.
    export LOADTEST_RUN_TIME=$RUN_TIME
    echo "run.sh: open-loop sweep at $LOADTEST_RATES req/s, $RUN_TIME each, against $target"
    load=(--html "$REPORT_DIR/locust.html")
else
    echo "run.sh: locust -u $USERS -r $SPAWN_RATE -t $RUN_TIME against $target"
    load=(-u "$USERS" -r "$SPAWN_RATE" -t "$RUN_TIME" --html "$REPORT_DIR/report.html")
fi
rc=0
"$LOCUST" -f loadtests/locustfile.py --host "$target" --headless --only-summary --stop-timeout 15 \
    --csv "$REPORT_DIR/loadtest" "${load[@]}" "$@" || rc=$?
echo "run.sh: reports in $REPORT_DIR/ (report.html, loadtest_*.csv, loadtest_summary.json); locust exit code $rc"
exit "$rc"
