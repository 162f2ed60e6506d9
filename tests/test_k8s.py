"""deploy/: every Kustomize variant renders, passes `kubernetes-validate --strict` for Kubernetes 1.29-1.33, its
custom resources validate against their CRDs' schemas, and it agrees with the server it deploys (its CLI, its
settings, its routes and readiness, vLLM's flags and metric names).

Offline. Needs kubectl (for `kubectl kustomize`) and kubernetes-validate, both installed by
`scripts/install-k8s-tools.sh`; set KUBECTL to use another kubectl (>= 1.27, kustomize v5). The CRDs come from
../shared/k8s-crds (upstream files, see its README); those checks skip, saying why, where it is absent, and fail
under CI=true (scripts/fetch-references.sh fetches them at pinned commits).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]

# Custom resources: kubernetes-validate ships no schema for them (it would only warn), so they are kept out
# of its input, validated against their CRDs (test_custom_resources_match_their_crds) and checked field by
# field for their wiring.
CRD_API_VERSIONS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "InferencePool": "inference.networking.k8s.io/v1",
}
CRDS = ROOT.parent / "shared" / "k8s-crds"
# Custom resources whose CRDs ../shared/k8s-crds does not hold (Istio's, GKE's): checked against the structural
# schemas below, written from the upstream CRDs' fields (istio/api networking/v1 DestinationRule; GKE's
# networking.gke.io/v1 HealthCheckPolicy and GCPBackendPolicy, cloud.google.com/kubernetes-engine "Configure
# Gateway resources using Policies"), unknown fields rejected.
STRUCTURAL_ONLY = {
    "DestinationRule": "networking.istio.io/v1",
    "HealthCheckPolicy": "networking.gke.io/v1",
    "GCPBackendPolicy": "networking.gke.io/v1",
}

# Overlay -> GPUs per pod it is meant to use (0 = CPU). The GPU count must also equal the overlay's own
# --tensor-parallel-size; this table catches an overlay that drifted from its purpose.
OVERLAYS = {"bf16": 1, "awq": 1, "tp2": 2, "cpu-demo": 0}
GPU_OVERLAYS = [name for name, gpus in OVERLAYS.items() if gpus]
# Each GPU overlay is also rendered with the other documented component choices: KEDA in place of the HPA
# with the Ingress on; LLM-aware routing (inference-pool), alone and with its Istio or GKE component; the plain
# Gateway API route (httproute); named keys with their limits in the shared store (rate-limit-redis).
EXTRAS = [
    "keda+ingress",
    "inference",
    "inference+istio",
    "inference+gke",
    "httproute",
    "named-keys+rate-limit-redis",
]
VARIANTS = [*OVERLAYS, *(f"{name}+{extra}" for extra in EXTRAS for name in GPU_OVERLAYS)]

# The endpoint picker release the inference-pool component pins (its InferencePool v1 API is the CRD's).
EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"

# The rate-limit-redis component: its pods' name label, the official images it may run (Valkey's, or Redis'),
# the Secret the server's store URL and the store's password come from, and the store's port.
STORE_NAME = "dsv2-serve-redis"
STORE_IMAGES = {"docker.io/valkey/valkey", "docker.io/library/redis"}
STORE_SECRET = "dsv2-serve-rate-limit-store"
STORE_PORT = 6379
# Eviction policies under which a full store drops counters instead of failing the server's writes.
STORE_EVICTION = {"allkeys-lru", "allkeys-lfu", "volatile-ttl", "volatile-lru", "volatile-lfu"}
# What one gateway (front-end) process costs beside the engine (docs/kubernetes.md, "Scale-out"): about a core at
# full streaming rate, and host memory for Python, vLLM's imports and its own tokenizer.
FRONT_END_MEMORY = 2**30

# The gateway's endpoints as documented (docs/kubernetes.md, server/gateway): checked against the real
# app in test_gateway_routes_include_probe_paths when server.gateway.app.create_app exists.
GATEWAY_PATHS = {"/health", "/ready", "/metrics"}
GATEWAY_PORT = 8000

# vLLM's gauges the autoscalers use, as Prometheus names them.
VLLM_GAUGES = {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
# The gateway's admission budget in use and its size (server/gateway/metrics.py), and the custom metric the
# Prometheus Adapter publishes from their ratio.
GATEWAY_IN_FLIGHT = "dsv2_sequences_in_flight"
GATEWAY_LIMIT = "dsv2_inflight_sequences_limit"
UTILIZATION_METRIC = "dsv2_inflight_sequences_utilization"

IMAGE_REPO = "ghcr.io/dsv2-serve/dsv2-serve"

# What a first start of a GPU variant must fit in its start-up probe: DeepSeek-V2-Lite-Chat's bf16 safetensors
# (~31.4 GB; the AWQ export is ~10 GB) and, after them, loading, torch.compile and CUDA-graph capture.
BF16_WEIGHTS_BYTES = 32e9
LOAD_SECONDS = 900


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


def _edit_components(tree: Path, overlay: str, extra: str) -> Path:
    """Edit a copy of the overlay as docs/kubernetes.md tells users to: keda for hpa, or a routing component on."""
    path = tree / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    components = kustomization["components"]
    assert "../../components/hpa" in components, f"{overlay}: expected the hpa component by default"
    if extra == "keda+ingress":
        components[components.index("../../components/hpa")] = "../../components/keda"
        components.append("../../components/ingress")
    elif extra == "httproute":
        components.append("../../components/httproute")
    elif extra == "named-keys+rate-limit-redis":
        components += ["../../components/named-keys", "../../components/rate-limit-redis"]
    else:  # inference, inference+istio, inference+gke: the provider's component after the pool's
        components.append("../../components/inference-pool")
        components += [f"../../components/{provider}" for provider in extra.split("+")[1:]]
    path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return path.parent


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = {name: _kustomize(DEPLOY / "overlays" / name) for name in OVERLAYS}
    for extra in EXTRAS:
        tree = tmp_path_factory.mktemp("deploy") / "deploy"
        shutil.copytree(DEPLOY, tree)
        for name in GPU_OVERLAYS:
            out[f"{name}+{extra}"] = _kustomize(_edit_components(tree, name, extra))
    return out


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _maybe(docs: list[dict], kind: str) -> dict | None:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) <= 1, f"expected at most one {kind}, found {len(found)}"
    return found[0] if found else None


def _mine(docs: list[dict], kind: str) -> dict:
    """The server's resource of `kind` (app.kubernetes.io/name dsv2-serve), beside the endpoint picker's."""
    return _one(
        [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "dsv2-serve"],
        kind,
    )


def _pod(docs: list[dict]) -> dict:
    return _mine(docs, "Deployment")["spec"]["template"]


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


def _container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """A container's own `env` as the kubelet resolves it: values, and ConfigMap keys (Secrets left out)."""
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = configmaps[ref["name"]][ref["key"]]
    return env


def _server_policy(docs: list[dict]) -> dict:
    """The server's own NetworkPolicy (named as its Deployment), beside the picker's and the gke component's."""
    name = _mine(docs, "Deployment")["metadata"]["name"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name]
    return policy


def _store(docs: list[dict], kind: str = "Deployment") -> dict | None:
    """The rate-limit store's resource of `kind` (rate-limit-redis component), None without the component."""
    return _maybe(
        [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == STORE_NAME], kind
    )


