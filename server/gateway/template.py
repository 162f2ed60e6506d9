"""Messages (and tools) -> prompt token ids. The only place that knows chat templates.

The tokenizer's own chat template is used when it has one, else DeepSeek-V2-Chat's template shipped in
server/data. DeepSeek-V2's template has no tool format; server/data/deepseek_v2_tools_chat_template.jinja is
the same template plus one (tool list in the system part, calls in the assistant's turn, results as Tool turns;
server/gateway/tools.py), and requests with tools or tool turns are always rendered with it. The template emits
the BOS token itself; BOS is prepended only when a template did not emit it.

Special tokens belong to the template, never to the request. Whatever a request carries (content of every role,
tool results, call ids, names, arguments, tool descriptions and schemas) is tokenised as plain text, so a user's
`<｜end▁of▁sentence｜>` is those characters, not EOS: before rendering, each spelling of an added token in the
request (and the sentinel mark itself) is swapped for a sentinel, a private-use mark + its index; the rendered
text is split on the added tokens left, which are the template's own, and the pieces between them are encoded
without added-token matching, sentinels swapped back. Honest input gets exactly the ids the plain encode of the
rendered text would give. The tools template escapes its own markup in what it wraps (`</tool_result` in a
result, `</tool_call` in arguments, ids and names as JSON strings), so a result cannot close early.
A completion prompt (encode_text) is the client's whole prompt and is encoded as it is, special tokens included.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from server.gateway.errors import APIError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

DATA = Path(__file__).resolve().parent.parent / "data"
SHIPPED_TEMPLATE = DATA / "deepseek_v2_chat_template.jinja"
TOOLS_TEMPLATE = DATA / "deepseek_v2_tools_chat_template.jinja"
ROLES = ("system", "developer", "user", "assistant", "tool")
# A sentinel is MARK + the index of the spelling it stands for + END; both are private-use characters.
MARK, END = "\ue000", "\ue001"
SENTINEL = re.compile(f"{MARK}([0-9]+){END}")
T = TypeVar("T")


class ChatTemplate:
    def __init__(self, tokenizer_path: str, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        self.template: str = getattr(self.tokenizer, "chat_template", None) or SHIPPED_TEMPLATE.read_text()
        self.tools_template = TOOLS_TEMPLATE.read_text()
        self.bos_id: int | None = self.tokenizer.bos_token_id
        self.bos_token: str | None = self.tokenizer.bos_token
        # Every added token, special or not (DeepSeek-V2 adds FIM and placeholder tokens besides BOS and EOS).
        self.added: dict[str, int] = self.tokenizer.get_added_vocab()
        self._guarded = [MARK, *self.added]
        self._sentinels = {s: f"{MARK}{i}{END}" for i, s in enumerate(self._guarded)}
        self._guard_re = re.compile(_any_of(self._guarded))
        self._split_re = re.compile(f"({_any_of(self.added)})")
        self._plain = _without_added_tokens(self.tokenizer, tokenizer_path)

    def render(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        opened: bool = True,
        continued: bool = False,
    ) -> str:
        """Normalised messages (see normalize_messages) and tools -> prompt text ending in the assistant's turn
        (`opened`), inside the last message (`continued`: its end-of-turn left out), or after the last turn."""
        with_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        return self.tokenizer.apply_chat_template(
            messages,
            tools=[{"type": "function", "function": t} for t in tools] if tools else None,
            chat_template=self.tools_template if with_tools else self.template,
            tokenize=False,
            add_generation_prompt=opened,
            continue_final_message=continued,
        )

    def encode_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        opened: bool = True,
        continued: bool = False,
    ) -> list[int]:
        """The prompt's ids: special tokens only where the template put them, the request's text as plain text."""
        ids = self._encode_rendered(self.render(self._guard(messages), self._guard(tools), opened, continued))
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_text(self, text: str) -> list[int]:
        """A raw completion prompt, the client's whole prompt: special tokens spelled in it are those tokens (a
        prompt may carry its own BOS/EOS), and the tokenizer's own are added (BOS for DeepSeek-V2)."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def _guard(self, value: T) -> T:
        """A copy of request data with every added token's spelling (and MARK) in its strings, keys included,
        swapped for its sentinel."""
        if isinstance(value, str):
            return self._guard_re.sub(lambda m: self._sentinels[m.group()], value)
        if isinstance(value, dict):
            return {self._guard(k): self._guard(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._guard(v) for v in value]
        return value

    def _encode_rendered(self, text: str) -> list[int]:
        """Rendered text -> ids: its added tokens (the template's) by id, the text between them without added-token
        matching and with the request's spellings back in place of their sentinels."""
        parts = self._split_re.split(text)  # text, token, text, ..., token, text
        pieces = [SENTINEL.sub(lambda m: self._guarded[int(m[1])], p) if MARK in p else p for p in parts[::2]]
        # One call for all pieces, each encoded on its own; encode_batch lets go of the GIL while it works (encode
        # does not), so a long prompt tokenised in a worker thread does not hold up the event loop.
        encodings = self._plain.encode_batch(pieces, add_special_tokens=False)
        ids: list[int] = []
        for encoding, token in zip(encodings, parts[1::2], strict=False):
            ids += encoding.ids
            ids.append(self.added[token])
        ids += encodings[-1].ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _any_of(words: list[str] | dict[str, int]) -> str:
    """A regex for the longest of `words` at a position, as a trie: one branch per next character, so its cost per
    character stays flat however many words (a tokenizer may add thousands of placeholder tokens)."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def below(node: dict) -> str:
        branches = [re.escape(ch) + below(child) for ch, child in node.items() if ch]
        if not branches:
            return ""
        group = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{group})?" if "" in node else group  # greedy: a longer word before a shorter one

    return "|".join(re.escape(ch) + below(child) for ch, child in trie.items() if ch) or "(?!)"


def _without_added_tokens(tokenizer: PreTrainedTokenizerBase, tokenizer_path: str) -> Tokenizer:
    """The tokenizer's pipeline (normaliser, pre-tokenizer, model) with no added tokens and no post-processing:
    any text in, ordinary tokens out."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer {tokenizer_path!r} has no fast (tokenizer.json) version; the gateway needs one to keep "
            "special tokens out of request text"
        )
    spec = json.loads(backend.to_str())
    spec.update(added_tokens=[], post_processor=None, truncation=None, padding=None)
    return Tokenizer.from_str(json.dumps(spec))


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
