"""What a request sends, and the check that it fits the server's context before the run starts.

Three workloads, one `Request` shape:
  random    prompts of exactly --input-len random token ids and exactly --output-len output tokens
            (`ignore_eos`), as vLLM's `--dataset-name random`. Token ids go to /v1/completions as they are, so
            the length is exact without a tokenizer round trip; every prompt differs from its first block on,
            so prefix caching cannot flatter TTFT.
  sharegpt  a ShareGPT-format JSON file (a list of {"conversations": [{"from": "human", "value": ...},
            {"from": "gpt", "value": ...}, ...]}): the first human turn is the prompt and the length of the
            first reply its max_tokens (or --output-len), as vLLM's ShareGPT sampler does.
  prompts   the bundled prompt mix (loadtests/prompts.jsonl): text with its own max_tokens.

A request fits when prompt tokens + max_tokens <= the server's max_model_len (vLLM's own rule; the server
refuses anything longer with a 400). Random lengths that cannot fit stop the run; dataset entries that cannot
fit are left out, and a dataset of which none fits stops the run. Counting text needs the model's tokenizer
(transformers, imported only then): without one, text prompts are sent unchecked.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Without a tokenizer, random ids come from this range: ordinary tokens in any vocabulary of at least
# 1,000 entries (special tokens sit at the very start or the very end of the ones we serve).
FALLBACK_IDS = range(100, 1000)
# Tokens the chat template adds around a message, when the tokenizer has no template to count them with.
CHAT_TEMPLATE_ALLOWANCE = 16


class WorkloadError(ValueError):
    """A workload that cannot run (it does not fit the context, a file is unreadable): the run stops with this message."""


@dataclass(frozen=True)
class Request:
    prompt: str | list[int]  # text, or token ids sent as they are
    max_tokens: int
    ignore_eos: bool = False
    system: str | None = None  # chat only
    prompt_tokens: int | None = None  # as counted before the run, when a tokenizer was available
    id: str = ""


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer (a directory or a hub id), or a WorkloadError that says how to give one."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # missing package, path or network: all mean "no tokenizer"
        raise WorkloadError(
            f"cannot load the tokenizer {name!r} ({type(exc).__name__}: {exc}); set --tokenizer / "
            "LOADTEST_TOKENIZER to the served model's directory or hub id"
        ) from exc


# ---------------------------------------------------------------------------------------------- random


def random_requests(
    input_len: int, output_len: int, max_model_len: int | None, tokenizer: Any = None, seed: int = 0
) -> Iterator[Request]:
    """An endless stream of distinct random-token prompts of exactly `input_len` tokens."""
    if input_len < 1 or output_len < 1:
        raise WorkloadError(f"input length {input_len} and output length {output_len} must both be >= 1")
    if max_model_len is not None and input_len + output_len > max_model_len:
        raise WorkloadError(
            f"input length {input_len} + output length {output_len} = {input_len + output_len} tokens does not "
            f"fit the server's context of {max_model_len} tokens (max_model_len of GET /v1/models); "
            "lower LOADTEST_INPUT_LEN / LOADTEST_OUTPUT_LEN or serve a longer --max-model-len"
        )
    if tokenizer is None:
        ids: list[int] | range = FALLBACK_IDS
    else:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
    return _random_prompts(ids, input_len, output_len, random.Random(seed))


def _random_prompts(
    ids: list[int] | range, input_len: int, output_len: int, rng: random.Random
) -> Iterator[Request]:
    n = 0
    while True:
        yield Request(
            rng.choices(ids, k=input_len),
            output_len,
            ignore_eos=True,
            prompt_tokens=input_len,
            id=f"random-{n}",
        )
        n += 1


# ---------------------------------------------------------------------------------------------- datasets


def sharegpt_requests(
    path: str | Path, tokenizer: Any = None, output_len: int | None = None
) -> list[Request]:
    """First human turn -> prompt; the reply's token count (or output_len) -> max_tokens."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkloadError(f"cannot read the ShareGPT file {path}: {exc}") from exc
    if output_len is None and tokenizer is None:
        raise WorkloadError(
            f"{path}: the reply lengths of a ShareGPT file are counted with the tokenizer; set --tokenizer / "
            "LOADTEST_TOKENIZER, or a fixed LOADTEST_OUTPUT_LEN"
        )
    out = []
    for n, item in enumerate(data if isinstance(data, list) else []):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = (t.get("value") if isinstance(t, dict) else None for t in turns[:2])
        if not isinstance(prompt, str) or not isinstance(reply, str) or not prompt:
            continue
        max_tokens = output_len or len(tokenizer(reply, add_special_tokens=False).input_ids)
        if max_tokens < 1:
            continue
        out.append(Request(prompt, max_tokens, ignore_eos=output_len is not None, id=str(item.get("id", n))))
    if not out:
        raise WorkloadError(f"{path}: no conversation with a human turn and a reply (ShareGPT format)")
    return out


def prompt_file_requests(
    prompts: list[dict[str, Any]], max_tokens_cap: int = 0, output_len: int | None = None
) -> list[Request]:
    """The bundled mix (see locustfile.load_prompts): each line's max_tokens, capped when asked, or exactly
    output_len tokens (ignore_eos)."""
    return [
        Request(
            p["prompt"],
            output_len or (min(p["max_tokens"], max_tokens_cap) if max_tokens_cap > 0 else p["max_tokens"]),
            ignore_eos=output_len is not None,
            system=p.get("system"),
            id=str(p.get("id", n)),
        )
        for n, p in enumerate(prompts)
    ]


# ---------------------------------------------------------------------------------------------- fitting


def token_counter(tokenizer: Any) -> Callable[[Request], int]:
    """Prompt tokens of a text request on either endpoint: the larger of the completion prompt and the chat
    template around it, so one count holds for both."""

    def count(r: Request) -> int:
        if isinstance(r.prompt, list):
            return len(r.prompt)
        plain = len(tokenizer(r.prompt).input_ids)
        messages = [{"role": "system", "content": r.system}] if r.system else []
        messages.append({"role": "user", "content": r.prompt})
        if getattr(tokenizer, "chat_template", None):
            chat = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        else:
            chat = sum(len(tokenizer(m["content"]).input_ids) for m in messages) + CHAT_TEMPLATE_ALLOWANCE
        return max(plain, chat)

    return count


def fit(
    requests: list[Request], max_model_len: int, count: Callable[[Request], int]
) -> tuple[list[Request], list[str]]:
    """(the requests that fit, one line per request left out); WorkloadError when none fits."""
    kept, dropped = [], []
    for r in requests:
        n = count(r)
        if n + r.max_tokens <= max_model_len:
            kept.append(Request(r.prompt, r.max_tokens, r.ignore_eos, r.system, n, r.id))
        else:
            dropped.append(
                (n + r.max_tokens, f"{r.id}: {n} prompt + {r.max_tokens} output tokens > {max_model_len}")
            )
    if not kept:
        raise WorkloadError(
            f"no prompt fits the server's context of {max_model_len} tokens (max_model_len of GET /v1/models); "
            f"{len(dropped)} left out, the shortest: {min(dropped)[1]}"
        )
    return kept, [line for _, line in dropped]
