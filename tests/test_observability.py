"""Monitoring for real: a running gateway on the tiny checkpoint, scraped by a real Prometheus (Debian's
`prometheus` package, installed into .cache/prometheus by scripts/install-prometheus.sh).

- Every query of the Grafana dashboard and every alert of the PrometheusRule (deploy/monitoring) is evaluated
  through Prometheus' HTTP API after a few requests: each parses and returns data (alerts may stay inactive;
  their measured side must have data), and every metric name they use is on the gateway's /metrics.
- The rules pass `promtool check rules`, run inside that Prometheus without errors, and `promtool test rules`
  proves each alert fires under its condition and stays quiet otherwise.
- Every metric the Inference Extension's endpoint picker reads from a vLLM model server is on /metrics, with
  the type and labels it parses (deploy/components/inference-pool/endpoint-picker-config.yaml).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import ports
from tests.test_gateway_engine import MODEL, Server, module_server

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "prometheusrule.yaml"
PICKER_CONFIG = ROOT / "deploy" / "components" / "inference-pool" / "endpoint-picker-config.yaml"
PROMETHEUS_BIN = Path(os.environ.get("PROMETHEUS_BIN", ROOT / ".cache" / "prometheus" / "bin"))

# The labels the Prometheus Operator puts on a ServiceMonitor target; job is the variant's Service name.
TARGET_LABELS = {"namespace": "llm", "pod": "dsv2-serve-obs-0", "service": "dsv2-serve-obs"}
JOB = "dsv2-serve-obs"
# The endpoint picker's target (the inference-pool component's ServiceMonitor), and kube-state-metrics' labels.
PICKER_JOB = "dsv2-serve-epp-obs"
PICKER_TARGET = {"job": PICKER_JOB, "instance": "10.0.0.2:9090", "namespace": "llm", "pod": "dsv2-serve-epp-obs-0",
                 "service": PICKER_JOB}  # fmt: skip
_KSM = 'job="kube-state-metrics", namespace="llm"'
# The rule group of alerts on the gateway's own /metrics: the ones a real scrape below can evaluate.
GATEWAY_GROUP = "dsv2-serve"
STORE_GROUP = "dsv2-serve-rate-limit-store"  # pods with --rate-limit-store: not on the scrape below
# Grafana's variables as "All" selects them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$namespace": ".*", "$model": ".*"}

# What the endpoint picker reads from a vLLM model server: the `vllm` engine of its core-metrics-extractor
# (gateway-api-inference-extension v1.5.0, pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go;
# the Model Server Protocol, docs/proposals/003-model-server-protocol). cache_config_info is read for its labels.
PICKER_VLLM_DEFAULTS = {
    "queuedRequestsSpec": "vllm:num_requests_waiting",
    "runningRequestsSpec": "vllm:num_requests_running",
    "kvUsageSpec": "vllm:kv_cache_usage_perc",
    "loraSpec": "vllm:lora_requests_info",
    "cacheInfoSpec": "vllm:cache_config_info",
}
PICKER_LABELS = {
    "loraSpec": {"running_lora_adapters", "waiting_lora_adapters", "max_lora"},
    "cacheInfoSpec": {"block_size", "num_gpu_blocks"},
}

# PromQL words that are not metric names.
PROMQL_WORDS = {
    *"sum min max avg count group stddev stdvar topk bottomk quantile count_values".split(),
    *"by without on ignoring group_left group_right and or unless bool offset".split(),
}


def tool(name: str) -> str:
    path = PROMETHEUS_BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(
            f"{name} not installed: scripts/install-prometheus.sh could not fetch Debian's prometheus"
        )
    return found


def rule_groups() -> dict:
    """The PrometheusRule's spec is a Prometheus rules file as is."""
    return yaml.safe_load(RULES.read_text())["spec"]


