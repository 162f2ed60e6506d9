"""Settings (flags > DSV2_* environment > defaults) and how they become vLLM engine arguments. No engine starts."""

from __future__ import annotations

import pytest

from server.__main__ import build_parser
from server.settings import Settings, settings_from_args


def parse(argv: list[str]) -> Settings:
    args, extra = build_parser().parse_known_args(["serve", *argv])
    return settings_from_args(args, extra)


def test_flags_env_and_defaults(monkeypatch, tiny_lite_dir):
    monkeypatch.setenv("DSV2_PORT", "9001")
    monkeypatch.setenv("DSV2_API_KEYS", "a, b")
    monkeypatch.setenv("DSV2_MAX_INFLIGHT_SEQUENCES", "7")
    s = parse(["--model", str(tiny_lite_dir), "--port", "9002", "--cors-origins", "https://x,https://y"])
    assert s.port == 9002  # flag beats environment
    assert s.api_keys == ["a", "b"] and s.max_inflight_sequences == 7
    assert s.cors_origins == ["https://x", "https://y"]
    assert s.model_name == tiny_lite_dir.name
    # drain_timeout is a float whose default is the literal 30: exact.
    assert s.drain_timeout == 30 and s.log_format == "text" and s.timeout_keep_alive == 75
    assert s.playground and not parse(["--model", str(tiny_lite_dir), "--no-playground"]).playground
    # the earlier flag name still sets the budget
    assert (
        parse(["--model", str(tiny_lite_dir), "--max-concurrent-requests", "3"]).max_inflight_sequences == 3
    )


def test_unknown_flags_are_engine_args(tiny_lite_dir):
    s = parse(["--model", str(tiny_lite_dir), "--enable-prefix-caching", "--max-num-seqs", "8", "-tp", "1"])
    assert s.engine_args == ["--enable-prefix-caching", "--max-num-seqs", "8"]


def test_engine_args_from_settings(tiny_lite_dir):
    from server.gateway.engine import DEFAULT_MAX_MODEL_LEN_CAP, build_engine_args

    s = parse(
        ["--model", str(tiny_lite_dir), "--served-model-name", "m", "--max-num-seqs", "8", "--seed", "3"]
    )
    args = build_engine_args(s)
    assert args.max_num_seqs == 8 and args.seed == 3 and args.served_model_name == ["m"]
    # The tiny config says 163840 like DeepSeek-V2-Lite; the default must be capped.
    assert args.max_model_len == DEFAULT_MAX_MODEL_LEN_CAP
    assert (
        build_engine_args(parse(["--model", str(tiny_lite_dir), "--max-model-len", "1024"])).max_model_len
        == 1024
    )


def test_stream_interval_is_vllms(monkeypatch, tiny_lite_dir):
    """--stream-interval (or DSV2_STREAM_INTERVAL) is vLLM's own, set on the engine's output processor."""
    from pydantic import ValidationError

    from server.gateway.engine import build_engine_args

    assert build_engine_args(parse(["--model", str(tiny_lite_dir)])).stream_interval == 1
    given = parse(["--model", str(tiny_lite_dir), "--stream-interval", "4"])
    assert build_engine_args(given).stream_interval == 4
    monkeypatch.setenv("DSV2_STREAM_INTERVAL", "8")
    assert build_engine_args(parse(["--model", str(tiny_lite_dir)])).stream_interval == 8
    with pytest.raises(ValidationError, match="stream_interval"):
        parse(["--model", str(tiny_lite_dir), "--stream-interval", "0"])


def test_attention_backend_flag_passes_through(tiny_lite_dir):
    from server.gateway.engine import build_engine_args

    args = build_engine_args(
        parse(["--model", str(tiny_lite_dir), "--dtype", "float32", "--attention-backend", "TRITON_MLA"])
    )
    assert "TRITON_MLA" in str(args.attention_backend)


def test_bad_engine_flag_exits(tiny_lite_dir):
    from server.gateway.engine import build_engine_args

    with pytest.raises(SystemExit):
        build_engine_args(parse(["--model", str(tiny_lite_dir), "--no-such-vllm-flag"]))


@pytest.mark.parametrize(
    "argv,env,needle",
    [
        ([], {"DSV2_API_KEYS": ""}, "holds no key"),
        ([], {"DSV2_API_KEYS": " , "}, "holds no key"),
        (["--api-keys", ""], {}, "holds no key"),
        (["--api-key", ","], {}, "holds no key"),
        (["--api-key-file", ""], {}, "DSV2_API_KEY_FILE"),
        ([], {"DSV2_API_KEY_FILE": " "}, "DSV2_API_KEY_FILE"),
    ],
)
def test_key_settings_given_but_empty_stop_the_start(monkeypatch, capsys, tiny_lite_dir, argv, env, needle):
    """An empty value (say, of a Secret) would turn authentication off: it stops the start, in one line."""
    from pydantic import ValidationError

    from server.__main__ import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=needle):
        parse(["--model", str(tiny_lite_dir), *argv])
    assert main(["serve", "--model", str(tiny_lite_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --api-key") and needle in err, err


def test_no_key_settings_and_auth_flags(monkeypatch, tiny_lite_dir):
    for key in ("DSV2_API_KEYS", "DSV2_API_KEY_FILE", "DSV2_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(key, raising=False)
    s = parse(["--model", str(tiny_lite_dir)])
    assert s.api_keys == [] and s.api_key_file is None and not s.allow_unauthenticated
    assert parse(["--model", str(tiny_lite_dir), "--allow-unauthenticated"]).allow_unauthenticated
    monkeypatch.setenv("DSV2_ALLOW_UNAUTHENTICATED", "true")
    assert parse(["--model", str(tiny_lite_dir)]).allow_unauthenticated


def test_runtime_lora_flags(monkeypatch, tiny_lite_dir):
    s = parse(["--model", str(tiny_lite_dir)])
    assert s.lora_adapter_dirs == [] and not s.allow_lora_hub_ids and s.max_runtime_adapters == 8
    s = parse(
        ["--model", str(tiny_lite_dir), "--lora-adapter-dirs", "/a,/b", "--allow-lora-hub-ids"]
        + ["--max-runtime-adapters", "2"]
    )
    assert s.lora_adapter_dirs == ["/a", "/b"] and s.allow_lora_hub_ids and s.max_runtime_adapters == 2
    monkeypatch.setenv("DSV2_LORA_ADAPTER_DIRS", "/srv/adapters")
    assert parse(["--model", str(tiny_lite_dir)]).lora_adapter_dirs == ["/srv/adapters"]
