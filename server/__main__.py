"""Command line: `python -m server serve --model PATH [...]`, `python -m server tiny-model OUT_DIR [...]`,
`python -m server tiny-lora OUT_DIR --base DIR` and `python -m server eval --target URL [...]`."""

from __future__ import annotations

import argparse
import sys

from server import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server", description="dsv2-serve: DeepSeek-V2 behind the OpenAI API."
    )
    parser.add_argument("--version", action="version", version=f"dsv2-serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from server.settings import add_serve_arguments

    serve = sub.add_parser(
        "serve",
        help="Serve a DeepSeek-V2 model over the OpenAI API.",
        description="Serve a DeepSeek-V2 model over the OpenAI API. Flags not listed here are passed to vLLM's "
        "engine arguments (e.g. --enable-prefix-caching, --kv-cache-dtype fp8, --max-num-seqs 128).",
    )
    add_serve_arguments(serve)

    tiny = sub.add_parser(
        "tiny-model", help="Write a tiny random-weight DeepSeek-V2 checkpoint for tests and demos."
    )
    tiny.add_argument("out_dir", help="Directory to write the checkpoint to.")
    tiny.add_argument(
        "--seed", type=int, default=0, help="Random seed; the same seed writes byte-identical files."
    )
    tiny.add_argument(
        "--variant",
        choices=["lite", "v2"],
        default="lite",
        help="lite = DeepSeek-V2-Lite layout; v2 = full DeepSeek-V2 layout (q compression, group-limited routing).",
    )
    tiny.add_argument(
        "--real-widths",
        action="store_true",
        help="DeepSeek-V2-Lite's true shapes (hidden 2048, 64 experts x 1408, vocabulary 102400) with 2 layers "
        "(~2.2 GB in bf16) instead of the tiny widths.",
    )
    tiny.add_argument(
        "--layers", type=int, default=None, help="Number of layers (default: 3 tiny, 2 with --real-widths)."
    )
    tiny.add_argument(
        "--awq", action="store_true", help="Write 4-bit AWQ (AutoAWQ GEMM layout, group size 64)."
    )
    tiny.add_argument(
        "--awq-group-size", type=int, choices=[64, 128], default=64, help="AWQ group size (with --awq)."
    )
    tiny.add_argument(
        "--awq-skip",
        action="append",
        default=[],
        metavar="NAME",
        help="With --awq: leave linears whose name contains NAME in fp16 (AutoAWQ's modules_to_not_convert); "
        "repeatable.",
    )
    tiny.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of unquantised tensors.",
    )

    lora = sub.add_parser(
        "tiny-lora",
        help="Write a random peft LoRA adapter for a checkpoint (to try --lora-modules).",
        description="Write a random peft LoRA adapter (adapter_config.json + adapter_model.safetensors) for the "
        "checkpoint in --base: q_proj, o_proj and the dense and shared-expert MLPs, strong enough to change the "
        "output.",
    )
    lora.add_argument("out_dir", help="Directory to write the adapter to.")
    lora.add_argument(
        "--base", required=True, help="The checkpoint the adapter is for (a tiny-model directory)."
    )
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank r.")
    lora.add_argument("--seed", type=int, default=1, help="Random seed.")

    from server.eval.cli import add_arguments as add_eval_arguments

    evaluate = sub.add_parser(
        "eval",
        help="Score a running server with lm-eval beside the model card's numbers (docs/eval.md).",
        description="Run lm-eval against a running server (loglikelihood tasks through /v1/completions, generative "
        "ones through /v1/chat/completions for the Chat model) and print, and write as JSON and a PNG chart, "
        "each task's score beside the model card's with a verdict. Needs the eval extra: "
        "pip install -e '.[eval]'.",
    )
    add_eval_arguments(evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "tiny-model":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from server.tiny_model import write_tiny_model

        if (args.awq_skip or args.awq_group_size != 64) and not args.awq:
            parser.error("--awq-group-size and --awq-skip need --awq")
        out = write_tiny_model(
            args.out_dir,
            seed=args.seed,
            variant=args.variant,
            awq=args.awq,
            dtype=args.dtype,
            real_widths=args.real_widths,
            layers=args.layers,
            awq_group_size=args.awq_group_size,
            awq_skip=tuple(args.awq_skip),
        )
        kind = ", ".join(
            [args.variant]
            + (["real widths"] if args.real_widths else [])
            + ([f"awq g{args.awq_group_size}"] if args.awq else [])
        )
        print(f"wrote DeepSeek-V2 ({kind}) checkpoint to {out}")
        return 0

    if args.command == "tiny-lora":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from server.tiny_model import write_tiny_lora

        out = write_tiny_lora(args.out_dir, args.base, seed=args.seed, rank=args.rank)
        print(f"wrote a rank-{args.rank} LoRA adapter for {args.base} to {out}")
        return 0

    if args.command == "eval":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from server.eval.cli import main as eval_main

        return eval_main(args)

    from pydantic import ValidationError

    from server.settings import settings_from_args

    try:
        settings = settings_from_args(args, extra)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            print(f"error: --{field.replace('_', '-')}: {msg}" if field else f"error: {msg}", file=sys.stderr)
        return 2

    from server.gateway.app import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