def alerts(group: str | None = None) -> list[dict]:
    return [
        rule
        for g in rule_groups()["groups"]
        if group in (None, g["name"])
        for rule in g["rules"]
        if "alert" in rule
    ]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every dashboard target, Grafana's variables substituted."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{panel['title']}: unknown Grafana variable in {expr}"
            out.append((panel["title"], expr))
    return out


def measured(expr: str) -> str:
    """The measured side of an alert written as `<quantity> <op> <threshold>`."""
    m = re.fullmatch(r"(.*?)\s*(?:>|<|>=|<=|==|!=)\s*[-+0-9.e]+\s*", expr, re.S)
    assert m, f"alert expression is not `<quantity> <op> <threshold>`: {expr}"
    return m[1]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: strings, matchers, ranges and label lists removed first."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    functions = set(re.findall(r"\b([a-zA-Z_]\w*)\s*\(", s))
    words = set(re.findall(r"(?<![\w:.])[a-zA-Z_:][\w:]*", s))
    return words - functions - PROMQL_WORDS


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model_name) (rate(a_bucket{x=~"b|c"}[5m]) * on (pod) '
        "group_left (model_name) group by (pod, model_name) (vllm:x))) or 0 * rate(b_total[1m]) > 2"
    )
    assert metric_names(expr) == {"a_bucket", "vllm:x", "b_total"}


# ---- static checks (no engine) ------------------------------------------------------------------------------


def test_promtool_check_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule_groups()))
    proc = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout, proc.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    groups = rule_groups()
    groups["groups"][0]["rules"][0]["expr"] = "sum by (job (up)"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(groups))
    assert (
        subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True).returncode != 0
    )


