"""`python -m server eval`: lm-eval against a running server, each task beside the model card's number.

    python -m server eval --target http://127.0.0.1:8000 --tasks mmlu,gsm8k --limit 200
    python -m server eval --compare reports/bf16/eval.json reports/awq/eval.json

Exit status: 0 when every task ran and none scored below the card's tolerance; 1 when one scored below; 2 for a
usage error, an unreachable server, or a task that could not run (the others still run and are reported).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from pathlib import Path

from server.eval import card as cards
from server.eval import report
from server.eval.verdict import ERROR, K_STDERR, SKIPPED, judge

DEFAULT_OUT = "reports/eval"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target", help="The server's URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)."
    )
    p.add_argument("--model", help="The served model name to evaluate (default: the first of /v1/models).")
    p.add_argument(
        "--tasks",
        default=",".join(cards.load_card()["tasks"]),
        help="Comma-separated: the card's rows (mmlu, bbh, c-eval, cmmlu, humaneval, mbpp, gsm8k, math) and/or "
        "any lm-eval task or group, including those under --include-path (default: every card row).",
    )
    p.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="Items per task (per subtask of a group such as mmlu); a number below 1 is a share. Default: all.",
    )
    p.add_argument(
        "--include-path",
        help="A directory of your own lm-eval task definitions (YAML), e.g. a private JSONL set (docs/eval.md).",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="The server's API key (default: $OPENAI_API_KEY).",
    )
    p.add_argument(
        "--card",
        choices=cards.VARIANTS,
        help="Which card column to hold the server to (default: chat when the model name contains 'chat' or "
        "'instruct', else base). It also picks the route of generative tasks (docs/eval.md).",
    )
    p.add_argument(
        "--card-file",
        default=str(cards.CARD_FILE),
        help="The card's table (default: DeepSeek-V2-Lite's, server/data/model_card_eval.json); your own in the "
        "same format holds a private task to your own reference numbers.",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="Hugging Face id or directory of the served model's tokenizer, to count tokens for loglikelihoods "
        "and to apply the chat template where the chat API cannot (default: deepseek-ai/DeepSeek-V2-Lite-Chat, "
        "which all DeepSeek-V2-Lite checkpoints share).",
    )
    p.add_argument("--num-concurrent", type=int, default=8, help="Requests in flight at once (default: 8).")
    p.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="Run the model's code for HumanEval and MBPP on this machine (skipped without it).",
    )
    p.add_argument(
        "--out", default=DEFAULT_OUT, help=f"Directory for eval.json and eval.png (default: {DEFAULT_OUT})."
    )
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="Also write every item's prompt and answer (samples.jsonl).",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="Put two earlier runs side by side (e.g. bf16 and AWQ): B - A in points per task. No --target.",
    )


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return int(value) if value >= 1 else value


def main(args: argparse.Namespace) -> int:
    if args.compare:
        return compare_main(*args.compare, out=Path(args.out))
    if not args.target:
        print("error: --target (the server's URL) is required, or --compare A.json B.json", file=sys.stderr)
        return 2
    try:
        return run_main(args)
    # bad task names or files; the server unreachable (URLError is an OSError)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_main(args: argparse.Namespace) -> int:
    from server.eval import harness

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    models = harness.server_models(args.target, args.api_key)
    listed = {m["id"]: m for m in models}
    model = args.model or models[0]["id"]
    if model not in listed:
        raise ValueError(f"--model {model!r} is not served at {args.target} (it serves {', '.join(listed)})")
    variant = args.card or cards.variant_for(model)
    card = cards.load_card(args.card_file)
    measures = cards.resolve([t.strip() for t in args.tasks.split(",") if t.strip()], variant, card)
    target = harness.Target(
        url=args.target,
        model=model,
        tokenizer=args.tokenizer or harness.DEFAULT_TOKENIZER,
        max_length=int(listed[model].get("max_model_len") or 2048),
        api_key=args.api_key,
        num_concurrent=args.num_concurrent,
    )
    if args.allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # Hugging Face `evaluate`'s code_eval runs nothing without it
    runnable = [m for m in measures if not (m.runs_code and not args.allow_code_execution)]
    tm = harness.task_manager([m.task for m in runnable], args.include_path) if runnable else None
    print(
        f"evaluating {model} at {harness.root_url(args.target)} against the {variant} model's card",
        flush=True,
    )

    rows, samples = [], {}
    for m in measures:
        if m not in runnable:
            rows.append(_row(m, None, note="runs the model's code: pass --allow-code-execution"))
            continue
        try:
            loaded = harness.load_task(m, tm)
            route = harness.route_for(loaded, variant)
            lm = harness.served_lm(target, route)
            run = harness.evaluate(lm, loaded, m, route, args.limit, args.allow_code_execution)
        except Exception as exc:  # one task that cannot run (a dataset, a metric, the server) spoils no other
            logging.getLogger(__name__).exception("%s failed", m.name)
            rows.append({**_row(m, None, note=f"{type(exc).__name__}: {exc}"), "verdict": ERROR})
            print(f"  {m.name}: error: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append(_row(m, run))
        samples[m.name] = run.samples
        r = rows[-1]
        print(
            f"  {m.name}: {r['score']:.1f} ± {r['stderr'] or 0:.1f} ({r['verdict']}, {run.seconds:.0f} s)",
            flush=True,
        )

    out = Path(args.out)
    title = f"{model} ({variant} card) at {harness.root_url(args.target)}" + (
        f", limit {args.limit}" if args.limit else ""
    )
    result = {
        "target": harness.root_url(args.target),
        "model": model,
        "variant": variant,
        "limit": args.limit,
        "k_stderr": K_STDERR,
        "tokenizer": target.tokenizer,
        "card_file": str(args.card_file),
        "card_source": card.get("source"),
        "lm_eval_version": _lm_eval_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tasks": rows,
    }
    print()
    print(report.table(rows))
    json_path = report.write_json(out / "eval.json", result)
    png_path = report.write_chart(out / "eval.png", rows, title)
    if args.log_samples:
        _write_samples(out / "samples.jsonl", samples)
    print(f"\nwrote {json_path} and {png_path}")
    bad, broken = report.failed(rows), report.errored(rows)
    if bad:
        print(f"below the card by more than {K_STDERR:g} standard errors: {', '.join(bad)} (docs/eval.md)")
    if broken:
        print(f"could not run: {', '.join(broken)} (the log above says why)")
        return 2
    return 1 if bad else 0


def _row(m: cards.Measure, run, note: str | None = None) -> dict:
    score = run.score if run else None
    stderr = run.stderr if run else None
    v = judge(score, stderr, m.card)
    return {
        "name": m.name,
        "task": m.task,
        "route": run.route if run else None,
        "metric": run.metric if run else m.metric,
        "shots": m.shots,
        "n": run.n if run else None,
        "seconds": round(run.seconds, 1) if run else None,
        "card": m.card,
        "score": score,
        "stderr": stderr,
        "delta": v.delta,
        "tolerance": v.tolerance,
        "verdict": v.verdict if run else SKIPPED,
        "note": note,
        "metrics": run.metrics if run else {},
    }


def _write_samples(path: Path, samples: dict) -> None:
    import json

    with open(path, "w") as f:
        for name, by_task in samples.items():
            for task, items in by_task.items():
                for item in items:
                    f.write(
                        json.dumps({"name": name, "task": task, **item}, default=str, ensure_ascii=False)
                        + "\n"
                    )


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def compare_main(a_path: str, b_path: str, out: Path) -> int:
    try:
        a, b = report.read_json(a_path), report.read_json(b_path)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a_label, b_label = Path(a_path).parent.name or "A", Path(b_path).parent.name or "B"
    if a_label == b_label:
        a_label, b_label = Path(a_path).stem, Path(b_path).stem
    rows = report.compare(a, b)
    print(f"A = {a_path} ({a.get('model')}), B = {b_path} ({b.get('model')}); points, ± 1 standard error")
    print(report.compare_table(rows, a_label, b_label))
    json_path = report.write_json(out / "compare.json", {"a": str(a_path), "b": str(b_path), "tasks": rows})
    png_path = report.write_compare_chart(out / "compare.png", rows, a_label, b_label)
    print(f"\nwrote {json_path} and {png_path}")
    return 0
