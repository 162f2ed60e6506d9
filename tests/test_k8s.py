"""deploy/: every Kustomize variant renders, passes `kubernetes-validate --strict` for Kubernetes 1.29-1.33, and
agrees with the server it deploys (its CLI, its settings, its routes, vLLM's flags and metric names).

Offline. Needs kubectl (for `kubectl kustomize`) and kubernetes-validate, both installed by
`scripts/install-k8s-tools.sh`; set KUBECTL to use another kubectl (>= 1.27, kustomize v5).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]

# Custom resources: kubernetes-validate ships no schema for them (it would only warn), so they are
# kept out of its input and checked field by field in test_custom_resources_structure.
CRD_API_VERSIONS = {"ServiceMonitor": "monitoring.coreos.com/v1", "ScaledObject": "keda.sh/v1alpha1"}

# Overlay -> GPUs per pod it is meant to use (0 = CPU). The GPU count must also equal the overlay's own
# --tensor-parallel-size; this table catches an overlay that drifted from its purpose.
OVERLAYS = {"bf16": 1, "awq": 1, "tp2": 2, "cpu-demo": 0}
GPU_OVERLAYS = [name for name, gpus in OVERLAYS.items() if gpus]
# Each GPU overlay is also rendered with KEDA in place of the HPA and with the Ingress component on.
VARIANTS = [*OVERLAYS, *(f"{name}+keda+ingress" for name in GPU_OVERLAYS)]

# The gateway's endpoints as documented (docs/kubernetes.md, server/gateway): checked against the real
# app in test_gateway_routes_include_probe_paths when server.gateway.app.create_app exists.
GATEWAY_PATHS = {"/health", "/ready", "/metrics"}
GATEWAY_PORT = 8000

# vLLM's gauges the autoscalers use, as Prometheus names them.
VLLM_GAUGES = {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}

IMAGE_REPO = "ghcr.io/dsv2-serve/dsv2-serve"


# ---- rendering --------------------------------------------------------------------------------------------


def _kubectl() -> str:
    path = os.environ.get("KUBECTL") or str(ROOT / ".cache" / "k8s-tools" / "bin" / "kubectl")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"kubectl not found at {path}: run scripts/install-k8s-tools.sh (or set KUBECTL)")
    return path


def _kustomize(directory: Path) -> list[dict]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _swap_in_keda_and_ingress(tree: Path, overlay: str) -> Path:
    """Edit a copy of the overlay as docs/kubernetes.md tells users to: keda for hpa, ingress on."""
    path = tree / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    components = kustomization["components"]
    assert "../../components/hpa" in components, f"{overlay}: expected the hpa component by default"
    components[components.index("../../components/hpa")] = "../../components/keda"
    components.append("../../components/ingress")
    path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return path.parent


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = {name: _kustomize(DEPLOY / "overlays" / name) for name in OVERLAYS}
    tree = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(DEPLOY, tree)
    for name in GPU_OVERLAYS:
        out[f"{name}+keda+ingress"] = _kustomize(_swap_in_keda_and_ingress(tree, name))
    return out


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _maybe(docs: list[dict], kind: str) -> dict | None:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) <= 1, f"expected at most one {kind}, found {len(found)}"
    return found[0] if found else None


def _pod(docs: list[dict]) -> dict:
    return _one(docs, "Deployment")["spec"]["template"]


def _server(docs: list[dict]) -> dict:
    (server,) = [c for c in _pod(docs)["spec"]["containers"] if c["name"] == "server"]
    return server


def _all_containers(docs: list[dict]) -> list[dict]:
    spec = _pod(docs)["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _settings_env(docs: list[dict]) -> dict[str, str]:
    """The server's environment from the settings ConfigMap (envFrom) and the API-key Secret."""
    server = _server(docs)
    (ref,) = [e["configMapRef"]["name"] for e in server["envFrom"]]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert ref in configmaps, f"envFrom names ConfigMap {ref!r}, which the render does not contain"
    return dict(configmaps[ref]["data"])


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest, rendered: dict[str, list[dict]]) -> tuple[str, list[dict]]:
    return request.param, rendered[request.param]


def _overlay(name: str) -> str:
    return name.split("+")[0]


# ---- schema validation ------------------------------------------------------------------------------------