def test_the_alerts_the_issue_asks_for() -> None:
    by_name = {rule["alert"]: rule for rule in alerts()}
    assert set(by_name) == {
        "DSV2EngineDown",
        "DSV2StartupSlow",
        "DSV2High5xxRate",
        "DSV2SlowTimeToFirstToken",
        "DSV2KVCacheNearlyFull",
        "DSV2High429Rate",
        "DSV2EventLoopLag",
        "DSV2RateLimitStoreDown",
        "DSV2NoAvailableReplica",
        "DSV2EndpointPickerDown",
        "DSV2EndpointPickerMissesPods",
        "DSV2EndpointPickerRefusals",
    }
    for rule in by_name.values():
        measured(rule["expr"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+m", rule["for"]), "a `for` keeps one bad scrape from paging"
    # The TTFT SLO is read from the histogram's own 2.0 s bucket (a fraction counted, not interpolated).
    assert 'le="2.0"' in by_name["DSV2SlowTimeToFirstToken"]["expr"]
    # The server's `up` alerts leave the picker's job (dsv2-serve-epp-*) to the picker's own alert.
    assert 'job!~"dsv2-serve-epp.*"' in by_name["DSV2EngineDown"]["expr"]


# Metric names the cluster-side groups read, as their exporters spell them. The endpoint picker's:
# gateway-api-inference-extension v1.5.0, pkg/epp/metrics/metrics.go (Subsystem + Name: inference_pool_ready_pods
# {name}; inference_objective_request_total {model_name, target_model_name, priority};
# inference_objective_request_error_total {model_name, target_model_name, error_code}, codes from
# pkg/common/error/error.go). kube-state-metrics' Deployment metrics (kube_deployment_*{namespace, deployment}).
PICKER_METRICS = {
    "inference_pool_ready_pods",
    "inference_objective_request_total",
    "inference_objective_request_error_total",
}
PICKER_ERROR_CODES = {"Unknown", "BadRequest", "Unauthorized", "Forbidden", "NotFound", "Internal",
                      "ServiceUnavailable", "ModelServerError", "ResourceExhausted"}  # fmt: skip
KUBE_STATE_METRICS = {"kube_deployment_spec_replicas", "kube_deployment_status_replicas_available"}


def test_cluster_alerts_read_metrics_their_exporters_have() -> None:
    """The gateway group is checked against a real scrape below; the other groups against their exporters."""
    for group in rule_groups()["groups"]:
        for rule in group["rules"]:
            names = metric_names(rule["expr"])
            assert names, rule["alert"]
            if group["name"] == GATEWAY_GROUP:
                assert all(n.startswith(("dsv2_", "vllm:")) or n == "up" for n in names), (
                    rule["alert"],
                    names,
                )
            elif group["name"] == STORE_GROUP:  # metrics of pods with a store only: as the gateway names them
                assert names <= _gateway_metric_names(), (rule["alert"], names)
            else:
                assert names <= PICKER_METRICS | KUBE_STATE_METRICS | {"up"}, (rule["alert"], names)
            for code in re.findall(r'error_code!?=~?"([^"]*)"', rule["expr"]):
                assert code in PICKER_ERROR_CODES, code


def _gateway_metric_names() -> set[str]:
    from server.gateway.metrics import GatewayMetrics

    return {
        name
        for family in GatewayMetrics().registry.collect()
        for name in (family.name, f"{family.name}_total")
    }


# Synthetic series for `promtool test rules`, one hour at 1m steps. TARGET is replaced by a gateway target's
# labels (as a ServiceMonitor gives them), PICKER by the endpoint picker's.
_SERIES = {
    "up{TARGET}": "1 1 1 0x57",
    # 200 requests/s of which 20 answer 500 and 30 answer 429 (per 1m step: 12000, 1200, 1800).
    'dsv2_http_requests_total{TARGET, route="/v1/chat/completions", status="200"}': "0+12000x60",
    'dsv2_http_requests_total{TARGET, route="/v1/chat/completions", status="500"}': "0+1200x60",
    'dsv2_http_requests_total{TARGET, route="/v1/chat/completions", status="429"}': "0+1800x60",
    # Every request takes 2.5-5 s to its first token.
    'dsv2_time_to_first_token_seconds_bucket{TARGET, route="/v1/chat/completions", le="2.0"}': "0x60",
    'dsv2_time_to_first_token_seconds_bucket{TARGET, route="/v1/chat/completions", le="2.5"}': "0x60",
    'dsv2_time_to_first_token_seconds_bucket{TARGET, route="/v1/chat/completions", le="5.0"}': "0+60x60",
    'dsv2_time_to_first_token_seconds_bucket{TARGET, route="/v1/chat/completions", le="+Inf"}': "0+60x60",
    'dsv2_time_to_first_token_seconds_count{TARGET, route="/v1/chat/completions"}': "0+60x60",
    'vllm:kv_cache_usage_perc{TARGET, engine="0", model_name="tiny-dsv2"}': "0.95x60",
    # Every event-loop sample 0.5-1 s late.
    'dsv2_event_loop_lag_seconds_bucket{TARGET, le="0.5"}': "0x60",
    'dsv2_event_loop_lag_seconds_bucket{TARGET, le="1.0"}': "0+600x60",
    'dsv2_event_loop_lag_seconds_bucket{TARGET, le="+Inf"}': "0+600x60",
    # The rate-limit store unreachable for the whole hour.
    'dsv2_rate_limit_store_up{TARGET, store="redis://dsv2-serve-redis:6379/0"}': "0x60",
    # Downloading for the whole hour.
    'dsv2_startup_phase{TARGET, phase="downloading"}': "1x60",
    'dsv2_startup_phase{TARGET, phase="serving"}': "0x60",
    # One Deployment with no available replica; another whose 2 available pods the picker sees only 1 of.
    f'kube_deployment_spec_replicas{{{_KSM}, deployment="{JOB}"}}': "1x60",
    f'kube_deployment_status_replicas_available{{{_KSM}, deployment="{JOB}"}}': "0x60",
    f'kube_deployment_spec_replicas{{{_KSM}, deployment="dsv2-serve-pool"}}': "2x60",
    f'kube_deployment_status_replicas_available{{{_KSM}, deployment="dsv2-serve-pool"}}': "2x60",
    'inference_pool_ready_pods{PICKER, name="dsv2-serve-pool"}': "1x60",
    # The picker down; 60 of its 600 requests a minute refused by the picker itself (400: unparsable), the
    # pods' own errors (ModelServerError) not counted.
    "up{PICKER}": "0x60",
    'inference_objective_request_total{PICKER, model_name="m", target_model_name="m", priority="0"}': "0+540x60",
    'inference_objective_request_error_total{PICKER, model_name="m", target_model_name="m", error_code="BadRequest"}': "0+60x60",
    'inference_objective_request_error_total{PICKER, model_name="m", target_model_name="m", '
    'error_code="ModelServerError"}': "0+600x60",
}

# Quiet: a healthy variant scaling up. Serving pod "p" (fast first tokens, KV cache half full), a pod that
# appeared 10 minutes ago and is still pulling its image (no answer yet: within DSV2EngineDown's grace), a pod
# downloading for 20 minutes (under DSV2StartupSlow's 45), Deployments with replicas available, a picker that
# sees every available pod and forwards the pods' own errors.
_QUIET_SERIES = {
    'up{job="JOB", namespace="llm", pod="p", instance="10.0.0.1:8000"}': "1x60",
    'up{job="JOB", namespace="llm", pod="new", instance="10.0.0.3:8000"}': "_x50 0x10",
    'up{job="JOB", namespace="llm", pod="starting", instance="10.0.0.4:8000"}': "_x40 1x20",
    'dsv2_http_requests_total{job="JOB", namespace="llm", pod="p", route="/v1/completions", status="200"}': "0+600x60",
    'dsv2_time_to_first_token_seconds_bucket{job="JOB", namespace="llm", pod="p", route="/v1/completions", '
    'le="2.0"}': "0+600x60",
    'dsv2_time_to_first_token_seconds_count{job="JOB", namespace="llm", pod="p", route="/v1/completions"}': "0+600x60",
    'vllm:kv_cache_usage_perc{job="JOB", namespace="llm", pod="p", model_name="m"}': "0.5x60",
    'dsv2_startup_phase{job="JOB", namespace="llm", pod="p", phase="serving"}': "1x60",
    'dsv2_rate_limit_store_up{job="JOB", namespace="llm", pod="p", store="redis://dsv2-serve-redis:6379/0"}': "1x60",
    'dsv2_startup_phase{job="JOB", namespace="llm", pod="starting", phase="downloading"}': "_x40 1x20",
    'dsv2_startup_phase{job="JOB", namespace="llm", pod="starting", phase="serving"}': "_x40 0x20",
    f'kube_deployment_spec_replicas{{{_KSM}, deployment="JOB"}}': "3x60",
    f'kube_deployment_status_replicas_available{{{_KSM}, deployment="JOB"}}': "1x60",
    f'kube_deployment_spec_replicas{{{_KSM}, deployment="PICKER_JOB"}}': "1x60",
    f'kube_deployment_status_replicas_available{{{_KSM}, deployment="PICKER_JOB"}}': "1x60",
    'up{job="PICKER_JOB", namespace="llm", pod="epp", instance="10.0.0.2:9090"}': "1x60",
    'inference_pool_ready_pods{job="PICKER_JOB", namespace="llm", name="JOB"}': "1x60",
    'inference_objective_request_total{job="PICKER_JOB", namespace="llm", model_name="m", target_model_name="m", '
    'priority="0"}': "0+600x60",
    'inference_objective_request_error_total{job="PICKER_JOB", namespace="llm", model_name="m", '
    'target_model_name="m", error_code="ModelServerError"}': "0+60x60",
}


def _series(series: dict[str, str]) -> list[dict]:
    target = ", ".join(
        f'{k}="{v}"' for k, v in {"job": JOB, "instance": "10.0.0.1:8000", **TARGET_LABELS}.items()
    )
    picker = ", ".join(f'{k}="{v}"' for k, v in PICKER_TARGET.items())
    out = []
    for selector, values in series.items():
        text = selector.replace("{TARGET", "{" + target).replace("{PICKER", "{" + picker)
        text = text.replace('"PICKER_JOB"', f'"{PICKER_JOB}"').replace('"JOB"', f'"{JOB}"')
        out.append({"series": text, "values": values})
    return out


def test_promtool_unit_tests_fire_every_alert(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule_groups()))
    at = "60m"
    fired = {rule["alert"] for rule in alerts()}
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _series(_SERIES),
                "alert_rule_test": [
                    {"eval_time": at, "alertname": name, "exp_alerts": [_expected(name)]}
                    for name in sorted(fired)
                ],
            },
            {
                "interval": "1m",
                "input_series": _series(_QUIET_SERIES),
                "alert_rule_test": [
                    {"eval_time": at, "alertname": name, "exp_alerts": []} for name in sorted(fired)
                ],
            },
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    proc = subprocess.run([tool("promtool"), "test", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _expected(alert: str) -> dict:
    """The labels each alert carries for the synthetic series above (its `by` labels, or the target's)."""
    severity = next(r["labels"]["severity"] for r in alerts() if r["alert"] == alert)
    grouped = {
        "DSV2EngineDown": {"job": JOB, "instance": "10.0.0.1:8000", **TARGET_LABELS},
        "DSV2StartupSlow": {"namespace": "llm", "pod": TARGET_LABELS["pod"]},
        "DSV2KVCacheNearlyFull": {"namespace": "llm", "pod": TARGET_LABELS["pod"], "model_name": "tiny-dsv2"},
        "DSV2EventLoopLag": {"namespace": "llm", "pod": TARGET_LABELS["pod"]},
        "DSV2RateLimitStoreDown": {"namespace": "llm", "pod": TARGET_LABELS["pod"]},
        "DSV2NoAvailableReplica": {"namespace": "llm", "deployment": JOB},
        "DSV2EndpointPickerDown": PICKER_TARGET,
        "DSV2EndpointPickerMissesPods": {"namespace": "llm", "deployment": "dsv2-serve-pool"},
        "DSV2EndpointPickerRefusals": {"namespace": "llm", "job": PICKER_JOB},
    }.get(alert, {"namespace": "llm", "job": JOB})
    rule = next(r for r in alerts() if r["alert"] == alert)

    def render(template: str) -> str:  # Prometheus' templating, for the forms the rules use
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: grouped[m[1]], template)
        return re.sub(r"\{\{ \$value(?: \| \w+)? \}\}", _VALUES.get(alert, ""), text)

    annotations = {key: render(value) for key, value in rule["annotations"].items()}
    return {
        "exp_labels": {**grouped, "alertname": alert, "severity": severity},
        "exp_annotations": annotations,
    }


# What the alerts' $value renders to for _SERIES: 1200 of 15000 requests are 500s, 1800 are 429s, every first
# token takes over 2 s, the KV cache sits at 95%, one Deployment wants 1 replica, the picker misses 1 pod and
# refuses 60 of 600 requests. promtool compares these rendered strings; humanizePercentage and humanizeDuration
# print 4 significant digits (%.4g), which is the tolerance: float error in the rates and the quantile (e.g.
# 8.000000000000002%) rounds away.
_VALUES = {
    "DSV2High5xxRate": "8%",
    "DSV2High429Rate": "12%",
    "DSV2SlowTimeToFirstToken": "100%",
    "DSV2KVCacheNearlyFull": "95%",
    "DSV2EventLoopLag": "995ms",
    "DSV2NoAvailableReplica": "1",
    "DSV2EndpointPickerMissesPods": "1",
    "DSV2EndpointPickerRefusals": "10%",
}


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert {"namespace", "model"} <= set(variables)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    titles = " / ".join(p["title"] for p in dash["panels"]).lower()
    for wanted in (
        "first token",
        "inter-token",
        "end-to-end",
        "tokens/s",
        "running",
        "waiting",
        "kv-cache",
        "429",
        "5xx",
        "event-loop lag",
    ):
        assert wanted in titles, f"no panel for {wanted}"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
        for target in panel["targets"]:
            if "vllm:" in target["expr"] or "dsv2_" in target["expr"]:
                assert "model_name" in target["expr"], f"{panel['title']}: not per model"


def test_dashboard_configmap_carries_the_json(tmp_path: Path) -> None:
    from tests.test_k8s import _kustomize

    docs = _kustomize(MONITORING)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = configmap["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD.read_text())
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == rule_groups()


# ---- against the running gateway ----------------------------------------------------------------------------


server = module_server("obs", "--max-inflight-sequences", "1")


class Prometheus:
    """A real Prometheus (Debian's binary) on a port of its own, started with `config` in `work`."""

    def __init__(self, work: Path, config: dict) -> None:
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = work / "prometheus.log"
        binary = tool("prometheus")

        def spawn(port: int) -> subprocess.Popen:
            with open(self.log, "wb") as out:
                return subprocess.Popen(
                    [
                        binary,
                        f"--config.file={work / 'prometheus.yml'}",
                        f"--storage.tsdb.path={work / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )

        def ready(port: int) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        self.proc, port = ports.launch(spawn, self.log, ready, timeout=60)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query, now or at the wall-clock time `at`."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        r = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=30)
        # A starting Prometheus answers 503 "Service Unavailable" (plain text) until its TSDB is open.
        assert r.status_code == 200, f"{expr}\nHTTP {r.status_code}: {r.text[:200]}"
        body = r.json()
        assert body["status"] == "success", f"{expr}\n{body}"
        return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    work = tmp_path_factory.mktemp("prometheus")
    (work / "rules.yml").write_text(yaml.safe_dump(rule_groups()))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yml")],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [server.url.removeprefix("http://")], "labels": TARGET_LABELS}
                ],
            }
        ],
    }
    prom = Prometheus(work, config)
    log = prom.log
    try:
        _wait(
            lambda: _safe(lambda: prom.query(f'up{{job="{JOB}"}} == 1')), 60, f"no scrape:\n{log.read_text()}"
        )
        _traffic(server)  # creates the series
        time.sleep(3)
        _traffic(server)  # moves them, so rates and quantiles have two samples to differ
        _wait(
            lambda: _safe(lambda: prom.query('increase(dsv2_http_requests_total{status="429"}[1m]) > 0')),
            30,
            "Prometheus never saw the second round",
        )
        time.sleep(2)
        yield prom
    finally:
        prom.stop()


