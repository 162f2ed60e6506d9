"""Pictures of a rate sweep: PNG plots and a report.html that shows them with the numbers.

    python loadtests/report.py reports/loadtest     # redraw from sweep.json and requests.jsonl in that folder

The locustfile calls `render` when a sweep ends; drawing needs matplotlib (the `loadtest` extra), and without
it the run still writes sweep.json and says how to draw the plots later.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any

PLOTS = {
    "throughput.png": "Throughput vs offered rate",
    "ttft.png": "Time to first token vs rate",
    "tpot.png": "Time per output token vs rate",
    "latency_hist.png": "End-to-end latency, per rate",
}
COLUMNS = (
    ("rate", "rate (req/s)"),
    ("requests", "requests"),
    ("failures", "failures"),
    ("request_s", "done/s"),
    ("input_tok_s", "input tok/s"),
    ("output_tok_s", "output tok/s"),
    ("ttft_ms", "TTFT p50 / p90 / p99 (ms)"),
    ("tpot_ms", "TPOT p50 / p90 / p99 (ms)"),
    ("itl_ms", "ITL p50 / p90 / p99 (ms)"),
    ("e2e_ms", "E2E p50 / p90 / p99 (ms)"),
    ("goodput", "goodput"),
)


def render(
    out: Path, rows: list[dict[str, Any]], requests: list[dict[str, Any]], title: str = ""
) -> list[Path]:
    """Write the PNGs and report.html into `out`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rates = [row["rate"] for row in rows]
    written = []

    def save(fig: Any, name: str) -> None:
        fig.suptitle(PLOTS[name])
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rates, rates, ":", color="grey", label="offered")
    left.plot(rates, [row["request_s"] for row in rows], "o-", label="completed")
    left.plot(rates, [row["good_request_s"] for row in rows], "s--", label="within SLOs (goodput)")
    left.set(xlabel="offered rate (req/s)", ylabel="requests/s")
    left.legend()
    right.plot(rates, [row["output_tok_s"] for row in rows], "o-", label="output")
    right.plot(rates, [row["input_tok_s"] for row in rows], "s--", label="input")
    right.set(xlabel="offered rate (req/s)", ylabel="tokens/s")
    right.legend()
    save(fig, "throughput.png")

    for name, key in (("ttft.png", "ttft_ms"), ("tpot.png", "tpot_ms")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(rates, [row[key][q] for row in rows], style, label=q)
        ax.set(xlabel="offered rate (req/s)", ylabel="ms")
        ax.legend()
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6, 4))
    e2e = {rate: [r["e2e_ms"] for r in requests if r["rate"] == rate and r["ok"]] for rate in rates}
    every = [x for xs in e2e.values() for x in xs]
    if every:  # the same bins for every rate, so the shapes compare
        low, high = min(every), max(every)
        bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 1
        for rate, xs in e2e.items():
            ax.hist(xs, bins=bins, histtype="step", linewidth=1.5, label=f"{rate:g} req/s")
        ax.legend()
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="end-to-end latency (ms)", ylabel="requests")
    save(fig, "latency_hist.png")

    (out / "report.html").write_text(_html(rows, title), encoding="utf-8")
    return [*written, out / "report.html"]


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return " / ".join("–" if value.get(q) is None else f"{value[q]:.1f}" for q in ("p50", "p90", "p99"))
    if isinstance(value, float):
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return str(value)


def _html(rows: list[dict[str, Any]], title: str) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row[key]))}</td>" for key, _ in COLUMNS) + "</tr>"
        for row in rows
    )
    slos = rows[0].get("slos_ms") if rows else None
    note = ", ".join(f"{k.removesuffix('_ms')} <= {v:g} ms" for k, v in (slos or {}).items()) or "none given"
    figures = "".join(
        f'<figure><img src="{name}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, caption in PLOTS.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Rate sweep {html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}</style>
</head><body>
<h1>Rate sweep {html.escape(title)}</h1>
<p>Open-loop arrivals ({html.escape(str(rows[0]["arrival"]) if rows else "")}); goodput SLOs per request: {html.escape(note)}.
Numbers from <code>sweep.json</code>; every request in <code>requests.jsonl</code>.</p>
<table><tr>{head}</tr>{body}</table>
{figures}
</body></html>
"""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = Path(argv[0])
    rows = json.loads((out / "sweep.json").read_text())
    requests_path = out / "requests.jsonl"
    requests = (
        [json.loads(line) for line in requests_path.read_text().splitlines()]
        if requests_path.exists()
        else []
    )
    for path in render(out, rows, requests):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
