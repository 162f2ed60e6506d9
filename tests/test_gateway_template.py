"""template.py without an engine: which template is used, BOS exactly once, message normalisation, log format."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from server.gateway.errors import APIError
from server.gateway.protocol import ChatMessage
from server.gateway.template import SHIPPED_TEMPLATE, TOOLS_TEMPLATE, ChatTemplate, normalize_messages

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def no_template_dir(tiny_lite_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("no-template")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_lite_dir / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_tokenizer_template_used_and_bos_once(tiny_lite_dir):
    t = ChatTemplate(str(tiny_lite_dir))
    assert t.template == t.tokenizer.chat_template
    ids = t.encode_chat(MESSAGES)
    assert ids[0] == t.bos_id and ids.count(t.bos_id) == 1
    assert t.render(MESSAGES).endswith("User: Bye\n\nAssistant:")


def test_shipped_template_is_the_fallback(tiny_lite_dir, no_template_dir):
    fallback = ChatTemplate(str(no_template_dir))
    assert fallback.template == SHIPPED_TEMPLATE.read_text()
    own = ChatTemplate(str(tiny_lite_dir))
    assert fallback.encode_chat(MESSAGES) == own.encode_chat(MESSAGES)


def test_text_prompt_gets_bos_once(tiny_lite_dir):
    t = ChatTemplate(str(tiny_lite_dir))
    ids = t.encode_text("Once upon a time")
    assert ids[0] == t.bos_id and ids.count(t.bos_id) == 1


def test_normalize_messages():
    msgs = [
        ChatMessage(role="developer", content="rules"),
        ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
        ChatMessage(role="assistant", content=None),
    ]
    assert normalize_messages(msgs) == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]
    for bad, param in [
        (ChatMessage(role="tool", content="x", tool_call_id="call_1"), "messages[0].tool_call_id"),
        (ChatMessage(role="function", content="x"), "messages[0].role"),
        (ChatMessage(role="narrator", content="x"), "messages[0].role"),
        (ChatMessage(role="user", content=None), "messages[0].content"),
        (ChatMessage(role="user", content=[{"type": "image_url"}]), "messages[0].content[0].type"),
    ]:
        with pytest.raises(APIError) as err:
            normalize_messages([bad])
        assert err.value.param == param and err.value.status == 400


def test_tool_turns_normalised():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{ "a" : [1, 2] }'}}
    msgs = [
        ChatMessage(role="user", content="go"),
        ChatMessage(role="assistant", content=None, tool_calls=[call]),
        ChatMessage(role="tool", content="3", tool_call_id="call_1"),
    ]
    out = normalize_messages(msgs)
    assert out[1]["tool_calls"][0]["function"] == {
        "name": "f",
        "arguments": '{"a":[1,2]}',
    }  # compact, as generated
    assert out[2] == {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "f"}
    bad = ChatMessage(role="user", content="x", tool_calls=[call])
    with pytest.raises(APIError) as err:
        normalize_messages([bad])
    assert err.value.param == "messages[0].tool_calls"


def test_tools_template_extends_deepseek_v2s(tiny_lite_dir):
    """Without tools the tool-aware template renders exactly what DeepSeek-V2's own does; with tools the list is
    in the system part, before the first turn."""
    import jinja2

    env = jinja2.Environment()
    for messages in (MESSAGES, MESSAGES[1:], [{"role": "user", "content": "x"}]):
        args = {"bos_token": "<B>", "eos_token": "<E>", "add_generation_prompt": True, "messages": messages}
        base = env.from_string(SHIPPED_TEMPLATE.read_text()).render(**args)
        assert env.from_string(TOOLS_TEMPLATE.read_text()).render(**args) == base
    t = ChatTemplate(str(tiny_lite_dir))
    tool = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}
    text = t.render([{"role": "user", "content": "x"}], [tool])
    assert text.startswith(t.bos_token + "## Tools\n\n") and text.endswith("User: x\n\nAssistant:")
    assert '{"name": "f", "description": "d"' in text


def test_json_log_lines_carry_access_fields():
    from server.gateway.logs import JSONFormatter

    record = logging.LogRecord("dsv2.access", logging.INFO, __file__, 1, "GET /health 200", None, None)
    record.request_id, record.status, record.path = "abc", 200, "/health"
    line = json.loads(JSONFormatter().format(record))
    assert line["request_id"] == "abc" and line["status"] == 200 and line["level"] == "info"