def _safe(check):
    try:
        return check()
    except (httpx.HTTPError, AssertionError):
        return None


def _wait(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.5)


def _chat(server: Server, max_tokens: int, stream: bool) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def _traffic(server: Server) -> None:
    """A buffered and a streamed reply, then a 429: a long stream holds the one admission slot."""
    assert _chat(server, 8, stream=False).status_code == 200
    assert _chat(server, 8, stream=True).status_code == 200
    held = threading.Event()
    done: list[int] = []

    def long_stream() -> None:
        body = {
            "model": MODEL,
            "prompt": "Hello",
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=300) as r:
            for _ in r.iter_lines():
                held.set()
            done.append(r.status_code)

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert held.wait(60), "the long stream never started"
    refused = _chat(server, 4, stream=False)
    thread.join(300)
    assert refused.status_code == 429, refused.text
    assert done == [200]


@pytest.fixture(scope="module")
def scrape(server: Server, prometheus: Prometheus) -> str:
    return httpx.get(f"{server.url}/metrics").text


def _scraped_names(text: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


@pytest.mark.parametrize(
    "title,expr", dashboard_queries(), ids=[f"{t}-{n}" for n, (t, _) in enumerate(dashboard_queries())]
)
def test_dashboard_query_returns_data(prometheus: Prometheus, scrape: str, title: str, expr: str) -> None:
    result = prometheus.query(expr)
    assert result, f"{title}: no data for {expr}"
    values = [float(sample["value"][1]) for sample in result]
    assert any(math.isfinite(v) for v in values), f"{title}: only NaN/Inf: {result}"
    assert {r["metric"].get("model_name") for r in result} == {MODEL}, f"{title}: not per model: {result}"
    missing = metric_names(expr) - _scraped_names(scrape)
    assert not missing, f"{title}: {missing} not on /metrics"


@pytest.mark.parametrize("rule", alerts(GATEWAY_GROUP), ids=lambda r: r["alert"])
def test_alert_expression_evaluates(prometheus: Prometheus, scrape: str, rule: dict) -> None:
    """The gateway group's alerts (the others read kube-state-metrics and the endpoint picker: promtool above)."""
    prometheus.query(rule["expr"])  # parses and evaluates; empty while inactive is fine
    # A start-up grace looks back with `offset`, past this Prometheus' minute of history: measure it without.
    quantity = re.sub(r"\s+offset\s+\d+[smhd]", "", measured(rule["expr"]))
    result = prometheus.query(quantity)
    assert result, f"{rule['alert']}: its measured side has no data: {quantity}"
    assert all(math.isfinite(float(s["value"][1])) for s in result), result
    # `up` is the one series Prometheus writes itself for every scrape.
    missing = metric_names(rule["expr"]) - _scraped_names(scrape) - {"up"}
    assert not missing, f"{rule['alert']}: {missing} not on /metrics"


def test_rules_run_in_prometheus(prometheus: Prometheus) -> None:
    """Prometheus loaded and evaluated every rule without error; the 429 alert saw our refusals."""
    body = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=30).json()
    loaded = [rule for group in body["data"]["groups"] for rule in group["rules"]]
    assert {r["name"] for r in loaded} == {r["alert"] for r in alerts()}
    for rule in loaded:
        assert rule["health"] == "ok", rule
    by_name = {r["name"]: r for r in loaded}
    # 2 of the 8 API requests were refused: 25% > 10%, so the alert is pending (for: 10m) — not inactive.
    assert by_name["DSV2High429Rate"]["state"] in {"pending", "firing"}, by_name["DSV2High429Rate"]
    assert by_name["DSV2EngineDown"]["state"] == "inactive"


