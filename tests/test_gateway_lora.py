"""LoRA adapters through the gateway: `--lora-modules name=path` serves peft adapters beside the base model,
lists them on /v1/models with their `parent`, and a request selects one with `model`.

- Real engine (`python -m server serve`, fp32, tensor-parallel over 2 ranks, two adapters the project
  generates): greedy completions of each adapter equal transformers (+ peft, or on the merged weights) on the
  same adapter directory, so vLLM's sharded LoRA layers are checked as well as the gateway; the base
  model's name still gives the base model; the OpenAI SDK, chat and the Responses API select adapters too.
- Over FakeEngine (HTTP unit tests): listing, selection, per-key model lists, and start-up refusals.
The model-level LoRA checks (which layers take adapters, what vLLM's CPU build cannot adapt) are in
test_model_lora.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from server.settings import Settings
from tests import openai_schema
from tests.conftest import FP32_ATTENTION_BACKEND
from tests.fake_engine import FakeEngine
from tests.model_helpers import N_TOKENS, hf_greedy, hf_load_tensors, hf_model, prompt_ids
from tests.test_gateway_engine import MODEL, Server, start_server
from tests.test_gateway_http import assert_openai_error, make_client
from tests.test_model_lora import ATTENTION_ONLY, _merged


@pytest.fixture(scope="module")
def adapters(tiny_lite_dir, tmp_path_factory):
    from server.tiny_model import write_tiny_lora

    return {
        "sql": write_tiny_lora(tmp_path_factory.mktemp("lora-sql"), tiny_lite_dir, targets=ATTENTION_ONLY),
        "all": write_tiny_lora(tmp_path_factory.mktemp("lora-all"), tiny_lite_dir, seed=2),
    }


# --- the real engine ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_lite_dir, adapters, tmp_path_factory):
    srv = start_server(
        tiny_lite_dir,
        tmp_path_factory.mktemp("gw-lora") / "server.log",
        "--dtype", "float32",
        "--attention-backend", FP32_ATTENTION_BACKEND,
        "--lora-modules", f"sql={adapters['sql']}", f"all={adapters['all']}",
        "--max-loras", "2",
        "--tensor-parallel-size", "2",
        "--allow-runtime-lora-updating",
        # every adapter the tests write lies in pytest's base temporary directory
        "--lora-adapter-dirs", str(adapters["sql"].parent),
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # one core per CPU worker
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, srv.logs()


def completions(server: Server, model: str, prompts: list[list[int]]) -> list[tuple[str, list[float]]]:
    """Greedy text and chosen-token logprobs of each token-id prompt, from one /v1/completions request as
    `model` (the prompts run as one batch, each its own choice)."""
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={
            "model": model,
            "prompt": prompts,
            "max_tokens": N_TOKENS,
            "temperature": 0,
            "logprobs": 0,
            "ignore_eos": True,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert len(choices) == len(prompts)
    return [(c["text"], c["logprobs"]["token_logprobs"]) for c in choices]


def assert_same_as(got, want, tokenizer, max_logprob_diff: float = 1e-3) -> None:
    """Gateway text == the reference tokens decoded, and every chosen token's logprob within
    `max_logprob_diff` of the reference's. (A stream's last bytes that are not yet whole UTF-8 are held back by
    vLLM's detokenizer, so a trailing U+FFFD of the reference is not compared.)"""
    for i, ((text, lps), (tokens, ref_lps)) in enumerate(zip(got, want, strict=True)):
        ref = tokenizer.decode(tokens)
        assert text.rstrip("\ufffd") == ref.rstrip("\ufffd"), f"prompt {i}: {text!r} != {ref!r}"
        assert len(lps) == len(ref_lps)
        worst = max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True))
        assert worst <= max_logprob_diff, f"prompt {i}: max |Δ logprob| {worst:.2e}"


@pytest.fixture(scope="module")
def tokenizer(tiny_lite_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_lite_dir))


@pytest.mark.engine
def test_models_lists_adapters_with_their_parent(server, adapters, tiny_lite_dir):
    listed = httpx.get(f"{server.url}/v1/models").json()
    if openai_schema.available():
        openai_schema.model_list(listed)
    cards = {m["id"]: m for m in listed["data"]}
    assert list(cards) == [MODEL, "sql", "all"]
    assert cards[MODEL]["parent"] is None and cards[MODEL]["root"] == MODEL  # names, never paths
    assert cards["sql"]["parent"] == MODEL and cards["sql"]["root"] == "sql"
    assert str(tiny_lite_dir) not in json.dumps(listed) and str(adapters["sql"]) not in json.dumps(listed)
    assert httpx.get(f"{server.url}/v1/models/all").json() == cards["all"]
    # the metric an Inference Extension endpoint picker reads for LoRA affinity (its loraSpec), with its labels
    text = httpx.get(f"{server.url}/metrics").text
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1, info
    for label in ('max_lora="2"', "running_lora_adapters=", "waiting_lora_adapters="):
        assert label in info[0], info


