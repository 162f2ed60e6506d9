"""Results as a table, a JSON file and a PNG bar chart; and two runs side by side (`--compare`).

A row (one task) is a plain dict, the same in the JSON file and in memory:
  name, task, route, metric, shots, n, seconds, card, score, stderr, delta, tolerance, verdict, metrics
with card/score/stderr/delta/tolerance in points (0-100) and None where they do not apply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from server.eval.verdict import BELOW, ERROR, FAILING, K_STDERR, NO_CARD, SKIPPED


def _pts(value: float | None, width: int = 6) -> str:
    return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"


def table(rows: list[dict]) -> str:
    head = f"{'task':<14} {'card':>6} {'measured':>15} {'delta':>7} {'allowed':>8}  {'verdict':<8} {'n':>6} {'time':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        measured = (
            f"{r['score']:6.1f} ± {r['stderr']:5.1f}"
            if r["score"] is not None and r["stderr"] is not None
            else _pts(r["score"], 15)
        )
        delta = f"{r['delta']:+7.1f}" if r["delta"] is not None else f"{'-':>7}"
        allowed = f"{0.0 - r['tolerance'] + 0.0:8.1f}" if r["tolerance"] is not None else f"{'-':>8}"
        n = str(r["n"]) if r["n"] is not None else "-"
        secs = f"{r['seconds']:6.0f}s" if r["seconds"] is not None else f"{'-':>7}"
        lines.append(
            f"{r['name']:<14} {_pts(r['card'])} {measured:>15} {delta} {allowed}  {r['verdict']:<8} {n:>6} {secs}"
        )
    return "\n".join(lines)


def failed(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows if r["verdict"] in FAILING]


def errored(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows if r["verdict"] == ERROR]


def write_json(path: Path, report: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def read_json(path: str | Path) -> dict:
    report = json.loads(Path(path).read_text())
    if "tasks" not in report:
        raise ValueError(f"{path}: not a `python -m server eval` report (no 'tasks')")
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {
    "card": "#9aa5b1",
    BELOW: "#d64545",
    ERROR: "#d64545",
    NO_CARD: "#5b7db1",
    SKIPPED: "#cccccc",
    "ok": "#3f9c5a",
}


def write_chart(path: Path, rows: list[dict], title: str) -> Path:
    """Card beside measured per task; the measured bar's whisker is K standard errors, its colour the verdict."""
    plt = _pyplot()
    shown = [r for r in rows if r["score"] is not None or r["card"] is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(shown) + 2), 4.5))
    xs = range(len(shown))
    width = 0.38
    cards = [r["card"] if r["card"] is not None else 0.0 for r in shown]
    ax.bar([x - width / 2 for x in xs], cards, width, color=COLORS["card"], label="model card")
    scores = [r["score"] if r["score"] is not None else 0.0 for r in shown]
    errs = [K_STDERR * r["stderr"] if r["stderr"] is not None else 0.0 for r in shown]
    colors = [COLORS.get(r["verdict"], COLORS["ok"]) for r in shown]
    ax.bar([x + width / 2 for x in xs], scores, width, yerr=errs, capsize=3, color=colors, label="measured")
    for x, r in zip(xs, shown, strict=True):
        ax.annotate(
            r["verdict"], (x + width / 2, (r["score"] or 0.0) + K_STDERR * (r["stderr"] or 0.0)), ha="center",
            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points",
        )  # fmt: skip
    ax.set_xticks(list(xs), [r["name"] for r in shown], rotation=20)
    ax.set_ylabel(f"score (points; whisker ±{K_STDERR:g} s.e.)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- two runs side by side ------------------------------------------------------------------------------------


def compare(a: dict, b: dict) -> list[dict]:
    """Per task of either run: the card, both scores, and b - a in points with its standard error (the two
    runs' errors combined as if independent; on the same items the true error is smaller)."""
    ra = {r["name"]: r for r in a["tasks"]}
    rb = {r["name"]: r for r in b["tasks"]}
    rows = []
    for name in list(ra) + [n for n in rb if n not in ra]:
        x, y = ra.get(name, {}), rb.get(name, {})
        sa, sb = x.get("score"), y.get("score")
        ea, eb = x.get("stderr"), y.get("stderr")
        delta = sb - sa if sa is not None and sb is not None else None
        se = math.hypot(ea, eb) if delta is not None and ea is not None and eb is not None else None
        rows.append(
            {
                "name": name,
                "card": x.get("card", y.get("card")),
                "a": sa,
                "a_stderr": ea,
                "b": sb,
                "b_stderr": eb,
                "delta": delta,
                "delta_stderr": se,
                "n": (x.get("n"), y.get("n")),
            }
        )
    return rows


def compare_table(rows: list[dict], a_label: str, b_label: str) -> str:
    head = f"{'task':<14} {'card':>6} {a_label[:15]:>15} {b_label[:15]:>15} {'b - a':>15}"
    lines = [head, "-" * len(head)]

    def pm(v: float | None, e: float | None, sign: str = "") -> str:
        if v is None:
            return "-"
        return f"{v:{sign}6.1f} ± {e:4.1f}" if e is not None else f"{v:{sign}6.1f}"

    for r in rows:
        lines.append(
            f"{r['name']:<14} {_pts(r['card'])} {pm(r['a'], r['a_stderr']):>15} {pm(r['b'], r['b_stderr']):>15} "
            f"{pm(r['delta'], r['delta_stderr'], '+'):>15}"
        )
    return "\n".join(lines)


def write_compare_chart(path: Path, rows: list[dict], a_label: str, b_label: str) -> Path:
    plt = _pyplot()
    rows = [r for r in rows if r["a"] is not None or r["b"] is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(rows) + 2), 4.5))
    width = 0.27
    xs = range(len(rows))
    for i, (key, label, color) in enumerate(
        [("card", "model card", COLORS["card"]), ("a", a_label, "#5b7db1"), ("b", b_label, "#e08a3c")]
    ):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        errs = None if key == "card" else [r[f"{key}_stderr"] or 0.0 for r in rows]
        ax.bar([x + (i - 1) * width for x in xs], vals, width, yerr=errs, capsize=2, color=color, label=label)
    for x, r in zip(xs, rows, strict=True):
        if r["delta"] is not None:
            # delta is set only where both runs have a score
            top = max(r["card"] or 0.0, r["a"] + (r["a_stderr"] or 0.0), r["b"] + (r["b_stderr"] or 0.0))
            ax.annotate(f"{r['delta']:+.1f}", (x, top), ha="center", va="bottom", fontsize=8, xytext=(0, 6),
                        textcoords="offset points")  # fmt: skip
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=20)
    ax.set_ylabel("score (points; whisker ±1 s.e.; label: b - a)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
