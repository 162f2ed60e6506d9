"""Messages (and tools) -> prompt token ids. The only place that knows chat templates.

The tokenizer's own chat template is used when it has one, else DeepSeek-V2-Chat's template shipped in
server/data. DeepSeek-V2's template has no tool format; server/data/deepseek_v2_tools_chat_template.jinja is
the same template plus one (tool list in the system part, calls in the assistant's turn, results as Tool turns;
server/gateway/tools.py), and requests with tools or tool turns are always rendered with it. The template emits the BOS token itself, so the
rendered text is encoded without special tokens; BOS is prepended only when a template did not emit it.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.gateway.errors import APIError

DATA = Path(__file__).resolve().parent.parent / "data"
SHIPPED_TEMPLATE = DATA / "deepseek_v2_chat_template.jinja"
TOOLS_TEMPLATE = DATA / "deepseek_v2_tools_chat_template.jinja"
ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatTemplate:
    def __init__(self, tokenizer_path: str, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        self.template: str = getattr(self.tokenizer, "chat_template", None) or SHIPPED_TEMPLATE.read_text()
        self.tools_template = TOOLS_TEMPLATE.read_text()
        self.bos_id: int | None = self.tokenizer.bos_token_id
        self.bos_token: str | None = self.tokenizer.bos_token

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """Normalised messages (see normalize_messages) and tools -> prompt text ending in the assistant's turn."""
        with_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        return self.tokenizer.apply_chat_template(
            messages,
            tools=[{"type": "function", "function": t} for t in tools] if tools else None,
            chat_template=self.tools_template if with_tools else self.template,
            tokenize=False,
            add_generation_prompt=True,
        )

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        ids = self._encode(self.render(messages, tools))
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_text(self, text: str) -> list[int]:
        """A raw completion prompt: the tokenizer's own special tokens (BOS for DeepSeek-V2)."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def normalize_messages(messages: list) -> list[dict]:
    """Request messages -> {"role", "content": str} (+ an assistant's "tool_calls", a tool turn's "tool_call_id" and
    "name"); list content = its text parts joined by newlines.

    Raises APIError (param named) for roles or parts this model cannot take, and for a tool turn that answers no
    earlier call.
    """
    out: list[dict] = []
    calls: dict[str, str] = {}  # call id -> function name, from the assistant turns so far
    for i, m in enumerate(messages):
        role = m.role
        if role == "function":
            raise APIError(
                f"messages[{i}].role 'function' is deprecated by OpenAI and not supported; use role 'tool'",
                param=f"messages[{i}].role",
            )
        if role not in ROLES:
            raise APIError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}",
                param=f"messages[{i}].role",
            )
        if m.tool_calls and role != "assistant":
            raise APIError(
                f"messages[{i}].tool_calls is only allowed on assistant messages",
                param=f"messages[{i}].tool_calls",
            )
        content = _content(m, i)
        entry: dict = {"role": "system" if role == "developer" else role, "content": content}
        if m.tool_calls:
            entry["tool_calls"] = [_call(call, i, j) for j, call in enumerate(m.tool_calls)]
            calls.update((c["id"], c["function"]["name"]) for c in entry["tool_calls"])
        if role == "tool":
            if m.tool_call_id not in calls:
                raise APIError(
                    f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no tool call of an earlier assistant "
                    "message",
                    param=f"messages[{i}].tool_call_id",
                )
            entry["tool_call_id"] = m.tool_call_id
            entry["name"] = calls[m.tool_call_id]
        out.append(entry)
    if not out:
        raise APIError("messages must contain at least one message", param="messages")
    return out


def _content(m, i: int) -> str:
    content = m.content
    if content is None:
        if m.role != "assistant":
            raise APIError(
                f"messages[{i}].content is required for role {m.role!r}", param=f"messages[{i}].content"
            )
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise APIError(
                f"messages[{i}].content[{j}].type {part.type!r} is not supported; this model takes text only",
                param=f"messages[{i}].content[{j}].type",
            )
        if part.text is None:
            raise APIError(
                f"messages[{i}].content[{j}].text is required for a text part",
                param=f"messages[{i}].content[{j}].text",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _call(call, i: int, j: int) -> dict:
    """An assistant's tool call, its arguments re-written as compact JSON (the form the model writes them in)."""
    param = f"messages[{i}].tool_calls[{j}].function.arguments"
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        raise APIError(f"{param} is not valid JSON", param=param) from None
    if not isinstance(arguments, dict):
        raise APIError(f"{param} must be a JSON object", param=param)
    compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": compact}}