def _env_item(container: dict, name: str) -> dict | None:
    found = [e for e in container.get("env", []) if e["name"] == name]
    assert len(found) <= 1, f"{container['name']}: {name} given twice"
    return found[0] if found else None


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
    core = [d for d in docs if d["kind"] not in CRD_API_VERSIONS | STRUCTURAL_ONLY]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    proc = _kubernetes_validate(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A resource without a schema only warns: that must not pass silently.
    assert "WARN" not in proc.stdout and "ERROR" not in proc.stdout, proc.stdout
    passed = [line for line in proc.stdout.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == len(core) * len(K8S_VERSIONS), proc.stdout


def test_kubernetes_validate_strict_on_monitoring(tmp_path: Path) -> None:
    """deploy/monitoring: the adapter's ConfigMap (applied on its own) and the kustomization's built-in resources."""
    proc = _kubernetes_validate(DEPLOY / "monitoring" / "prometheus-adapter-config.yaml")
    assert proc.returncode == 0 and "WARN" not in proc.stdout, proc.stdout + proc.stderr
    core = [d for d in _kustomize(DEPLOY / "monitoring") if d["kind"] not in CRD_API_VERSIONS]
    assert [d["kind"] for d in core] == ["ConfigMap"]
    path = tmp_path / "monitoring.yaml"
    path.write_text(yaml.safe_dump_all(core))
    proc = _kubernetes_validate(path)
    assert proc.returncode == 0 and "WARN" not in proc.stdout, proc.stdout + proc.stderr


# ---- custom resources against their CRDs ------------------------------------------------------------------


def _structural(schema: dict, strict: bool = True) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema with the API server's rules: unknown fields are errors (kubectl's
    default field validation is Strict) unless x-kubernetes-preserve-unknown-fields; int-or-string and
    nullable as declared. Branches of anyOf/allOf/oneOf/not only add constraints, so they stay open."""
    out = dict(schema)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: _structural(v) for k, v in out["properties"].items()}
        if (
            strict
            and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out
        ):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"])
    if "items" in out:
        out["items"] = _structural(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_structural(branch, strict=False) for branch in out[key]]
    if "not" in out:
        out["not"] = _structural(out["not"], strict=False)
    return out


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every CRD in ../shared/k8s-crds."""
    if not CRDS.is_dir():
        message = (
            f"{CRDS} is absent (scripts/fetch-references.sh fetches it): custom resources not schema-checked"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"] and not version.get("deprecated"):
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def _with_defaults(schema: dict, value: object) -> object:
    """The object as the API server sees it before validation: every schema default filled in."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _with_defaults(sub, value[key])
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                _with_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _with_defaults(schema["items"], item)
    return value


def _cel_errors(schema: dict, value: object, path: str = "") -> list[str]:
    """The CRD's CEL rules (x-kubernetes-validations) at every node of the object, evaluated with cel-python.
    Transition rules (oldSelf) need a previous object and are left to the API server."""
    import celpy
    from celpy import celtypes

    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        result = _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        if result != celtypes.BoolType(True):
            errors.append(f"{path or '.'}: {rule.get('message', rule['rule'])} ({result!r})")
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                errors += _cel_errors(sub, item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for n, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, f"{path}[{n}]")
    return errors


@functools.cache
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _crd_errors(doc: dict, schemas: dict[tuple[str, str], dict]) -> list[str]:
    from jsonschema import Draft7Validator

    key = (doc["apiVersion"], doc["kind"])
    assert key in schemas, f"no served, non-deprecated CRD version for {key} in {CRDS}"
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    errors = [
        f"{name} {'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in Draft7Validator(_structural(schemas[key])).iter_errors(doc)
    ]
    if errors:  # CEL rules assume a structurally valid object
        return errors
    return [
        f"{name} {e}" for e in _cel_errors(schemas[key], _with_defaults(schemas[key], copy.deepcopy(doc)))
    ]


def test_custom_resources_match_their_crds(variant: tuple[str, list[dict]], crd_schemas: dict) -> None:
    """Every custom resource of the render against its CRD's schema: fields, types, enums, patterns, required
    fields, unknown fields, and the CEL rules (with the schema's defaults applied first, as the API server does)."""
    _, docs = variant
    custom = [d for d in docs if d["kind"] in CRD_API_VERSIONS]
    for doc in custom:
        assert doc["apiVersion"] == CRD_API_VERSIONS[doc["kind"]], doc["apiVersion"]
        assert not _crd_errors(doc, crd_schemas), _crd_errors(doc, crd_schemas)


def test_monitoring_custom_resources_match_their_crds(crd_schemas: dict) -> None:
    custom = [d for d in _kustomize(DEPLOY / "monitoring") if d["kind"] in CRD_API_VERSIONS]
    assert [d["kind"] for d in custom] == ["PrometheusRule"]
    assert not _crd_errors(custom[0], crd_schemas), _crd_errors(custom[0], crd_schemas)


def test_crd_validation_rejects_bad_custom_resources(
    rendered: dict[str, list[dict]], crd_schemas: dict
) -> None:
    """The check above can fail: an unknown field, a wrong type and a bad enum value in real renders."""
    pool = copy.deepcopy(_one(rendered["bf16+inference"], "InferencePool"))
    assert not _crd_errors(pool, crd_schemas)
    pool["spec"]["targetPorts"][0]["number"] = "8000"
    assert _crd_errors(pool, crd_schemas)
    pool = copy.deepcopy(_one(rendered["bf16+inference"], "InferencePool"))
    pool["spec"]["endpointPickerRef"]["failureMode"] = "FailSoft"
    assert _crd_errors(pool, crd_schemas)
    monitor = copy.deepcopy(_one(rendered["bf16"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "15s"  # the field is `interval`
    assert _crd_errors(monitor, crd_schemas)
    route = copy.deepcopy(_one(rendered["bf16+httproute"], "HTTPRoute"))
    route["spec"]["rules"][0]["timeouts"]["request"] = "one hour"
    assert _crd_errors(route, crd_schemas)
    # CEL rules: unique pool ports, absolute route paths, a backend timeout within the request timeout.
    pool = copy.deepcopy(_one(rendered["bf16+inference"], "InferencePool"))
    pool["spec"]["targetPorts"].append({"number": GATEWAY_PORT})
    assert any("port number must be unique" in e for e in _crd_errors(pool, crd_schemas))
    route = copy.deepcopy(_one(rendered["bf16+inference"], "HTTPRoute"))
    route["spec"]["rules"][0]["matches"][0]["path"]["value"] = "v1"
    assert any("absolute path" in e for e in _crd_errors(route, crd_schemas))
    route = copy.deepcopy(_one(rendered["bf16+httproute"], "HTTPRoute"))
    route["spec"]["rules"][0]["timeouts"]["backendRequest"] = "2h"
    assert _crd_errors(route, crd_schemas)


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


# ---- Istio's and GKE's resources (their CRDs are not in ../shared/k8s-crds) --------------------------------


def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """A closed object: these fields only (the API server's strict field validation), the required ones present."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_TARGET_REF = _obj({"group": _STR, "kind": _STR, "name": _STR, "namespace": _STR}, ("group", "kind", "name"))
_PORT_SPEC = {"enum": ["USE_FIXED_PORT", "USE_NAMED_PORT", "USE_SERVING_PORT"]}
_HTTP_CHECK = _obj(
    {
        "host": _STR,
        "port": {**_INT, "minimum": 1, "maximum": 65535},
        "portName": _STR,
        "portSpecification": _PORT_SPEC,
        "proxyHeader": {"enum": ["NONE", "PROXY_V1"]},
        "requestPath": {**_STR, "pattern": "^/"},
        "response": _STR,
    }
)
_METADATA = {
    "type": "object"
}  # kubernetes-validate checks ObjectMeta on the built-in kinds; names here are kustomize's
STRUCTURAL_SCHEMAS = {
    # networking.gke.io/v1 HealthCheckPolicy (spec.default: BackendService health-check settings).
    "HealthCheckPolicy": _obj(
        {
            "apiVersion": {"const": "networking.gke.io/v1"},
            "kind": {"const": "HealthCheckPolicy"},
            "metadata": _METADATA,
            "spec": _obj(
                {
                    "targetRef": _TARGET_REF,
                    "default": _obj(
                        {
                            "checkIntervalSec": {**_INT, "minimum": 1, "maximum": 300},
                            "timeoutSec": {**_INT, "minimum": 1, "maximum": 300},
                            "healthyThreshold": {**_INT, "minimum": 1, "maximum": 10},
                            "unhealthyThreshold": {**_INT, "minimum": 1, "maximum": 10},
                            "logConfig": _obj({"enabled": _BOOL}),
                            "config": {
                                **_obj(
                                    {
                                        "type": {"enum": ["TCP", "HTTP", "HTTPS", "HTTP2", "GRPC"]},
                                        "httpHealthCheck": _HTTP_CHECK,
                                        "httpsHealthCheck": _HTTP_CHECK,
                                        "http2HealthCheck": _HTTP_CHECK,
                                    },
                                    ("type",),
                                ),
                                "minProperties": 2,
                            },
                        }
                    ),
                },
                ("targetRef",),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    # networking.gke.io/v1 GCPBackendPolicy (spec.default: BackendService settings).
    "GCPBackendPolicy": _obj(
        {
            "apiVersion": {"const": "networking.gke.io/v1"},
            "kind": {"const": "GCPBackendPolicy"},
            "metadata": _METADATA,
            "spec": _obj(
                {
                    "targetRef": _TARGET_REF,
                    "default": _obj(
                        {
                            "timeoutSec": {**_INT, "minimum": 1},
                            "connectionDraining": _obj(
                                {"drainingTimeoutSec": {**_INT, "minimum": 0, "maximum": 3600}}
                            ),
                            "logging": _obj(
                                {"enabled": _BOOL, "sampleRate": {**_INT, "minimum": 0, "maximum": 1000000}}
                            ),
                            "maxRatePerEndpoint": _INT,
                            "securityPolicy": _STR,
                            "backendPreference": {"enum": ["DEFAULT", "PREFERRED"]},
                            "sessionAffinity": {"type": "object"},
                            "iap": {"type": "object"},
                        }
                    ),
                },
                ("targetRef",),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
    # networking.istio.io/v1 DestinationRule (the part a TLS origination uses).
    "DestinationRule": _obj(
        {
            "apiVersion": {"const": "networking.istio.io/v1"},
            "kind": {"const": "DestinationRule"},
            "metadata": _METADATA,
            "spec": _obj(
                {
                    "host": _STR,
                    "exportTo": {"type": "array", "items": _STR},
                    "trafficPolicy": _obj(
                        {
                            "tls": _obj(
                                {
                                    "mode": {"enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]},
                                    "insecureSkipVerify": _BOOL,
                                    "sni": _STR,
                                    "caCertificates": _STR,
                                    "credentialName": _STR,
                                    "subjectAltNames": {"type": "array", "items": _STR},
                                }
                            ),
                            "connectionPool": {"type": "object"},
                        }
                    ),
                },
                ("host",),
            ),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    ),
}


def _structural_errors(doc: dict) -> list[str]:
    from jsonschema import Draft7Validator

    name = f"{doc['kind']}/{doc['metadata']['name']}"
    return [
        f"{name} {'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in Draft7Validator(STRUCTURAL_SCHEMAS[doc["kind"]]).iter_errors(doc)
    ]


def test_istio_and_gke_resources(variant: tuple[str, list[dict]]) -> None:
    """The istio and gke components: their resources against the structural schemas, and their wiring: TLS to the
    picker's own Service, health checks on the server's /ready port, stream-long backend timeouts on GKE (which
    rejects HTTPRoute timeouts), and the load balancers' ranges admitted to exactly the ports they call."""
    name, docs = variant
    for doc in docs:
        if doc["kind"] in STRUCTURAL_ONLY:
            assert doc["apiVersion"] == STRUCTURAL_ONLY[doc["kind"]]
            assert not _structural_errors(doc), _structural_errors(doc)
    rules = [d for d in docs if d["kind"] == "DestinationRule"]
    assert bool(rules) == name.endswith("+istio")
    for rule in rules:
        picker = _one(
            [d for d in docs if d["kind"] == "Service" and "epp" in d["metadata"]["name"]], "Service"
        )
        assert rule["spec"]["host"] == picker["metadata"]["name"], "the rule names the picker's Service"
        assert rule["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}

    policies = [d for d in docs if d["kind"] in {"HealthCheckPolicy", "GCPBackendPolicy"}]
    assert bool(policies) == name.endswith("+gke")
    if not policies:
        return
    route = _one(docs, "HTTPRoute")
    backends = {(b.get("group", ""), b.get("kind", "Service"), b["name"]) for r in route["spec"]["rules"] for b in r["backendRefs"]}  # fmt: skip
    for kind in ("HealthCheckPolicy", "GCPBackendPolicy"):
        targeted = {(p["spec"]["targetRef"]["group"], p["spec"]["targetRef"]["kind"], p["spec"]["targetRef"]["name"]) for p in policies if p["kind"] == kind}  # fmt: skip
        assert targeted == backends, f"one {kind} per backend of the route: {targeted} != {backends}"
    server = _server(docs)
    for check in (p for p in policies if p["kind"] == "HealthCheckPolicy"):
        http = check["spec"]["default"]["config"]["httpHealthCheck"]
        assert http["requestPath"] == server["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert http["port"] == GATEWAY_PORT
    for backend in (p for p in policies if p["kind"] == "GCPBackendPolicy"):
        assert backend["spec"]["default"]["timeoutSec"] >= 600, "GKE's 30 s default would cut streams"
    assert all("timeouts" not in r for r in route["spec"]["rules"]), "GKE rejects HTTPRoute timeouts"

    ranges = {"35.191.0.0/16", "130.211.0.0/22"}  # Google's health-check and front-end ranges
    picker_pod = next(d for d in docs if d["kind"] == "Deployment" and "epp" in d["metadata"]["name"])
    for pod_labels, port_names in (
        (_pod(docs)["metadata"]["labels"], {"http"}),
        (picker_pod["spec"]["template"]["metadata"]["labels"], {"grpc", "grpc-health"}),
    ):
        (policy,) = [
            d
            for d in docs
            if d["kind"] == "NetworkPolicy"
            and d["metadata"]["name"].endswith(f"-gke-{_overlay(name)}")
            and _selects(d["spec"]["podSelector"]["matchLabels"], pod_labels)
        ]
        assert policy["spec"]["policyTypes"] == ["Ingress"], "it only widens the component's own policy"
        (rule,) = policy["spec"]["ingress"]
        assert {p["port"] for p in rule["ports"]} == port_names
        assert ranges <= {peer["ipBlock"]["cidr"] for peer in rule["from"]}


def test_structural_schemas_reject_bad_resources(rendered: dict[str, list[dict]]) -> None:
    """The schemas above do fail: an unknown field, a wrong type, a bad enum value, a relative path."""
    docs = rendered["bf16+inference+gke"]
    check = copy.deepcopy(_one([d for d in docs if d["metadata"]["name"].startswith("dsv2-serve-pool")], "HealthCheckPolicy"))  # fmt: skip
    assert not _structural_errors(check)
    check["spec"]["default"]["checkIntervalSec"] = "5"
    assert _structural_errors(check)
    check = copy.deepcopy(_one([d for d in docs if d["metadata"]["name"].startswith("dsv2-serve-pool")], "HealthCheckPolicy"))  # fmt: skip
    check["spec"]["default"]["config"]["httpHealthCheck"]["requestPath"] = "ready"
    assert _structural_errors(check)
    backend = copy.deepcopy(_one([d for d in docs if d["metadata"]["name"].startswith("dsv2-serve-pool")], "GCPBackendPolicy"))  # fmt: skip
    backend["spec"]["default"]["timeout"] = 3600  # the field is timeoutSec
    assert _structural_errors(backend)
    rule = copy.deepcopy(_one(rendered["bf16+inference+istio"], "DestinationRule"))
    assert not _structural_errors(rule)
    rule["spec"]["trafficPolicy"]["tls"]["mode"] = "TLS"
    assert _structural_errors(rule)


def test_custom_resources_structure(variant: tuple[str, list[dict]]) -> None:
    name, docs = variant
    for doc in docs:
        if doc["kind"] in CRD_API_VERSIONS:
            assert doc["apiVersion"] == CRD_API_VERSIONS[doc["kind"]]
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, sorted(doc)

    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    if OVERLAYS[_overlay(name)]:
        assert _mine(docs, "ServiceMonitor"), "GPU variants ship a ServiceMonitor"
    services = [d for d in docs if d["kind"] == "Service"]
    for monitor in monitors:  # the server's, and with the inference pool the picker's
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
        selector = spec["selector"]["matchLabels"]
        assert selector.get("app.kubernetes.io/instance"), (
            "ServiceMonitor would scrape every variant's Service"
        )
        (target,) = [d for d in services if selector.items() <= d["metadata"]["labels"].items()]
        assert (
            monitor["metadata"]["labels"]["app.kubernetes.io/name"]
            == target["metadata"]["labels"]["app.kubernetes.io/name"]
        ), "each monitor scrapes its own component's Service"
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert endpoint["port"] in {p["name"] for p in target["spec"]["ports"]}
            assert endpoint["path"] == "/metrics"
            assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])

    scaled = _maybe(docs, "ScaledObject")
    assert (scaled is not None) == ("keda" in name)
    if scaled is not None:
        spec = scaled["spec"]
        deployment = _mine(docs, "Deployment")
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
    m = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert m, duration
    return int(m[1]) * {"s": 1, "m": 60, "h": 3600}[m[2]]


# ---- the server it runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_parser():
    """vLLM's own engine-argument parser: where the server hands flags it does not know."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

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
    # The container's own env wins over envFrom (DSV2_MODEL and DSV2_REVISION from the model-download component);
    # the key file is the named-keys component's, checked by its own test.
    for key, value in _container_env(docs, _server(docs)).items():
        if key.startswith("DSV2_") and key != "DSV2_API_KEY_FILE":
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("DSV2_API_KEYS", "sk-test")  # from a Secret in the pod
    if _env_item(_server(docs), "DSV2_RATE_LIMIT_STORE"):  # from a Secret too (rate-limit-redis component)
        monkeypatch.setenv("DSV2_RATE_LIMIT_STORE", "redis://:secret@dsv2-serve-redis:6379/0")
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


def test_keys_are_required(variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The pods never serve without keys: settings.env says so (overriding the CPU image's demo default), and a
    Secret value that holds no key, or no Secret value at all, stops the start."""
    from server.gateway.app import create_app
    from server.settings import settings_from_args
    from tests.fake_engine import FakeEngine

    _, docs = variant
    assert _settings_env(docs)["DSV2_ALLOW_UNAUTHENTICATED"] == "false"
    settings, _ = _resolve_settings(docs, monkeypatch)
    assert not settings.allow_unauthenticated
    ns, extra = _serve_parser()[0].parse_known_args(["serve", *_server(docs).get("args", [])])
    for empty in ("", " , "):
        monkeypatch.setenv("DSV2_API_KEYS", empty)
        with pytest.raises(ValueError, match="holds no key"):
            settings_from_args(ns, extra)
    monkeypatch.delenv("DSV2_API_KEYS")
    monkeypatch.delenv("DSV2_API_KEY_FILE", raising=False)
    with pytest.raises(ValueError, match="--allow-unauthenticated"):
        create_app(settings_from_args(ns, extra), engine=FakeEngine())


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
    if settings.download_dir:
        # The server downloads before it loads: the bf16 weights (~32 GB) at 100 Mbit/s, plus a first start's
        # load, torch.compile and CUDA-graph capture (docs/kubernetes.md, "Model cache").
        assert budget >= BF16_WEIGHTS_BYTES / (100e6 / 8) + LOAD_SECONDS, budget
        assert _mine(docs, "Deployment")["spec"]["progressDeadlineSeconds"] > budget, (
            "a rollout still downloading is not reported failed"
        )

    # Readiness as the gateway computes it (server/gateway/health.py): an idle pod refreshes its proof on a
    # /ready older than half the window, so probes at most half a window apart always find it proven; when
    # the proof has run out, /ready waits up to PROBE_WAIT_S for a one-token generation.
    from server.gateway.health import PROBE_WAIT_S

    ready = server["readinessProbe"]
    assert ready["periodSeconds"] <= settings.readiness_window_seconds / 2
    assert ready["timeoutSeconds"] >= PROBE_WAIT_S + 2, "room for the probe wait on a loaded node"
    assert ready["failureThreshold"] * ready["periodSeconds"] <= 15, "a drained pod leaves the endpoints fast"
    live = server["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60, (
        "liveness waits out a minute on top of the stall"
    )
    assert settings.liveness_stall_seconds >= 60


def test_keep_alive_outlasts_proxies(
    variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle upstream connection must be closed by the proxy, never by the server under it: the gateway's
    keep-alive stays above the 60 s upstream keep-alive of nginx and cloud load balancers (stray 502s)."""
    _, docs = variant
    settings, _ = _resolve_settings(docs, monkeypatch)
    assert "DSV2_TIMEOUT_KEEP_ALIVE" in _settings_env(docs), (
        "stated in the manifests, not left to the default"
    )
    assert settings.timeout_keep_alive > 60
    assert (
        f"DSV2_TIMEOUT_KEEP_ALIVE={settings.timeout_keep_alive}"
        in (ROOT / "docs" / "kubernetes.md").read_text()
    )


def test_gateway_routes_include_probe_paths() -> None:
    from server.gateway.app import create_app
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


def _assert_hardened(spec: dict, writable: str) -> None:
    """A pod as the server's is run: non-root, RuntimeDefault seccomp, no service-account token, nothing of the
    host's; each container without capabilities or privilege escalation on a read-only root filesystem, with a
    writable volume at `writable` (where the process writes) and no hostPath."""
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert not spec.get("hostNetwork") and not spec.get("hostIPC") and not spec.get("hostPID")
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert not sc.get("privileged"), container["name"]
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert writable in mounts and not mounts[writable].get("readOnly"), (
            f"{container['name']}: a read-only root needs a writable {writable}"
        )
        for mount in mounts.values():
            volume = volumes[mount["name"]]
            assert "hostPath" not in volume


def test_security_context(variant: tuple[str, list[dict]]) -> None:
    _, docs = variant
    spec = _pod(docs)["spec"]
    _assert_hardened(spec, writable="/tmp")
    volumes = {v["name"]: v for v in spec["volumes"]}
    server_mounts = {m["mountPath"]: m for m in _server(docs)["volumeMounts"]}
    assert volumes[server_mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in _server(docs)["env"]}
    assert env["HOME"] in server_mounts and not server_mounts[env["HOME"]].get("readOnly")
    if "/models" in server_mounts:
        downloads = _container_env(docs, _server(docs)).get("DSV2_DOWNLOAD_DIR") == "/models"
        assert server_mounts["/models"].get("readOnly", False) is not downloads, (
            "read-only, unless the server downloads the weights into it"
        )


def _assert_resources(spec: dict) -> None:
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]
        assert _bytes(resources["requests"]["memory"]) <= _bytes(resources["limits"]["memory"])
        # Node disk: requested so the scheduler places the pod where it fits, limited so it cannot fill the node.
        assert _bytes(resources["requests"]["ephemeral-storage"]) <= _bytes(
            resources["limits"]["ephemeral-storage"]
        )


def test_resources_sized(variant: tuple[str, list[dict]]) -> None:
    _, docs = variant
    spec = _pod(docs)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    _assert_resources(spec)
    # /dev/shm (RAM-backed) counts against the memory limit: it must leave room for the process itself.
    shm = _bytes(volumes["dshm"]["emptyDir"]["sizeLimit"])
    assert shm <= _bytes(_server(docs)["resources"]["limits"]["memory"]) // 4
    # The disk-backed emptyDirs the server mounts fit in its ephemeral-storage limit.
    server = _server(docs)
    on_disk = {m["name"] for m in server["volumeMounts"]} & {
        name for name, v in volumes.items() if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    }
    assert on_disk >= {"cache", "tmp"}
    total = sum(_bytes(volumes[name]["emptyDir"]["sizeLimit"]) for name in on_disk)
    assert total <= _bytes(server["resources"]["limits"]["ephemeral-storage"])


def test_compile_caches_on_the_model_volume(variant: tuple[str, list[dict]]) -> None:
    """Every compiler's cache in one directory on a writable volume: the model PVC (survives restarts, shared by
    replicas) wherever there is one, the cache emptyDir otherwise (CPU demo). Each tool creates its own
    directory, so no init step (or subPath) has to exist first."""
    name, docs = variant
    server = _server(docs)
    env = _container_env(docs, server)
    caches = ["VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH",
              "FLASHINFER_WORKSPACE_BASE", "DG_JIT_CACHE_DIR"]  # fmt: skip
    roots = {env[key].rsplit("/", 1)[0] for key in caches}
    assert len(roots) == 1, f"one compile-cache directory: {roots}"
    (root,) = roots
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    (mount,) = [m for path, m in mounts.items() if root.startswith(path + "/")]
    assert not mount.get("readOnly") and "subPath" not in mount
    volume = {v["name"]: v for v in _pod(docs)["spec"]["volumes"]}[mount["name"]]
    assert ("persistentVolumeClaim" in volume) == bool(OVERLAYS[_overlay(name)]), volume


def test_topology_spread(variant: tuple[str, list[dict]]) -> None:
    _, docs = variant
    deployment = _mine(docs, "Deployment")
    constraints = {c["topologyKey"]: c for c in _pod(docs)["spec"]["topologySpreadConstraints"]}
    assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in constraints.values():
        assert constraint["maxSkew"] == 1
        # GPUs are scarce: spread where possible, never leave a replica pending for it.
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert constraint["matchLabelKeys"] == ["pod-template-hash"], (
            "old and new pods spread each on their own"
        )


def test_network_policy_egress(variant: tuple[str, list[dict]]) -> None:
    """DNS to port 53 of any address: CoreDNS behind the kube-dns ClusterIP in iptables and IPVS mode, NodeLocal
    DNSCache on the host network (169.254.20.10, and the ClusterIP itself in iptables mode), which no namespace or
    pod selector matches. HTTPS only to public addresses."""
    _, docs = variant
    egress = _server_policy(docs)["spec"]["egress"]
    (dns,) = [r for r in egress if {p["port"] for p in r["ports"]} == {53}]
    assert {p["protocol"] for p in dns["ports"]} == {"UDP", "TCP"}
    assert "to" not in dns, "a `to` peer would miss a DNS server on the host network or behind a ClusterIP"
    (https,) = [r for r in egress if {p["port"] for p in r["ports"]} == {443}]
    (block,) = [p["ipBlock"] for p in https["to"]]
    assert (
        block["cidr"] == "0.0.0.0/0"
        and "169.254.0.0/16" in block["except"]
        and "10.0.0.0/8" in block["except"]
    )
    # The rate-limit store, with its component: this variant's store pods on its port (test_rate_limit_store).
    store = [r for r in egress if {p["port"] for p in r["ports"]} == {STORE_PORT}]
    assert len(store) == (_store(docs) is not None)
    assert len(egress) == 2 + len(store), "nothing else leaves the pods"


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
    deployment = _mine(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    instance = labels["app.kubernetes.io/instance"]
    assert instance == f"dsv2-serve-{_overlay(name)}"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == instance

    service = _mine(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in _server(docs)["ports"]}

    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"].get("maxUnavailable", 0) >= 1, "a one-replica deployment must stay drainable"

    policy = _server_policy(docs)
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    for rule in policy["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= {"http", GATEWAY_PORT}
        for peer in rule["from"]:
            # kustomize adds selector labels to podSelectors in rules: only the empty one (all pods of the
            # namespace) is safe from that.
            assert peer.get("podSelector", {}) == {}, peer

    account = _mine(docs, "ServiceAccount")
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


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


# What the endpoint picker's OpenAI parser does with a request (gateway-api-inference-extension v1.5.0,
# pkg/epp/framework/plugins/requesthandling/parsers/openai/openai.go): determineAPITypeFromPath takes the API from
# the path's suffix, in this order, and calls anything else "completions"; extractRequestBody then requires that
# API's field or fails, and the director answers 400 BadRequest (pkg/epp/requestcontrol/director.go). A request
# without a body (GET) never reaches the parser (pkg/epp/handlers/request.go: any endpoint).
PICKER_APIS = [
    ("/conversations", "items"),
    ("/responses", "input"),
    ("/chat/completions", "messages"),
    ("/completions", "prompt"),
    ("/embeddings", "input"),
]
# The parser the picker config must name for PICKER_APIS to describe it.
PICKER_PARSER = "openai-parser"


def _picker_field(path: str) -> str | None:
    """The body field the picker's OpenAI parser requires on `path`; None where it falls back to completions."""
    return next((field for suffix, field in PICKER_APIS if path.endswith(suffix)), None)


def _api_routes() -> list[tuple[str, str, type | None]]:
    """(method, concrete path, request body model) of every route of the gateway app, the LoRA admin routes
    included, from the app itself (paths.py names them)."""
    from pydantic import BaseModel

    from server.gateway.app import create_app
    from server.settings import Settings
    from tests.fake_engine import FakeEngine

    app = create_app(
        Settings(model="/nonexistent/model", allow_runtime_lora_updating=True, playground=True),
        engine=FakeEngine(),
    )
    out = []
    for route in app.routes:
        path = getattr(route, "path", None)
        if not path or not getattr(route, "methods", None):
            continue
        concrete = re.sub(r"\{[^}]+\}", "deepseek-v2-lite-chat", path)
        endpoint = getattr(route, "endpoint", None)
        models = [
            hint
            for hint in (typing.get_type_hints(endpoint).values() if endpoint else [])
            if isinstance(hint, type) and issubclass(hint, BaseModel)
        ]
        for method in route.methods - {"HEAD", "OPTIONS"}:
            out.append((method, concrete, models[0] if models else None))
    return out


def _path_matches(kind: str, value: str, path: str) -> bool:
    """Gateway API (and Ingress) path matching: Exact is equality, a prefix matches whole path elements."""
    if kind == "Exact":
        return path == value
    assert kind in {"PathPrefix", "Prefix"}, f"path match type {kind} not modelled here"
    prefix = value.rstrip("/")
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def _route_backend(route: dict, method: str, path: str) -> dict | None:
    """The backend an HTTPRoute sends (method, path) to, by Gateway API precedence: an Exact path match, then
    the longest prefix, then a method match (no header or query matches used here); ties go to the first rule."""
    best = None
    for rule in route["spec"]["rules"]:
        for match in rule.get("matches", [{}]):
            assert not match.get("headers") and not match.get("queryParams"), "not modelled here"
            kind, value = (match.get("path") or {"type": "PathPrefix", "value": "/"}).values()
            if not _path_matches(kind, value, path) or match.get("method", method) != method:
                continue
            rank = (kind == "Exact", len(value), "method" in match)
            if best is None or rank > best[0]:
                (backend,) = rule["backendRefs"]
                best = (rank, backend)
    return best[1] if best else None


def _ingress_backend(ingress: dict, path: str) -> dict | None:
    """The backend an Ingress sends `path` to: Exact before Prefix, then the longest prefix (ingress-nginx)."""
    best = None
    for rule in ingress["spec"]["rules"]:
        for item in rule["http"]["paths"]:
            if _path_matches(item["pathType"], item["path"], path):
                rank = (item["pathType"] == "Exact", len(item["path"]))
                if best is None or rank > best[0]:
                    best = (rank, {"kind": "Service", "name": item["backend"]["service"]["name"]})
    return best[1] if best else None


@pytest.fixture(scope="session")
def api_routes() -> list[tuple[str, str, type | None]]:
    return _api_routes()


def test_every_api_path_reaches_a_backend_that_accepts_it(
    variant: tuple[str, list[dict]], api_routes: list[tuple[str, str, type | None]]
) -> None:
    """Each path of the app, as each routing variant resolves it: every /v1 path reaches a backend (no 404 from
    the Gateway); the InferencePool gets exactly the requests the picker's OpenAI parser accepts, each parsed as
    the API the server serves there (the field the picker requires is the one the server requires); every other
    /v1 path (Anthropic Messages and count_tokens, models, LoRA admin, unknown paths) goes to the Service; paths
    outside /v1 (probes, metrics, playground, docs) are not routed at all."""
    name, docs = variant
    route, ingress = _maybe(docs, "HTTPRoute"), _maybe(docs, "Ingress")
    assert (route is not None) == ("inference" in name or "httproute" in name)
    assert (ingress is not None) == ("ingress" in name)
    if route is None and ingress is None:
        return
    service = _mine(docs, "Service")
    pool = _maybe(docs, "InferencePool")
    if pool is not None:
        picker_config = _picker_config(docs)
        assert picker_config["parser"]["pluginRef"] == PICKER_PARSER
        assert {"type": PICKER_PARSER} in picker_config["plugins"], "the parser the route is designed for"
    paths = {(m, p): model for m, p, model in api_routes}
    assert ("POST", "/v1/messages") in paths and ("POST", "/v1/load_lora_adapter") in paths
    paths[("POST", "/v1/no-such-api")] = None  # the server's own 404, not the Gateway's
    to_pool = set()
    for (method, path), model in sorted(paths.items()):
        backend = _route_backend(route, method, path) if route else _ingress_backend(ingress, path)
        if not path.startswith("/v1/"):
            assert backend is None, f"{name}: {path} is exposed; only the API goes public"
            continue
        assert backend is not None, f"{name}: {method} {path} reaches no backend"
        if backend.get("kind") == "InferencePool":
            assert backend["name"] == pool["metadata"]["name"]
            field = _picker_field(path)
            assert method == "POST" and field, (
                f"{name}: the pool gets only POSTs the picker parses: {method} {path}"
            )
            assert model is not None and model.model_fields[field].is_required(), (
                f"{path}: the picker requires `{field}`, the server's {model.__name__} does not"
            )
            to_pool.add(path)
        else:
            assert (
                backend.get("kind", "Service") == "Service" and backend["name"] == service["metadata"]["name"]
            )
            assert backend.get("port", 80) in {p["port"] for p in service["spec"]["ports"]}
    if pool is not None:  # every OpenAI generation API the picker parses gets its scoring
        assert to_pool == {p for (m, p) in paths if m == "POST" and _picker_field(p)}, to_pool
        assert to_pool == {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
    else:
        assert not to_pool


def test_routes_keep_streams_open(variant: tuple[str, list[dict]]) -> None:
    """Each route rule outlasts a long stream (GKE, which rejects the field, gets GCPBackendPolicy timeouts)."""
    name, docs = variant
    route = _maybe(docs, "HTTPRoute")
    if route is None:
        return
    assert route["spec"]["parentRefs"] and all(
        ref["kind"] == "Gateway" for ref in route["spec"]["parentRefs"]
    )
    for rule in route["spec"]["rules"]:
        if name.endswith("+gke"):
            assert "timeouts" not in rule  # test_istio_and_gke_resources checks the policies
        else:
            assert _seconds(rule["timeouts"]["request"]) >= 600, (
                "long streams must not hit the route's timeout"
            )


def test_routing_model_is_gateway_api_precedence() -> None:
    """The resolver above on a route written against it: Exact beats a longer prefix, element-wise prefixes,
    method matches, first rule on a tie."""
    route = {
        "spec": {
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                    "backendRefs": [{"name": "a"}],
                },
                {
                    "matches": [{"path": {"type": "Exact", "value": "/v1/x"}, "method": "POST"}],
                    "backendRefs": [{"name": "b"}],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1/x/y"}}],
                    "backendRefs": [{"name": "c"}],
                },
            ]
        }
    }
    resolve = lambda m, p: (_route_backend(route, m, p) or {}).get("name")  # noqa: E731
    assert resolve("POST", "/v1/x") == "b" and resolve("GET", "/v1/x") == "a"
    assert resolve("GET", "/v1/x/y/z") == "c" and resolve("GET", "/v1/xy") == "a"
    assert resolve("GET", "/v10") is None and resolve("GET", "/health") is None
    assert _picker_field("/v1/messages") is None and _picker_field("/v1/messages/count_tokens") is None
    assert (
        _picker_field("/v1/chat/completions") == "messages" and _picker_field("/v1/load_lora_adapter") is None
    )


def _picker_config(docs: list[dict]) -> dict:
    """The EndpointPickerConfig the picker reads: the file --config-file names in the mounted ConfigMap."""
    (picker,) = _pickers(docs)
    pod = picker["spec"]["template"]
    (epp,) = pod["spec"]["containers"]
    path = _flags(epp["args"])["--config-file"]
    (mount,) = [m for m in epp["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    (configmap,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
    ]
    return yaml.safe_load(configmap["data"][path.rsplit("/", 1)[1]])


def _pickers(docs: list[dict]) -> list[dict]:
    return [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "endpoint-picker"
    ]


def _flags(args: list[str]) -> dict[str, str]:
    """Go-style flags: `--name value` and `--name=value`."""
    out, i = {}, 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if eq:
            out[name] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[name], i = args[i + 1], i + 1
        else:
            out[name] = "true"
        i += 1
    return out


def test_endpoint_picker_serves_this_variants_pool(variant: tuple[str, list[dict]]) -> None:
    """InferencePool -> picker Service -> picker pod -> --pool-name -> the pool; the pool selects exactly the
    server pods on the gateway's port; the picker may read what it needs and nothing else."""
    name, docs = variant
    pool = _maybe(docs, "InferencePool")
    assert (pool is not None) == ("+inference" in name)
    if pool is None:
        return
    server = _mine(docs, "Deployment")
    server_labels = server["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [GATEWAY_PORT]
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    assert "appProtocol" not in pool["spec"], "spec.appProtocol exists only from the v1.4.0 CRD"

    (picker,) = _pickers(docs)
    pod = picker["spec"]["template"]
    picker_labels = pod["metadata"]["labels"]
    assert not _selects(pool["spec"]["selector"]["matchLabels"], picker_labels), (
        "the picker is no pool member"
    )
    for kind in ("Service", "PodDisruptionBudget"):
        selector = _mine(docs, kind)["spec"]["selector"]
        assert not _selects(selector.get("matchLabels", selector), picker_labels), (
            f"the server's {kind} takes the picker"
        )
    ref = pool["spec"]["endpointPickerRef"]
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == ref["name"]]
    assert _selects(service["spec"]["selector"], picker_labels) and not _selects(
        service["spec"]["selector"], server_labels
    )
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    (epp,) = pod["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in epp["ports"]}
    flag = _flags(epp["args"])
    assert container_ports[port["targetPort"]] == int(flag["--grpc-port"])
    # TLS as upstream runs it: the picker serves ext-proc over TLS (its default, stated), and nothing tells the
    # Gateway or a mesh to speak cleartext HTTP/2 (h2c) to that port. pprof off; metrics without a token, but
    # only Prometheus' namespace may reach them (below).
    assert flag["--secure-serving"] == "true" and "appProtocol" not in port
    assert flag["--enable-pprof"] == "false"
    assert flag["--pool-name"] == pool["metadata"]["name"], (
        "the overlay's replacement names this variant's pool"
    )
    assert flag["--pool-group"] == "inference.networking.k8s.io"
    assert epp["image"] == EPP_IMAGE and epp["imagePullPolicy"] == "IfNotPresent"
    picker_config = _picker_config(docs)
    assert picker_config["kind"] == "EndpointPickerConfig"
    # The config comes from a configMapGenerator: its name carries the content's hash, so an edit (which the
    # picker only reads at start) changes the pod template and rolls the picker.
    (config_volume,) = [v["configMap"]["name"] for v in pod["spec"]["volumes"] if "configMap" in v]
    assert re.fullmatch(rf"dsv2-serve-epp-{_overlay(name)}-[a-z0-9]{{10}}", config_volume), config_volume

    # Its NetworkPolicy: ext-proc from the namespace (an inference Gateway there) and a shared Gateway namespace,
    # metrics from Prometheus' namespace only; out to this variant's pods' port and the API server only.
    (policy,) = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == picker["metadata"]["name"]
    ]
    assert policy["spec"]["podSelector"]["matchLabels"] == picker["spec"]["selector"]["matchLabels"]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    opened = {p["port"]: rule["from"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert set(opened) == {"grpc", "metrics"}, "the health port is the kubelet's; nothing else is open"
    assert opened["metrics"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert {"podSelector": {}} in opened["grpc"]
    (to_pods,) = [r for r in policy["spec"]["egress"] if "to" in r]
    assert to_pods["to"] == [{"podSelector": {"matchLabels": pool["spec"]["selector"]["matchLabels"]}}]
    assert {p["port"] for p in to_pods["ports"]} == {GATEWAY_PORT}
    # Prometheus scrapes it (the DSV2EndpointPicker* alerts read its metrics), this variant's picker only.
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor" and _selects(d["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])]  # fmt: skip
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http-metrics"]
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["http-metrics"] == "metrics"
    assert container_ports["metrics"] == int(flag["--metrics-port"])

    # Least privilege: read its pool, pods and objectives in its own namespace; hardened like the server.
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert {(tuple(r["apiGroups"]), tuple(r["resources"])) for r in role["rules"]} == {
        (("inference.networking.k8s.io",), ("inferencepools",)),
        (("",), ("pods",)),
        (("inference.networking.x-k8s.io",), ("inferenceobjectives", "inferencemodelrewrites")),
    }
    assert all(set(r["verbs"]) == {"get", "watch", "list"} for r in role["rules"])
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["spec"]["serviceAccountName"]}]
    assert not any(d["kind"].startswith("Cluster") for d in docs), "no cluster-wide rights"
    sc = epp["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert {"cpu", "memory", "ephemeral-storage"} <= set(epp["resources"]["requests"])


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
        series = re.match(r"'?([a-z0-9_:]+)\{", rule["seriesQuery"])[1]
        name = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }, "HPA Pods metrics need series mapped to namespace and pod"
        published[name] = rule
    assert {
        re.match(r"'?([a-z0-9_:]+)\{", r["seriesQuery"])[1] for r in published.values()
    } == VLLM_GAUGES | {GATEWAY_IN_FLIGHT}
    # The utilization rule divides the two gateway gauges of the same pods.
    utilization = published[UTILIZATION_METRIC]["metricsQuery"]
    assert GATEWAY_LIMIT in utilization and "<<.LabelMatchers>>" in utilization.split("/")[1]
    from server.gateway import metrics as gateway_metrics

    for gauge in (GATEWAY_IN_FLIGHT, GATEWAY_LIMIT):
        assert f'"{gauge}"' in inspect.getsource(gateway_metrics), f"the gateway no longer exports {gauge}"

    for name in GPU_OVERLAYS:
        hpa = _one(rendered[name], "HorizontalPodAutoscaler")
        metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        assert metrics == set(published), f"{name}: HPA metrics not published by the adapter rules"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

        docs = rendered[f"{name}+keda+ingress"]
        service = _mine(docs, "Service")["metadata"]["name"]
        queried = set()
        for trigger in _one(docs, "ScaledObject")["spec"]["triggers"]:
            query = trigger["metadata"]["query"]
            matchers = re.findall(r'service="([^"]*)"', query)
            assert matchers and set(matchers) == {service}, (
                f"{name}: KEDA query not scoped to this variant: {query}"
            )
            queried |= set(re.findall(r"vllm:[a-z_]+|dsv2_[a-z_]+", query))
        assert queried == VLLM_GAUGES | {GATEWAY_IN_FLIGHT, GATEWAY_LIMIT}


def test_load_beyond_a_replica_shows_as_a_queue(
    variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch, vllm_parser
) -> None:
    """The gateway admits more sequences than vLLM batches (--max-inflight-sequences = 1.5 x --max-num-seqs), so
    load beyond a full batch waits in vLLM's queue, where vllm:num_requests_waiting shows it to the picker's queue
    scorer and the autoscalers, before any 429. The admission-utilization signal (in flight / budget) fires past
    a full batch and before the budget is spent; the waiting-requests target is reachable below the 429s."""
    name, docs = variant
    settings, extra = _resolve_settings(docs, monkeypatch)
    engine = vllm_parser.parse_args(extra)
    batch, budget = engine.max_num_seqs, settings.max_inflight_sequences
    assert batch, (
        f"{name}: the overlay sets --max-num-seqs (vLLM's default, 1024 on large GPUs, hides the queue)"
    )
    assert budget * 2 == batch * 3, (
        f"{name}: --max-inflight-sequences {budget} != 1.5 x --max-num-seqs {batch}"
    )
    hpa, scaled = _maybe(docs, "HorizontalPodAutoscaler"), _maybe(docs, "ScaledObject")
    thresholds = {}
    if hpa is not None:
        for metric in hpa["spec"]["metrics"]:
            thresholds[metric["pods"]["metric"]["name"]] = _quantity(metric["pods"]["target"]["averageValue"])
    if scaled is not None:
        for trigger in scaled["spec"]["triggers"]:
            metric = re.search(r"(vllm:[a-z_]+|dsv2_[a-z_]+)", trigger["metadata"]["query"])[1]
            key = UTILIZATION_METRIC if metric == GATEWAY_IN_FLIGHT else metric.replace(":", "_")
            thresholds[key] = float(trigger["metadata"]["threshold"])
    if not OVERLAYS[_overlay(name)]:
        assert not thresholds, "the CPU demo has no autoscaler"
        return
    assert batch / budget < thresholds[UTILIZATION_METRIC] < 1, thresholds
    assert 0 < thresholds["vllm_num_requests_waiting"] < budget - batch, thresholds


def _quantity(value: str) -> float:
    return int(value[:-1]) / 1000 if str(value).endswith("m") else float(value)


def test_server_downloads_the_pinned_model(
    variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model-download component: the server itself downloads the overlay's repo at its pinned commit into the
    PVC (DSV2_MODEL, DSV2_REVISION, DSV2_DOWNLOAD_DIR), visible on /health and /metrics, with no init container
    and no --model flag that would win over the environment."""
    name, docs = variant
    spec = _pod(docs)["spec"]
    assert not spec.get("initContainers"), "the download runs in the server, where probes and metrics see it"
    settings, _ = _resolve_settings(docs, monkeypatch)
    if not OVERLAYS[_overlay(name)]:
        assert not settings.download_dir and not any(d["kind"] == "PersistentVolumeClaim" for d in docs)
        return
    server = _server(docs)
    assert not any(a.startswith("--model") for a in server["args"]), (
        "a --model flag would override DSV2_MODEL"
    )
    model_env = _settings_env(docs)  # the overlay's model.env, merged into the settings ConfigMap
    env = _container_env(docs, server)
    refs = {e["name"]: e["valueFrom"]["configMapKeyRef"]["key"] for e in server["env"] if "configMapKeyRef" in e.get("valueFrom", {})}  # fmt: skip
    assert refs == {"DSV2_MODEL": "HF_MODEL_REPO", "DSV2_REVISION": "HF_MODEL_REVISION"}
    assert (
        settings.model == model_env["HF_MODEL_REPO"] and settings.revision == model_env["HF_MODEL_REVISION"]
    )
    assert re.fullmatch(r"[0-9a-f]{40}", settings.revision), "the model revision is pinned to a commit"

    from server.gateway.startup import is_local

    assert not is_local(settings.model), "a repo id, which the server downloads"
    # Into the PVC, writable, at the directory DSV2_DOWNLOAD_DIR names: weights (and compile caches) survive the
    # pod and are shared by every replica.
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    mount = mounts[settings.download_dir]
    assert not mount.get("readOnly") and "subPath" not in mount
    (claim,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert set(claim) == {"name", "persistentVolumeClaim"}
    assert (
        claim["persistentVolumeClaim"]["claimName"] == _one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    )
    # It reaches the hub: not offline, an optional token (public models need none), no telemetry.
    assert env["HF_HUB_OFFLINE"] == "0" and env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    (token,) = [e["valueFrom"]["secretKeyRef"] for e in server["env"] if e["name"] == "HF_TOKEN"]
    assert token["optional"] is True
    assert env["HOME"] in mounts and not mounts[env["HOME"]].get("readOnly"), (
        "hub metadata on a writable volume"
    )


def test_overlay_revisions_are_commits() -> None:
    """Every overlay's model.env pins a 40-hex commit: a pod added later can never load a newer upload of a
    branch, and a new revision is a new directory."""
    envs = sorted(DEPLOY.glob("overlays/*/model.env"))
    assert {p.parent.name for p in envs} == set(GPU_OVERLAYS)
    for path in envs:
        values = dict(
            line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
        )
        assert re.fullmatch(r"[0-9a-f]{40}", values["HF_MODEL_REVISION"]), f"{path}: not a commit sha"
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", values["HF_MODEL_REPO"]), f"{path}: not a repo id"


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
    assert worker["command"] == ["tini", "--", "vllm", "serve"], "under the image's init, as the leader"
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


# ---- scale-out: gateway processes and the shared rate-limit store ------------------------------------------


def _docs_section(title: str) -> str:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"docs/kubernetes.md has no section ## {title}"
    return m[1]


def test_cpu_requests_fit_the_processes(
    variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each overlay states its gateway (front-end) process count (DSV2_API_SERVER_COUNT) beside its CPU request,
    and the request covers a core per front-end process and one for the engine core; on GPUs also one per worker
    process (tensor parallelism over several GPUs) and a core of headroom. Memory grows with the process count,
    and docs/kubernetes.md's table says what the overlays do."""
    name, docs = variant
    server = _server(docs)
    item = _env_item(server, "DSV2_API_SERVER_COUNT")
    assert item is not None and "value" in item, f"{name}: state DSV2_API_SERVER_COUNT beside the CPU request"
    count = int(item["value"])
    assert count >= 1
    settings, _ = _resolve_settings(docs, monkeypatch)
    if "api_server_count" in type(settings).model_fields:
        assert settings.api_server_count == count
    requests = server["resources"]["requests"]
    cpu = _quantity(requests["cpu"])
    assert cpu >= count + 1, f"{name}: {cpu} CPUs for {count} front-end processes and the engine core"
    gpus = settings.tensor_parallel_size * settings.pipeline_parallel_size
    if OVERLAYS[_overlay(name)]:
        # The engine core, and a worker process per GPU once there are two.
        engine = 1 + (gpus if gpus > 1 else 0)
        assert cpu >= count + engine + 1, (
            f"{name}: {cpu} CPUs for {count} front-ends, {engine} engine processes"
        )
    else:
        assert count == 1, "the CPU demo runs one gateway process"
    assert _bytes(requests["memory"]) >= count * FRONT_END_MEMORY
    # The sizing table: | `overlay` | ... | processes | CPU request | memory request |
    rows = [
        line for line in _docs_section("Scale-out").splitlines() if line.startswith(f"| `{_overlay(name)}` |")
    ]
    assert len(rows) == 1, f"docs/kubernetes.md, Scale-out: one table row for {_overlay(name)}"
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[-3:] == [str(count), requests["cpu"], requests["memory"]], rows[0]


def _redis_bytes(value: str) -> int:
    """A Redis/Valkey memory setting: k/m/g are powers of 1000, kb/mb/gb of 1024."""
    m = re.fullmatch(r"(\d+)(k|kb|m|mb|g|gb)?", value.lower())
    assert m, value
    units = {None: 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
    return int(m[1]) * units[m[2]]


def test_rate_limit_store(variant: tuple[str, list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The rate-limit-redis component: the server's store URL from the Secret (it holds the password), the failure
    mode stated; the store takes its password from the same Secret through stdin, never its command line, keeps
    nothing on disk, caps its memory under its limit with an eviction policy, proves itself with an authenticated
    PING, runs one replica from a pinned official image, hardened like the server, and only this variant's
    Service selects it."""
    name, docs = variant
    store = _store(docs)
    assert (store is not None) == ("rate-limit-redis" in name)
    server = _server(docs)
    url = _env_item(server, "DSV2_RATE_LIMIT_STORE")
    failure = _env_item(server, "DSV2_RATE_LIMIT_FAILURE")
    if store is None:
        assert url is None and failure is None, "the store's settings come with the component"
        assert not [
            d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == STORE_NAME
        ]
        return

    # The server: the URL from the Secret, required (no silent fallback to per-process limits); open on failure.
    assert url["valueFrom"] == {"secretKeyRef": {"name": STORE_SECRET, "key": "url"}}
    assert failure["value"] == "open", "a store restart must not refuse every request (docs/kubernetes.md)"
    settings, _ = _resolve_settings(docs, monkeypatch)
    if "rate_limit_failure" in type(settings).model_fields:
        assert getattr(settings.rate_limit_failure, "value", settings.rate_limit_failure) == "open"

    spec = store["spec"]
    pod = spec["template"]
    assert spec["replicas"] == 1, "one store: the counts of every process and replica in one place"
    assert (
        spec["strategy"]["type"] == "RollingUpdate"
        and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    )
    (valkey,) = pod["spec"]["containers"]
    image, _, digest = valkey["image"].partition("@")
    repo, _, tag = image.rpartition(":")
    assert repo in STORE_IMAGES, valkey["image"]
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), f"a release tag, not {tag!r}"
    assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert valkey["imagePullPolicy"] == "IfNotPresent"

    # The password: from the same Secret, into the config on stdin (`-`, the last argument); the probes' valkey-cli
    # reads the same variable. Nothing on a command line.
    auth = _env_item(valkey, "REDISCLI_AUTH")
    assert auth["valueFrom"] == {"secretKeyRef": {"name": STORE_SECRET, "key": "password"}}
    shell, flag, script, argv0 = valkey["command"]
    assert (shell, flag, argv0) == ("/bin/sh", "-c", "valkey-server")
    assert script.startswith('exec valkey-server "$@" - <<EOF\n') and script.endswith("\nEOF\n")
    assert script.splitlines()[1:-1] == ['requirepass "$REDISCLI_AUTH"']
    assert not any("pass" in a or "auth" in a.lower() for a in valkey["args"]), valkey["args"]
    options = _flags(valkey["args"])
    assert options["--save"] == "" and options["--appendonly"] == "no", (
        "limits are ephemeral: nothing on disk"
    )
    assert options["--maxmemory-policy"] in STORE_EVICTION
    limit = _bytes(valkey["resources"]["limits"]["memory"])
    assert 0 < _redis_bytes(options["--maxmemory"]) <= limit // 2, "room for fragmentation and client buffers"
    ports = {p["name"]: p["containerPort"] for p in valkey["ports"]}
    assert ports == {"redis": STORE_PORT} and int(options["--port"]) == STORE_PORT
    assert options["--dir"] == "/data"
    for kind in ("readinessProbe", "livenessProbe"):
        command = valkey[kind]["exec"]["command"]
        assert command[:2] == ["/bin/sh", "-c"] and re.search(
            r"valkey-cli .*ping \| grep -q PONG", command[2]
        )
        assert " -a " not in command[2] and "--pass" not in command[2], (
            "the password stays off the command line"
        )
        assert valkey[kind]["timeoutSeconds"] >= 2

    # Hardened like the server, its own token-less account, sized, and off the GPU nodes.
    _assert_hardened(pod["spec"], writable="/data")
    _assert_resources(pod["spec"])
    assert "limits" not in valkey["resources"] or "cpu" not in valkey["resources"]["limits"], (
        "no CPU throttling"
    )
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (data,) = [volumes[m["name"]] for m in valkey["volumeMounts"] if m["mountPath"] == "/data"]
    assert _bytes(data["emptyDir"]["sizeLimit"]) <= _bytes(valkey["resources"]["limits"]["ephemeral-storage"])
    account = _store(docs, "ServiceAccount")
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False
    assert not pod["spec"].get("tolerations") and not pod["spec"].get("nodeSelector")
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(
        valkey["lifecycle"]["preStop"]["exec"]["command"][1]
    )

    # Its Service: the host of the URL, this variant's store pods only; nothing of the server's selects it.
    labels = pod["metadata"]["labels"]
    service = _store(docs, "Service")
    assert service["metadata"]["name"] == f"{STORE_NAME}-{_overlay(name)}", "the host the docs' URL names"
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/instance"] == f"dsv2-serve-{_overlay(name)}"
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert not _selects(service["spec"]["selector"], _pod(docs)["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port["port"] == STORE_PORT and ports[port["targetPort"]] == STORE_PORT
    assert not _selects(_mine(docs, "Service")["spec"]["selector"], labels)
    # No PodDisruptionBudget selects it (one replica: it would block drains or allow everything; see the docs).
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert not _selects(pdb["spec"]["selector"]["matchLabels"], labels)

    # The Secret as docs/kubernetes.md creates it: both keys, the URL's host this variant's store.
    section = _docs_section("Scale-out")
    assert f"create secret generic {STORE_SECRET}" in section
    assert '--from-literal=password="$P"' in section
    assert f'--from-literal=url="redis://:$P@{STORE_NAME}-bf16:{STORE_PORT}/0"' in section


def test_rate_limit_store_network_policies(variant: tuple[str, list[dict]]) -> None:
    """Only this variant's server pods reach the store, on its port; the store sends nothing out; the server's
    policy lets it out to exactly that store, and no other policy opens the port."""
    name, docs = variant
    store = _store(docs)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    to_port = [
        (d, r)
        for d in policies
        for r in d["spec"].get("egress", [])
        if STORE_PORT in {p["port"] for p in r.get("ports", [])}
    ]
    if store is None:
        assert not to_port
        return
    store_labels = store["spec"]["template"]["metadata"]["labels"]
    server_labels = _pod(docs)["metadata"]["labels"]
    (valkey,) = store["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in valkey["ports"]}

    # The policies selecting the store's pods: its own only (policies add up: another would widen it).
    (policy,) = [d for d in policies if _selects(d["spec"]["podSelector"]["matchLabels"], store_labels)]
    assert policy["spec"]["podSelector"]["matchLabels"] == store["spec"]["selector"]["matchLabels"]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not policy["spec"].get("egress"), "the store connects nowhere"
    (rule,) = policy["spec"]["ingress"]
    assert {ports.get(p["port"], p["port"]) for p in rule["ports"]} == {STORE_PORT}
    assert {p.get("protocol", "TCP") for p in rule["ports"]} == {"TCP"}
    server_selector = _mine(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert rule["from"] == [{"podSelector": {"matchLabels": server_selector}}], (
        "no namespace, no address range"
    )
    assert _selects(server_selector, server_labels) and not _selects(server_selector, store_labels)
    for picker in _pickers(docs):
        assert not _selects(server_selector, picker["spec"]["template"]["metadata"]["labels"])

    # The server's side: out to this store's pods, on its port, from the server's own policy only.
    assert [d for d, _ in to_port] == [_server_policy(docs)]
    ((_, out),) = to_port
    assert out["ports"] == [{"port": STORE_PORT, "protocol": "TCP"}]
    assert out["to"] == [{"podSelector": {"matchLabels": store["spec"]["selector"]["matchLabels"]}}]
    assert not _selects(out["to"][0]["podSelector"]["matchLabels"], server_labels)


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
        if path.suffix == ".json":  # JSON has no comments: the dashboard says what it is in its description
            assert json.loads(path.read_text())["description"]
            continue
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


def test_cpu_demo_named_keys_load(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    """The named-keys component: the Secret's keys.yaml mounted where DSV2_API_KEY_FILE points, and the server's
    own loader accepts the demo file (names, limits)."""
    import base64

    from server.gateway.tenants import load

    docs = rendered["cpu-demo"]
    server = _server(docs)
    (path,) = [e["value"] for e in server["env"] if e["name"] == "DSV2_API_KEY_FILE"]
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == "api-key-file"]
    assert mount["readOnly"] and path == f"{mount['mountPath']}/keys.yaml"
    (volume,) = [v for v in _pod(docs)["spec"]["volumes"] if v["name"] == "api-key-file"]
    secret = _one(docs, "Secret")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["items"] == [{"key": "keys.yaml", "path": "keys.yaml"}]
    key_file = tmp_path / "keys.yaml"
    key_file.write_bytes(base64.b64decode(secret["data"]["keys.yaml"]))
    flat = base64.b64decode(secret["data"]["api-keys"]).decode()
    tenants = load(flat.split(","), str(key_file))
    by_name = {t.name: t for t in tenants.tenants}
    assert set(by_name) == {"key-1", "demo-web", "demo-batch"}
    assert by_name["demo-batch"].max_sequences == 4 and by_name["demo-batch"].tokens_per_minute == 20000
    assert tenants.authenticate(b"sk-dsv2-demo-web") is by_name["demo-web"]
