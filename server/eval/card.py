"""The model card's evaluation table as data (server/data/model_card_eval.json), and which lm-eval task and metric
measure each of its rows for the base or the Chat model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CARD_FILE = Path(__file__).resolve().parent.parent / "data" / "model_card_eval.json"
VARIANTS = ("base", "chat")


@dataclass(frozen=True)
class Measure:
    """One task to run: the lm-eval task, the metric read from its results, and the card's number (points) if
    the card has this task."""

    name: str  # the card's key ("mmlu") or, for a task the card lacks, the lm-eval task name
    task: str  # lm-eval task or group name
    metric: str | None  # lm-eval "metric,filter" key; None = the task's first metric
    shots: int | None  # None = the task's own default
    card: float | None  # points (0-100); None = not on the card
    runs_code: bool = False  # executes the model's code (HumanEval, MBPP)


def load_card(path: str | Path = CARD_FILE) -> dict:
    card = json.loads(Path(path).read_text())
    for key, row in card["tasks"].items():
        missing = {"card", "lm_eval", "shots"} - row.keys()
        if missing:
            raise ValueError(f"{path}: task {key!r} lacks {sorted(missing)}")
    return card


def variant_for(model: str) -> str:
    """The card column a served model name most likely answers to: "chat" when the name says so."""
    return "chat" if "chat" in model.lower() or "instruct" in model.lower() else "base"


def resolve(names: list[str], variant: str, card: dict) -> list[Measure]:
    """Task names as a user writes them (a card row such as "mmlu" or "C-Eval", or any lm-eval task name) ->
    what to run. A card row's lm-eval task name ("ceval-valid") also finds the row."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rows = {key: row for key, row in card["tasks"].items() if variant in row["lm_eval"]}
    by_alias: dict[str, str] = {}
    for key, row in rows.items():
        aliases = (key, key.replace("-", ""), row.get("benchmark", key), row["lm_eval"][variant]["task"])
        for alias in aliases:
            by_alias.setdefault(alias.lower(), key)
    out = []
    for name in names:
        key = by_alias.get(name.lower())
        if key is None:
            out.append(Measure(name=name, task=name, metric=None, shots=None, card=None))
            continue
        row = rows[key]
        spec = row["lm_eval"][variant]
        out.append(
            Measure(
                name=key,
                task=spec["task"],
                metric=spec.get("metric"),
                shots=row["shots"],
                card=row["card"].get(variant),
                runs_code=bool(row.get("runs_code", False)),
            )
        )
    return out