def test_every_metric_the_endpoint_picker_reads_is_scraped(scrape: str) -> None:
    """The picker's vLLM metric specs, as deployed, against a real scrape: present, gauges, labels it parses."""
    config = yaml.safe_load(PICKER_CONFIG.read_text())  # the file the component's configMapGenerator reads
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    (vllm,) = [e for e in extractor["parameters"]["engineConfigs"] if e["name"] == "vllm"]
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    for key, default in PICKER_VLLM_DEFAULTS.items():
        spec = vllm.get(key, default)
        if spec == "":
            # Disabled on purpose: the only one allowed is LoRA, which vLLM exports only when adapters are
            # served (--lora-modules; the picker would log a missing-metric error every scrape without them).
            # test_gateway_lora.py checks the metric and its labels on a server with adapters.
            assert key == "loraSpec" and default not in families, f"{key} disabled but {default} is exported"
            continue
        assert spec == default, f"{key}: {spec} differs from the picker's vLLM default {default}"
        assert spec in families, f"the endpoint picker reads {spec}; /metrics lacks it"
        family = families[spec]
        assert family.type == "gauge", f"{spec} is a {family.type}; the picker reads a gauge"
        for sample in family.samples:
            assert PICKER_LABELS.get(key, set()) <= set(sample.labels), f"{spec}: labels {sample.labels}"
            if key == "kvUsageSpec":
                assert 0 <= sample.value <= 1, "the picker reads KV-cache use as a fraction"
            if key == "cacheInfoSpec":
                assert int(sample.labels["block_size"]) > 0 and int(sample.labels["num_gpu_blocks"]) > 0
