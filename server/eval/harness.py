"""lm-eval against a running server: which endpoint answers a task, the lm-eval model that speaks to it, and
one lm-eval `evaluate()` per task (each task keeps its own shot count and its own timing).

Routes, decided from the task's output type and the card column:
- loglikelihood and multiple-choice tasks: `/v1/completions` with token-id prompts, `echo` and `logprobs`
  (the prompt's logprobs), BOS first as DeepSeek's tokenizer adds it; never a chat template;
- generative tasks of the base model: `/v1/completions`, the same prompts;
- generative tasks of the Chat model: `/v1/chat/completions`, so the server's own chat template is under test,
  the few-shot examples as earlier turns. A task whose prompt ends inside the assistant's turn (lm-eval's
  `gen_prefix`: humaneval_instruct, mbpp_instruct) cannot be sent there (the chat API has no assistant prefill),
  so it goes to `/v1/completions` with the checkpoint tokenizer's chat template applied here.

lm-eval is imported only inside the functions: `python -m server` must not pay for it.
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.eval.card import Measure

COMPLETIONS = "completions"  # /v1/completions, plain prompt
CHAT = "chat"  # /v1/chat/completions, the server's template
TEMPLATED_COMPLETIONS = "completions+template"  # /v1/completions, the tokenizer's template applied here

# Both DeepSeek-V2-Lite checkpoints (and AWQ exports of them) share this tokenizer; the Chat repo's also carries
# the chat template that TEMPLATED_COMPLETIONS needs.
DEFAULT_TOKENIZER = "deepseek-ai/DeepSeek-V2-Lite-Chat"
SEED = 1234  # lm-eval's default sampling and few-shot seed


@dataclass(frozen=True)
class Target:
    """A running server, as lm-eval's API models reach it."""

    url: str  # the server's root: http://host:port
    model: str  # served model name
    tokenizer: (
        str  # Hugging Face id or directory: token counts for loglikelihoods, templates for the Chat model
    )
    max_length: int = 2048  # the server's context (max_model_len)
    api_key: str | None = None
    num_concurrent: int = 8
    timeout_s: int = 600


@dataclass
class TaskRun:
    """One task's outcome. score/stderr in points (0-100); metrics as lm-eval reports them (fractions)."""

    task: str
    route: str
    metric: str
    score: float
    stderr: float | None
    n: int
    seconds: float
    metrics: dict[str, Any]
    samples: dict[str, list[dict]] = field(default_factory=dict, repr=False)


def root_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all name the same server."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def server_models(url: str, api_key: str | None = None, timeout_s: float = 30) -> list[dict]:
    """The server's /v1/models list (ids and max_model_len)."""
    req = urllib.request.Request(f"{root_url(url)}/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())["data"]


def task_manager(names: list[str], include_path: str | Path | None = None):
    """lm-eval's task index. Indexing lm-eval's own ~10,000 task files takes a while: when every task asked
    for is in `include_path`, only that directory is indexed."""
    from lm_eval.tasks import TaskManager

    path = str(include_path) if include_path is not None else None
    if path is not None:
        local = TaskManager(include_path=path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = TaskManager(include_path=path)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        where = f"lm-eval's tasks or {path}" if path else "lm-eval's tasks (add your own with --include-path)"
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: not in {where}")
    return tm


def load_task(measure: Measure, tm) -> dict:
    """The task (or group) as lm-eval builds it, datasets loaded ({"tasks": {name: Task}, "groups": ...}), with
    the card's shot count and lm-eval's fixed few-shot seed on every subtask."""
    loaded = tm.load([measure.task])
    for task in loaded["tasks"].values():
        if measure.shots is not None and task.get_config("num_fewshot") != measure.shots:
            task.set_config(key="num_fewshot", value=measure.shots)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=SEED)
    return loaded


def route_for(loaded: dict, variant: str) -> str:
    """Which endpoint answers the task (module docstring)."""
    tasks = list(loaded["tasks"].values())
    generative = [t.get_config("output_type") == "generate_until" for t in tasks]
    if any(generative) and not all(generative):
        raise ValueError("a group mixing generative and loglikelihood tasks: run its subtasks one by one")
    if not all(generative) or variant == "base":
        return COMPLETIONS
    if any(t.get_config("gen_prefix") for t in tasks):
        return TEMPLATED_COMPLETIONS
    return CHAT


def adds_bos(route: str) -> bool:
    """Whether lm-eval must put BOS first itself: a chat template writes its own."""
    return route == COMPLETIONS


def served_lm(target: Target, route: str):
    """lm-eval's OpenAI-compatible model for `route`, sending the target's key."""
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    common = dict(
        model=target.model,
        num_concurrent=target.num_concurrent,
        max_retries=3,
        timeout=target.timeout_s,
        max_length=target.max_length,
        seed=SEED,
        # without it lm-eval sends $OPENAI_API_KEY
        header={"Authorization": f"Bearer {target.api_key}"} if target.api_key else None,
    )
    if route == CHAT:
        return LocalChatCompletion(base_url=f"{root_url(target.url)}/v1/chat/completions", **common)
    return LocalCompletionsAPI(
        base_url=f"{root_url(target.url)}/v1/completions",
        tokenizer=target.tokenizer,
        tokenizer_backend="huggingface",
        add_bos_token=adds_bos(route),
        **common,
    )


def evaluate(
    lm,
    loaded: dict,
    measure: Measure,
    route: str,
    limit: int | float | None = None,
    allow_code: bool = False,
) -> TaskRun:
    """One task through lm-eval with `lm` (served or a local reference), per-item samples kept."""
    import numpy as np
    import torch
    from lm_eval import evaluator

    # simple_evaluate's seeds, so a run here picks what `lm_eval` on the command line would
    random.seed(0)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    chat = route != COMPLETIONS
    started = time.monotonic()
    out = evaluator.evaluate(
        lm=lm,
        task_dict=loaded,
        limit=limit,
        log_samples=True,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        confirm_run_unsafe_code=allow_code,
        bootstrap_iters=1000,
    )
    seconds = time.monotonic() - started
    if measure.task not in out["results"]:
        raise ValueError(f"{measure.task} is an lm-eval tag (no aggregate score): name a task or a group")
    metrics = out["results"][measure.task]
    metric = pick_metric(metrics, measure.metric)
    name, _, filt = metric.partition(",")
    stderr = _number(metrics.get(f"{name}_stderr,{filt}"))
    return TaskRun(
        task=measure.task,
        route=route,
        metric=metric,
        score=100 * float(metrics[metric]),
        stderr=None if stderr is None else 100 * stderr,
        n=sum(int(v["effective"]) for v in out["n-samples"].values()),
        seconds=seconds,
        metrics={k: v for k, v in metrics.items() if k != "alias"},
        samples=out.get("samples", {}),
    )


def pick_metric(metrics: dict[str, Any], preferred: str | None) -> str:
    """The card's metric if lm-eval reported it, else the first numeric "metric,filter" that is not a stderr."""
    if preferred and _number(metrics.get(preferred)) is not None:
        return preferred
    for key, value in metrics.items():
        if "," in key and "_stderr," not in key and _number(value) is not None:
            return key
    raise ValueError(f"no metric in lm-eval's results: {sorted(metrics)}")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