@pytest.mark.engine
def test_attention_adapter_equals_transformers_with_peft(server, adapters, tiny_lite_dir, tokenizer):
    from peft import PeftModel

    prompts = prompt_ids(tiny_lite_dir)
    want = hf_greedy(PeftModel.from_pretrained(hf_model(tiny_lite_dir), str(adapters["sql"])).eval(), prompts)
    base = hf_greedy(hf_model(tiny_lite_dir), prompts)
    assert [t for t, _ in want] != [t for t, _ in base], "the adapter does not change the output"
    assert_same_as(completions(server, "sql", prompts), want, tokenizer)
    assert_same_as(completions(server, MODEL, prompts), base, tokenizer)


@pytest.mark.engine
def test_full_adapter_equals_transformers_on_merged_weights(server, adapters, tiny_lite_dir, tokenizer):
    prompts = prompt_ids(tiny_lite_dir)
    model = hf_model(tiny_lite_dir)
    hf_load_tensors(model, _merged(tiny_lite_dir, adapters["all"]))
    assert_same_as(completions(server, "all", prompts), hf_greedy(model, prompts), tokenizer)


@pytest.mark.engine
def test_sdk_chat_and_responses_select_adapters(server):
    """The same chat through each name: adapters answer differently from the base model, each the same way
    in chat completions (streamed or not) and the Responses API."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    ask = [{"role": "user", "content": "Write a query."}]
    answers = {}
    for name in (MODEL, "sql", "all"):
        chat = client.chat.completions.create(model=name, messages=ask, max_tokens=12, temperature=0)
        assert chat.model == name
        answers[name] = chat.choices[0].message.content
        streamed = client.chat.completions.create(
            model=name, messages=ask, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answers[name]
        resp = client.responses.create(model=name, input=ask, max_output_tokens=12, temperature=0)
        assert resp.model == name and resp.output_text == answers[name]
    assert len(set(answers.values())) == 3, answers


@pytest.mark.engine
def test_unknown_adapter_is_a_404_and_the_server_keeps_serving(server):
    r = httpx.post(
        f"{server.url}/v1/completions", json={"model": "sq", "prompt": "x", "max_tokens": 2}, timeout=60
    )
    assert_openai_error(r, 404, "model")
    assert (
        httpx.post(
            f"{server.url}/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 2}, timeout=60
        ).status_code
        == 200
    )


@pytest.mark.engine
def test_runtime_load_and_unload(server, adapters, tiny_lite_dir, tokenizer, tmp_path_factory):
    """vLLM's runtime LoRA API: an adapter loaded under a new name serves the same tokens as at start-up; one
    that vLLM cannot load (rank above --max-lora-rank) is a 400 naming lora_path and the server keeps serving;
    an unloaded name is a 404."""
    from server.tiny_model import write_tiny_lora

    prompts = prompt_ids(tiny_lite_dir)[:2]

    def post(path: str, **body) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", json=body, timeout=120)

    r = post("/v1/load_lora_adapter", lora_name="sql2", lora_path=str(adapters["sql"]))
    assert r.status_code == 200 and "sql2" in r.text, r.text
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]][-1] == "sql2"
    # The same tokens, and logprobs equal up to float rounding. Two identical requests are not bit-identical:
    # each prompt reaches the engine as a request of its own, and the prompts may share a step or not, and a
    # prompt's KV may come from the prefix cache (filled in another batch) or be computed afresh; fp32 sums
    # in another order differ in the last digits. Measured over repeated requests, for both names, with and
    # without prefix caching: texts always equal, logprobs at most 5.3e-6 apart. 1e-4 is the suite's
    # vLLM-vs-vLLM fp32 bound (test_model_compiled.py).
    fresh, started = completions(server, "sql2", prompts), completions(server, "sql", prompts)
    assert [text for text, _ in fresh] == [text for text, _ in started]
    for (_, got), (_, want) in zip(fresh, started, strict=True):
        assert got == pytest.approx(want, abs=1e-4)

    wide = write_tiny_lora(tmp_path_factory.mktemp("lora-r32"), tiny_lite_dir, rank=32)
    r = post("/v1/load_lora_adapter", lora_name="wide", lora_path=str(wide))
    err = assert_openai_error(r, 400, "lora_path")
    assert "LoRA rank 32 is greater than max_lora_rank 16" in err["message"], err
    assert_openai_error(post("/v1/completions", model="wide", prompt="x", max_tokens=2), 404, "model")

    assert post("/v1/unload_lora_adapter", lora_name="sql2").status_code == 200
    assert_openai_error(post("/v1/completions", model="sql2", prompt="x", max_tokens=2), 404, "model")
    assert_openai_error(post("/v1/unload_lora_adapter", lora_name="sql2"), 404, "lora_name")
    want = hf_greedy(hf_model(tiny_lite_dir), prompts)
    assert_same_as(completions(server, MODEL, prompts), want, tokenizer)


# --- over FakeEngine (HTTP unit tests) -------------------------------------------------------------------------


def test_http_adapter_selected_by_model_and_key_lists(tiny_lite_dir, adapters, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("base-only:\n  key: sk-b\n  models: [tiny]\nsql-only:\n  key: sk-s\n  models: [sql]\n")
    engine = FakeEngine()
    with make_client(
        tiny_lite_dir,
        engine=engine,
        served_model_name="tiny,deepseek-chat",
        lora_modules=[f"sql={adapters['sql']}"],
        api_key_file=str(keys),
    ) as c:
        listed = [(m["id"], m["parent"]) for m in c.get("/v1/models", headers=_auth("sk-b")).json()["data"]]
        assert listed == [("tiny", None), ("deepseek-chat", None), ("sql", "tiny")]

        def ask(model: str, key: str):
            return c.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                headers=_auth(key),
            )

        assert ask("sql", "sk-s").json()["model"] == "sql" and engine.options[-1].adapter == "sql"
        assert ask("deepseek-chat", "sk-b").status_code == 200 and engine.options[-1].adapter is None
        # an adapter is its own model to a key's list; the base model's aliases are the base model
        assert_openai_error(ask("sql", "sk-b"), 403, "model")
        assert_openai_error(ask("tiny", "sk-s"), 403, "model")
        r = c.post(
            "/v1/completions", json={"model": "sql", "prompt": "x", "stream": True}, headers=_auth("sk-s")
        )
        assert r.status_code == 200 and engine.options[-1].adapter == "sql"


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("modules", "needle"),
    [
        (["sql"], "is not name=path"),
        (['{"name": "a"}'], "the JSON form is"),
        (['{"name": "a", "path": "{adapter}", "rank": 8}'], "the JSON form is"),
        (["{oops"], "is not JSON"),
        (["=/tmp"], "is not name=path"),
        (["tiny={adapter}"], "already a name of the base model"),
        (["a={adapter}", "a={adapter}"], "given twice"),
        (["a=/no/such/adapter"], "not a peft adapter directory"),
    ],
)
def test_http_bad_lora_modules_are_refused(tiny_lite_dir, adapters, modules, needle):
    from pydantic import ValidationError

    given = [m.replace("{adapter}", str(adapters["sql"])) for m in modules]
    with pytest.raises(ValidationError, match=needle):
        Settings(model=str(tiny_lite_dir), served_model_name=["tiny"], lora_modules=given)


def test_lora_modules_flag_env_and_engine_args(tiny_lite_dir, adapters, monkeypatch, tmp_path):
    """Space- or comma-separated flag values and DSV2_LORA_MODULES; LoRA is switched on and the rank limit
    raised to the adapters' rank unless --max-lora-rank is given."""
    from server.__main__ import build_parser, main
    from server.gateway.engine import build_engine_args
    from server.settings import settings_from_args

    wide = tmp_path / "lora-r32"
    assert main(["tiny-lora", str(wide), "--base", str(tiny_lite_dir), "--rank", "32"]) == 0
    a, b = f"a={adapters['sql']}", f"b={wide}"

    def parse(*argv: str) -> Settings:
        ns, extra = build_parser().parse_known_args(["serve", "--model", str(tiny_lite_dir), *argv])
        return settings_from_args(ns, extra)

    s = parse("--lora-modules", a, b, "--max-num-seqs", "4")
    assert list(s.adapters) == ["a", "b"] and s.engine_args == ["--max-num-seqs", "4"]
    assert list(parse("--lora-modules", f"{a},{b}").adapters) == ["a", "b"]
    as_json = json.dumps({"name": "j", "path": str(adapters["sql"]), "base_model_name": "tiny"})
    assert parse("--lora-modules", as_json, b).adapters == {"j": str(adapters["sql"]), "b": str(wide)}
    monkeypatch.setenv("DSV2_LORA_MODULES", f"{a},{b}")
    assert list(parse().adapters) == ["a", "b"]
    args = build_engine_args(s)
    assert args.enable_lora and args.max_lora_rank == 32
    assert build_engine_args(parse("--max-lora-rank", "64")).max_lora_rank == 64
    with pytest.raises(ValueError, match="--max-lora-rank 16 is below the rank of a --lora-modules adapter"):
        build_engine_args(parse("--max-lora-rank", "16"))
    monkeypatch.delenv("DSV2_LORA_MODULES")
    assert not build_engine_args(parse()).enable_lora