def _kubernetes_validate(path: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.fail("kubernetes-validate is not installed: run scripts/install-k8s-tools.sh")
    versions = [arg for v in K8S_VERSIONS for arg in ("-k", v)]
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *versions, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_kubernetes_validate_strict(variant: tuple[str, list[dict]], tmp_path: Path) -> None:
    name, docs = variant
    core = [d for d in docs if d["kind"] not in CRD_API_VERSIONS]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    proc = _kubernetes_validate(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A resource without a schema only warns: that must not pass silently.
    assert "WARN" not in proc.stdout and "ERROR" not in proc.stdout, proc.stdout
    passed = [line for line in proc.stdout.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(core) * len(K8S_VERSIONS), proc.stdout


def test_kubernetes_validate_strict_on_standalone_manifests(tmp_path: Path) -> None:
    for path in sorted((DEPLOY / "monitoring").glob("*.yaml")):
        proc = _kubernetes_validate(path)
        assert proc.returncode == 0 and "WARN" not in proc.stdout, proc.stdout + proc.stderr


def test_kubernetes_validate_rejects_bad_manifests(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    """The validator used above does fail: an unknown field and a wrong type in a real render."""
    deployment = copy.deepcopy(_one(rendered["bf16"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    path = tmp_path / "unknown-field.yaml"
    path.write_text(yaml.safe_dump(deployment))
    assert _kubernetes_validate(path).returncode != 0

    deployment = copy.deepcopy(_one(rendered["bf16"], "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "150"
    path = tmp_path / "wrong-type.yaml"
    path.write_text(yaml.safe_dump(deployment))
    assert _kubernetes_validate(path).returncode != 0


def test_custom_resources_structure(variant: tuple[str, list[dict]]) -> None:
    name, docs = variant
    for doc in docs:
        if doc["kind"] in CRD_API_VERSIONS:
            assert doc["apiVersion"] == CRD_API_VERSIONS[doc["kind"]]
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, sorted(doc)

    service = _one(docs, "Service")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    monitor = _maybe(docs, "ServiceMonitor")
    if OVERLAYS[_overlay(name)]:
        assert monitor is not None, "GPU variants ship a ServiceMonitor"
    if monitor is not None:
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
        selector = spec["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items(), "ServiceMonitor misses the Service"
        assert selector.get("app.kubernetes.io/instance"), (
            "ServiceMonitor would scrape every variant's Service"
        )
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert endpoint["port"] in service_ports
            assert endpoint["path"] == "/metrics"
            assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])

    scaled = _maybe(docs, "ScaledObject")
    assert (scaled is not None) == ("keda" in name)
    if scaled is not None:
        spec = scaled["spec"]
        deployment = _one(docs, "Deployment")
        assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert isinstance(spec["pollingInterval"], int) and isinstance(spec["cooldownPeriod"], int)
        assert spec["triggers"], "a ScaledObject needs triggers"
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            assert trigger.get("metricType", "AverageValue") in {"AverageValue", "Value", "Utilization"}
            meta = trigger["metadata"]
            assert {"serverAddress", "query", "threshold"} <= set(meta)
            assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
            assert re.fullmatch(r"https?://[^\s/]+(:\d+)?", meta["serverAddress"])
            float(meta["threshold"])


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", duration)
    assert m, duration
    return int(m[1]) * (60 if m[2] == "m" else 1)


# ---- the server it runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_parser():
    """vLLM's own engine-argument parser: where the server hands flags it does not know."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM layouts
        from vllm.utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


def _serve_parser():
    from server.__main__ import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return parser, subparsers.choices["serve"]


def _resolve_settings(docs: list[dict], monkeypatch: pytest.MonkeyPatch):
    """Settings exactly as the pod's `python -m server serve` would build them: its args and its env."""
    from server.settings import settings_from_args

    parser, _ = _serve_parser()
    for key in list(os.environ):
        if key.startswith("DSV2_"):
            monkeypatch.delenv(key)
    for key, value in _settings_env(docs).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DSV2_API_KEYS", "sk-test")  # from a Secret in the pod
    ns, extra = parser.parse_known_args(["serve", *_server(docs).get("args", [])])
    return settings_from_args(ns, extra), extra


def test_args_are_server_or_vllm_flags(variant: tuple[str, list[dict]], vllm_parser) -> None:
    _, docs = variant
    args = _server(docs).get("args", [])
    assert "command" not in _server(docs), "the image's ENTRYPOINT (python -m server serve) must stay"
    assert args, "every variant states its model arguments"
    parser, serve = _serve_parser()
    ours = set(serve._option_string_actions)
    theirs = set(vllm_parser._option_string_actions)
    flags = []
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"use --flag=value, one per item: {arg!r}"
        flags.append(arg.split("=", 1)[0])
        # Exact names only: argparse would also accept an abbreviation, vLLM's parser might not.
        assert flags[-1] in ours | theirs, f"{flags[-1]} is neither a server flag nor a vLLM engine flag"
    assert len(flags) == len(set(flags)), f"a flag is given twice: {flags}"

    ns, extra = parser.parse_known_args(["serve", *args])
    assert ns.command == "serve"
    assert all(f not in ours for f in (e.split("=", 1)[0] for e in extra))
    try:
        vllm_parser.parse_args(extra)
    except SystemExit as exc:  # argparse's way of rejecting
        pytest.fail(f"vLLM rejects {extra}: exit {exc.code}")


def test_settings_resolve(variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    name, docs = variant
    settings, _ = _resolve_settings(docs, monkeypatch)
    assert settings.host == "0.0.0.0", "the Service cannot reach a server on 127.0.0.1"
    assert settings.api_keys == ["sk-test"], "DSV2_API_KEYS comes from the Secret"
    env = _server(docs)["env"]
    (api_keys,) = [e for e in env if e["name"] == "DSV2_API_KEYS"]
    assert "secretKeyRef" in api_keys["valueFrom"] and not api_keys["valueFrom"]["secretKeyRef"].get(
        "optional"
    )
    assert not any(k.startswith("DSV2_API_KEY") for k in _settings_env(docs)), "keys belong in the Secret"
    if _overlay(name) == "awq":
        assert settings.quantization == "awq"


def test_gpu_count_equals_tensor_parallel_size(
    variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, docs = variant
    settings, _ = _resolve_settings(docs, monkeypatch)
    resources = _server(docs)["resources"]
    limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    request = int(resources.get("requests", {}).get("nvidia.com/gpu", limit))
    assert limit == request == OVERLAYS[_overlay(name)]
    if limit:
        assert settings.tensor_parallel_size * settings.pipeline_parallel_size == limit
        spec = _pod(docs)["spec"]
        assert spec["nodeSelector"], "GPU pods are placed on GPU nodes"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    else:
        assert settings.tensor_parallel_size == 1
        assert _server(docs)["image"].endswith("-cpu"), "the CPU variant runs the CPU image"
        assert "nodeSelector" not in _pod(docs)["spec"]
    for container in _all_containers(docs):
        if container["name"] != "server":
            assert "nvidia.com/gpu" not in str(container.get("resources")), "only the server holds GPUs"


def test_probes_and_port_match_gateway(
    variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, docs = variant
    settings, _ = _resolve_settings(docs, monkeypatch)
    server = _server(docs)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": GATEWAY_PORT} and settings.port == GATEWAY_PORT
    probes = {kind: server[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready", "readiness must prove generation and fail on drain"
    assert probes["livenessProbe"]["path"] == "/health", "liveness must not restart a merely busy engine"
    assert probes["startupProbe"]["path"] == "/health"
    for probe in probes.values():
        assert probe["path"] in GATEWAY_PATHS
        assert probe["port"] == "http"
    startup = server["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= (1200 if _server(docs)["resources"]["limits"].get("nvidia.com/gpu") else 120), budget


def test_gateway_routes_include_probe_paths() -> None:
    try:
        from server.gateway.app import create_app
    except ImportError as exc:
        pytest.skip(
            f"server.gateway.app.create_app not importable yet ({exc}); documented paths checked instead"
        )
    from server.settings import Settings

    app = create_app(Settings(model="/nonexistent/model"))  # routes only; the engine starts in the lifespan
    paths = {getattr(route, "path", None) for route in app.routes}
    assert GATEWAY_PATHS <= paths, f"probe/metrics paths missing from the app: {GATEWAY_PATHS - paths}"


def test_termination_outlasts_drain(variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    _, docs = variant
    settings, _ = _resolve_settings(docs, monkeypatch)
    spec = _pod(docs)["spec"]
    command = _server(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert pre_stop >= 5, "endpoints need a few seconds to stop routing to a terminating pod"
    assert settings.drain_timeout >= 60, "streams of a few thousand tokens need a minute or more"
    assert spec["terminationGracePeriodSeconds"] > pre_stop + settings.drain_timeout


def test_security_context(variant: tuple[str, list[dict]]) -> None:
    _, docs = variant
    spec = _pod(docs)["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostIPC") and not spec.get("hostPID")
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in _all_containers(docs):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert not sc.get("privileged"), container["name"]
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{container['name']}: a read-only root needs a writable /tmp"
        for mount in mounts.values():
            volume = volumes[mount["name"]]
            assert "hostPath" not in volume
    server_mounts = {m["mountPath"]: m for m in _server(docs)["volumeMounts"]}
    assert volumes[server_mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in _server(docs)["env"]}
    assert env["HOME"] in server_mounts and not server_mounts[env["HOME"]].get("readOnly")
    if "/models" in server_mounts:
        assert server_mounts["/models"]["readOnly"] is True, "the server only reads the weights"


def test_resources_sized(variant: tuple[str, list[dict]]) -> None:
    _, docs = variant
    spec = _pod(docs)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in _all_containers(docs):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]
        assert _bytes(resources["requests"]["memory"]) <= _bytes(resources["limits"]["memory"])
    # /dev/shm (RAM-backed) counts against the memory limit: it must leave room for the process itself.
    shm = _bytes(volumes["dshm"]["emptyDir"]["sizeLimit"])
    assert shm <= _bytes(_server(docs)["resources"]["limits"]["memory"]) // 4


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(quantity))
    assert m, quantity
    return int(m[1]) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m[2]]


def test_images_pinned(rendered: dict[str, list[dict]]) -> None:
    tags = {}
    for name, docs in rendered.items():
        for container in _all_containers(docs):
            image = container["image"]
            repo, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (repo == IMAGE_REPO and tag and tag != "latest"), image
            assert container["imagePullPolicy"] == "IfNotPresent"
            tags.setdefault(_overlay(name), set()).add(tag)
    assert all(len(t) == 1 for t in tags.values()), f"one image version per variant: {tags}"
    versions = {tag.removesuffix("-cpu") for t in tags.values() for tag in t}
    assert len(versions) == 1, f"all variants deploy the same release: {versions}"
    assert tags["cpu-demo"] == {f"{versions.pop()}-cpu"}, "the CPU image is the release tag + '-cpu'"


# ---- wiring between resources -----------------------------------------------------------------------------


def test_selectors_select_the_pods(variant: tuple[str, list[dict]]) -> None:
    name, docs = variant
    deployment = _one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    instance = labels["app.kubernetes.io/instance"]
    assert instance == f"dsv2-serve-{_overlay(name)}"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == instance

    service = _one(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in _server(docs)["ports"]}

    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"].get("maxUnavailable", 0) >= 1, "a one-replica deployment must stay drainable"

    policy = _one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    for rule in policy["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= {"http", GATEWAY_PORT}
        for peer in rule["from"]:
            # kustomize adds selector labels to podSelectors in rules: only the empty one (all pods of the
            # namespace) is safe from that.
            assert peer.get("podSelector", {}) == {}, peer

    account = _one(docs, "ServiceAccount")
    assert _pod(docs)["spec"]["serviceAccountName"] == account["metadata"]["name"]

    # A replica count in the manifest would be re-applied over the autoscaler's (or kubectl scale's).
    assert "replicas" not in deployment["spec"]

    hpa = _maybe(docs, "HorizontalPodAutoscaler")
    assert (hpa is not None) == (OVERLAYS[_overlay(name)] > 0 and "keda" not in name), (
        "exactly one autoscaler"
    )
    if hpa is not None:
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]

    ingress = _maybe(docs, "Ingress")
    assert (ingress is not None) == ("ingress" in name)
    if ingress is not None:
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["path"] == "/v1", "only the API goes public; probes and metrics stay inside"
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_ingress_streams_unbuffered(rendered: dict[str, list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered["bf16+keda+ingress"]
    settings, _ = _resolve_settings(docs, monkeypatch)
    notes = _one(docs, "Ingress")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-request-buffering"] == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) >= 600
    assert int(notes[prefix + "proxy-send-timeout"]) >= 600
    assert _bytes(notes[prefix + "proxy-body-size"].replace("m", "Mi")) == settings.max_request_bytes


def test_autoscalers_use_vllm_gauges_through_the_adapter(rendered: dict[str, list[dict]]) -> None:
    from vllm.v1.metrics import loggers

    source = inspect.getsource(loggers)
    for gauge in VLLM_GAUGES:
        assert f'"{gauge}"' in source, f"vLLM no longer exports {gauge}"

    adapter = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-config.yaml").read_text())
    published = {}
    for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]:
        series = re.match(r"'?([a-z_:]+)\{", rule["seriesQuery"])[1]
        name = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }, "HPA Pods metrics need series mapped to namespace and pod"
        published[name] = series
    assert set(published.values()) == VLLM_GAUGES

    for name in GPU_OVERLAYS:
        hpa = _one(rendered[name], "HorizontalPodAutoscaler")
        metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        assert metrics == set(published), f"{name}: HPA metrics not published by the adapter rules"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

        docs = rendered[f"{name}+keda+ingress"]
        service = _one(docs, "Service")["metadata"]["name"]
        queried = set()
        for trigger in _one(docs, "ScaledObject")["spec"]["triggers"]:
            query = trigger["metadata"]["query"]
            quoted = re.findall(r'"([^"]*)"', query)
            assert quoted and quoted[0] == service, f"{name}: KEDA query not scoped to this variant: {query}"
            queried |= set(re.findall(r"vllm:[a-z_]+", query))
        assert queried == VLLM_GAUGES


def test_model_download_fills_the_model_directory(
    variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Run the init container's script with a stand-in huggingface_hub: it must write where --model reads."""
    name, docs = variant
    settings, _ = _resolve_settings(docs, monkeypatch)
    init = {c["name"]: c for c in _pod(docs)["spec"].get("initContainers", [])}
    if not OVERLAYS[_overlay(name)]:
        assert not init and not any(d["kind"] == "PersistentVolumeClaim" for d in docs)
        return
    download = init["download-model"]
    assert download["command"] == ["python", "-c"]

    configmap = _settings_env(docs)
    env = {}
    for item in download["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "configMapKeyRef" in item["valueFrom"]:
            env[item["name"]] = configmap[item["valueFrom"]["configMapKeyRef"]["key"]]
    calls = []
    fake_hub = type(sys)("huggingface_hub")
    fake_hub.snapshot_download = lambda **kwargs: calls.append(kwargs) or kwargs["local_dir"]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    exec(compile(download["args"][0], "download-model", "exec"), {})

    (call,) = calls
    assert (
        call["repo_id"] == configmap["HF_MODEL_REPO"] and call["revision"] == configmap["HF_MODEL_REVISION"]
    )
    assert call["local_dir"] == settings.model, "--model must be the directory the init container fills"
    assert "*.safetensors" in call["allow_patterns"] and "*.json" in call["allow_patterns"]

    # Same volume, same path, in both containers; the volume is the PVC.
    init_mount = {m["name"]: m["mountPath"] for m in download["volumeMounts"]}
    server_mount = {m["name"]: m["mountPath"] for m in _server(docs)["volumeMounts"]}
    assert init_mount["models"] == server_mount["models"] == env["MODEL_ROOT"]
    (claim,) = [v for v in _pod(docs)["spec"]["volumes"] if v["name"] == "models"]
    assert set(claim) == {"name", "persistentVolumeClaim"}
    assert (
        claim["persistentVolumeClaim"]["claimName"] == _one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    )
    token = [e for e in download["env"] if e["name"] == "HF_TOKEN"][0]["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True, "public models need no token"
    assert {e["name"]: e.get("value") for e in _server(docs)["env"]}["HF_HUB_OFFLINE"] == "1"


def test_cpu_demo_serves_the_checkpoint_baked_into_the_image(
    rendered: dict[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    dockerfile = ROOT / "docker" / "Dockerfile.cpu"
    if not dockerfile.exists():
        pytest.skip("docker/Dockerfile.cpu not in this checkout")
    settings, _ = _resolve_settings(rendered["cpu-demo"], monkeypatch)
    built = re.search(r"python -m server tiny-model (\S+)", dockerfile.read_text())
    assert built, "Dockerfile.cpu no longer builds a tiny checkpoint"
    assert settings.model == built[1]
    assert settings.kv_cache_space_gib is not None


def _doc_leaderworkerset() -> dict:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: LeaderWorkerSet" in b]
    assert len(blocks) == 1, "docs/kubernetes.md: one LeaderWorkerSet example"
    return yaml.safe_load(blocks[0])


def test_multinode_example_is_valid(tmp_path: Path, vllm_parser, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented 236B LeaderWorkerSet: valid pod templates, arguments both parsers accept, GPUs = TP."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    lws = _doc_leaderworkerset()
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    template = lws["spec"]["leaderWorkerTemplate"]
    nodes = template["size"]

    # Each pod template, as a Pod, against the Kubernetes schemas.
    pods = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role}, "spec": template[role]["spec"]}
        for role in ("leaderTemplate", "workerTemplate")
    ]
    path = tmp_path / "lws-pods.yaml"
    path.write_text(yaml.safe_dump_all(pods))
    proc = _kubernetes_validate(path)
    assert proc.returncode == 0 and "WARN" not in proc.stdout, proc.stdout

    def expand(args: list[str], index: int) -> list[str]:  # what the kubelet does with LWS's env variables
        env = {"LWS_LEADER_ADDRESS": "dsv2-serve-236b-0.dsv2-serve-236b", "LWS_WORKER_INDEX": str(index)}
        return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args]

    from server.settings import settings_from_args

    for key in list(os.environ):
        if key.startswith("DSV2_"):
            monkeypatch.delenv(key)
    (leader,) = template["leaderTemplate"]["spec"]["containers"]
    parser, _ = _serve_parser()
    ours = set(_serve_parser()[1]._option_string_actions) | set(vllm_parser._option_string_actions)
    for arg in leader["args"]:
        assert arg.split("=", 1)[0] in ours, f"leader: {arg} is neither a server nor a vLLM flag (exactly)"
    ns, extra = parser.parse_known_args(["serve", *expand(leader["args"], 0)])
    settings = settings_from_args(ns, extra)
    engine = vllm_parser.parse_args(extra)
    assert (
        engine.nnodes == nodes and engine.node_rank == 0 and engine.master_addr.startswith("dsv2-serve-236b")
    )
    gpus = int(leader["resources"]["limits"]["nvidia.com/gpu"])
    assert settings.tensor_parallel_size * settings.pipeline_parallel_size == gpus * nodes

    (worker,) = template["workerTemplate"]["spec"]["containers"]
    assert worker["command"] == ["vllm", "serve"]
    top = type(vllm_parser)()
    serve = ServeSubcommand().subparser_init(top.add_subparsers())
    for arg in worker["args"][1:]:  # after the positional model
        flag = arg.split("=", 1)[0]
        assert flag in serve._option_string_actions, f"worker: {flag} is not a `vllm serve` flag (exactly)"
    w = top.parse_args(["serve", *expand(worker["args"], 1)])
    assert w.headless and w.model_tag == settings.model and w.node_rank == 1 and w.nnodes == nodes
    assert (w.tensor_parallel_size, w.pipeline_parallel_size) == (
        settings.tensor_parallel_size,
        settings.pipeline_parallel_size,
    )
    assert w.max_model_len == settings.max_model_len
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == gpus


# ---- house style ------------------------------------------------------------------------------------------


def _deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def test_one_resource_per_file() -> None:
    for path in _deploy_files():
        if path.suffix != ".yaml" or path.name in {"kustomization.yaml", "kustomizeconfig.yaml"}:
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1 and "kind" in docs[0], f"{path.relative_to(ROOT)}: one resource per file"


def test_every_file_and_setting_commented() -> None:
    for path in _deploy_files():
        lines = path.read_text().splitlines()
        assert lines and lines[0].startswith("#"), (
            f"{path.relative_to(ROOT)}: start with what the file is for"
        )
        if path.suffix == ".env":
            for i, line in enumerate(lines):
                if line and not line.startswith("#"):
                    assert lines[i - 1].startswith("#"), f"{path.relative_to(ROOT)}:{i + 1}: comment {line!r}"


def test_docs_cover_every_overlay_and_component() -> None:
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for kind in ("overlays", "components"):
        for path in sorted((DEPLOY / kind).iterdir()):
            assert f"{kind}/{path.name}" in docs, f"docs/kubernetes.md does not mention {kind}/{path.name}"
    assert "LeaderWorkerSet" in docs
