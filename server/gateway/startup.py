"""Start-up you can watch: the server listens at once and brings the model up behind it, phase by phase.

    downloading → loading_weights → compiling → capturing_graphs → serving

Until `serving`, /health and /ready answer 503 with the phase (n/N GB while downloading) and Retry-After, the API
routes answer 503 `starting`, /metrics exports `dsv2_startup_phase{phase}` and `dsv2_startup_progress_ratio`, and
the log shows each phase and the hub's own progress bars.

Downloading is ours (huggingface_hub's `snapshot_download`, only when --model is a repo id). The engine's phases
happen in vLLM's engine-core and worker processes; `PhaseReporter`, installed there by the model plugin when
DSV2_STARTUP_STATUS names a file, maps vLLM's own log lines to phases and writes the latest to that file, which
`watch_engine` reads. CUDA graphs are captured only on CUDA without --enforce-eager: a CPU start goes from
compiling straight to serving. This module imports nothing heavy: the plugin loads it in every vLLM process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("dsv2.startup")

PHASES = ("downloading", "loading_weights", "compiling", "capturing_graphs", "serving")
STATUS_ENV = "DSV2_STARTUP_STATUS"
RETRY_AFTER_S = 5
LOG_PROGRESS_EVERY_S = 5.0
WATCH_EVERY_S = 0.25
# Only these files of a repo: what vLLM loads (config, weights, tokenizer, chat template, model code).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.model", "*.jinja", "*.txt"]

# vLLM 0.32's log lines (engine core and workers) that open a phase; the first match wins.
_MARKERS = (
    ("Starting to load model", "loading_weights"),  # v1 GPU and CPU model runners
    ("Loading model from scratch", "loading_weights"),  # v2 GPU model runner
    ("Loading weights took", "compiling"),
    ("Model loading took", "compiling"),
    # "Rank 0: Torch profiler enabled (or disabled) for CUDA graph capture", as capturing starts
    ("for CUDA graph capture", "capturing_graphs"),
    ("Capturing CUDA graphs", "capturing_graphs"),
)


class Startup:
    """Where start-up is: the phase, its progress (0..1, None when unknown), a detail for people, and the error
    that ended it. Phases only move forward."""

    def __init__(self, metrics: Any, first_phase: str) -> None:
        self.metrics = metrics
        self.started_at = time.monotonic()
        self.phase = ""
        self.progress: float | None = None
        self.detail = ""
        self.error: str | None = None
        self.enter(first_phase)

    @property
    def serving(self) -> bool:
        return self.phase == "serving"

    def enter(self, phase: str, detail: str = "") -> None:
        if self.phase and PHASES.index(phase) <= PHASES.index(self.phase):
            return
        self.phase, self.progress, self.detail = phase, None, detail
        for name in PHASES:
            self.metrics.startup_phase.labels(name).set(1 if name == phase else 0)
        self.metrics.startup_progress.set(0)
        log.info("start-up: %s after %.1f s%s", phase, self.elapsed(), f" ({detail})" if detail else "")

    def downloaded(self, done: float, total: float) -> None:
        self.progress = done / total if total else None
        self.detail = f"{_size(done)}/{_size(total)}"
        self.metrics.startup_downloaded.set(done)
        self.metrics.startup_download_size.set(total)
        self.metrics.startup_progress.set(self.progress or 0)

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def describe(self) -> str:
        return f"{self.phase.replace('_', ' ')}{f' {self.detail}' if self.detail else ''}"


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def is_local(model: str) -> bool:
    """A directory (or anything path-like) is served as is; anything else is a hub repo id to download."""
    return Path(model).expanduser().exists() or model.startswith(("/", ".", "~"))


def download(repo: str, revision: str | None, download_dir: str | None, startup: Startup) -> str:
    """Download `repo` (only DOWNLOAD_PATTERNS) and return its local directory; runs in a worker thread. The hub's
    own byte bar is shown in the log; its counts feed `startup`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import tqdm as hub_tqdm

    local_dir = str(Path(download_dir, repo, revision or "main")) if download_dir else None
    kwargs = dict(repo_id=repo, revision=revision, local_dir=local_dir, allow_patterns=DOWNLOAD_PATTERNS)
    try:
        files = snapshot_download(**kwargs, dry_run=True)
    except (
        Exception
    ) as exc:  # offline, or the hub unreachable: a complete pinned download on disk still serves
        log.warning("cannot list %s on the hub (%s): using the files on disk", repo, exc)
        return snapshot_download(**kwargs)
    total = sum(f.file_size or 0 for f in files)
    missing = sum(f.file_size or 0 for f in files if f.will_download)
    state = {"done": total - missing, "logged": time.monotonic()}
    startup.downloaded(state["done"], total)
    log.info("downloading %s@%s: %d files, %s, %s to fetch", repo, revision or "main", len(files), _size(total),
             _size(missing))  # fmt: skip

    class Progress(hub_tqdm):
        """The hub's progress bars (drawn on a terminal only), counting the bytes written: the largest count of
        any byte bar; a log line every LOG_PROGRESS_EVERY_S for logs that are not a terminal."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.counts_bytes = kwargs.get("unit") == "B"
            self.counted = kwargs.get("initial") or 0
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts_bytes:
                self.counted += n or 0
                state["done"] = max(state["done"], min(total, total - missing + self.counted))
                startup.downloaded(state["done"], total)
                if time.monotonic() - state["logged"] > LOG_PROGRESS_EVERY_S:
                    state["logged"] = time.monotonic()
                    log.info(
                        "downloading %s: %s (%.0f%%)", repo, startup.detail, 100 * (startup.progress or 0)
                    )
            return super().update(n)

    path = snapshot_download(**kwargs, tqdm_class=Progress)
    startup.downloaded(total, total)
    return path


async def watch_engine(startup: Startup, status_file: Path) -> None:
    """Forever: follow the phase the engine's processes report in `status_file`."""
    while True:
        await asyncio.sleep(WATCH_EVERY_S)
        try:
            phase = json.loads(status_file.read_text())["phase"]
        except (OSError, ValueError, KeyError):
            continue
        if phase in PHASES:
            startup.enter(phase)


class PhaseReporter(logging.Handler):
    """In vLLM's processes: a log handler that writes the phase a known log line opens to the status file
    (atomically; the furthest phase wins across processes and ranks)."""

    def __init__(self, status_file: str) -> None:
        super().__init__(logging.INFO)
        self.path = Path(status_file)
        self.phase = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        phase = next((p for marker, p in _MARKERS if marker in message), None)
        if phase is None or (self.phase and PHASES.index(phase) <= PHASES.index(self.phase)):
            return
        self.phase = phase
        try:
            current = json.loads(self.path.read_text()).get("phase", "")
            if current in PHASES and PHASES.index(current) >= PHASES.index(phase):
                return
        except (OSError, ValueError):
            pass
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"phase": phase, "pid": os.getpid()}))
            os.replace(tmp, self.path)
        except OSError:
            pass


def install_phase_reporter() -> None:
    """Called by the model plugin in every vLLM process: report phases when the server asked for them."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    vllm_logger = logging.getLogger("vllm")
    if any(isinstance(h, PhaseReporter) for h in vllm_logger.handlers):
        return
    vllm_logger.addHandler(PhaseReporter(path))