def test_serve_refuses_a_bad_lora_module_before_starting_the_engine(tiny_lite_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model", str(tiny_lite_dir), "--lora-modules", "sql"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: --lora-modules: 'sql' is not name=path" in proc.stderr


def test_an_adapter_that_does_not_load_stops_the_start(tiny_lite_dir, adapters, tmp_path):
    """--lora-modules adapters are loaded by the app's start-up through the engine (the one holder of adapter
    state): one the engine refuses (FakeEngine refuses paths containing "broken") stops the start, naming it, and
    the engine is shut down."""
    import shutil

    from server.gateway.engine import EngineRejected

    broken = tmp_path / "broken"
    shutil.copytree(adapters["sql"], broken)
    engine = FakeEngine()
    with pytest.raises(EngineRejected, match="'bad'"):
        with make_client(
            tiny_lite_dir, engine=engine, lora_modules=[f"sql={adapters['sql']}", f"bad={broken}"]
        ):
            pass
    assert not engine.started and engine.adapters == {"sql": str(adapters["sql"])}


def test_http_runtime_adapters(tiny_lite_dir, adapters):
    engine = FakeEngine()
    with make_client(
        tiny_lite_dir,
        engine=engine,
        allow_runtime_lora_updating=True,
        lora_modules=[f"sql={adapters['sql']}"],
        lora_adapter_dirs=[str(adapters["all"].parent)],
    ) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(adapters["all"])})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'new' added successfully."
        # the engine holds every adapter: --lora-modules' (loaded at start-up) and those loaded at run time
        # (from their resolved path)
        assert engine.adapters == {"sql": str(adapters["sql"]), "new": os.path.realpath(adapters["all"])}
        card = c.get("/v1/models/new").json()
        assert (card["parent"], card["root"]) == ("tiny", "new")
        chat = {"model": "new", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=chat).json()["model"] == "new"
        assert engine.options[-1].adapter == "new"

        for body, status, param in [
            ({"lora_name": "tiny", "lora_path": str(adapters["all"])}, 400, "lora_name"),
            ({"lora_name": "sql", "lora_path": str(adapters["all"])}, 400, "lora_name"),
            ({"lora_name": "x", "lora_path": "/no/such/adapter"}, 400, "lora_path"),
            (
                {"lora_name": "x", "lora_path": str(tiny_lite_dir)},
                400,
                "lora_path",
            ),  # a model, not an adapter
            (
                {"lora_name": "x", "lora_path": "org/broken-adapter"},
                400,
                "lora_path",
            ),  # a hub id, without --allow-lora-hub-ids
            ({"lora_name": "", "lora_path": "a"}, 400, "lora_name"),
            ({"lora_path": "a"}, 400, "lora_name"),
        ]:
            assert_openai_error(c.post("/v1/load_lora_adapter", json=body), status, param)
        assert "x" not in engine.adapters and c.get("/v1/models/x").status_code == 404

        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "new"}).status_code == 200
        assert engine.adapters == {"sql": str(adapters["sql"])}
        assert_openai_error(c.post("/v1/chat/completions", json=chat), 404, "model")
        assert_openai_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "new"}), 404, "lora_name")
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200  # static too
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]


def test_http_runtime_adapter_api_is_off_by_default(client_without_lora_api):
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert_openai_error(
            client_without_lora_api.post(path, json={"lora_name": "a", "lora_path": "b"}), 404
        )


@pytest.fixture
def client_without_lora_api(tiny_lite_dir):
    with make_client(tiny_lite_dir) as c:
        yield c
