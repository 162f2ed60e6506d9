"""Messages -> prompt token ids. The only place that knows chat templates.

The tokenizer's own chat template is used when it has one, else DeepSeek-V2-Chat's template shipped in
server/data. The template emits the BOS token itself, so the rendered text is encoded without special tokens;
BOS is prepended only when a template did not emit it: BOS appears exactly once either way.
"""

from __future__ import annotations

from pathlib import Path

from server.gateway.errors import APIError

SHIPPED_TEMPLATE = Path(__file__).resolve().parent.parent / "data" / "deepseek_v2_chat_template.jinja"
ROLES = ("system", "developer", "user", "assistant")


class ChatTemplate:
    def __init__(self, tokenizer_path: str, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        self.template: str = getattr(self.tokenizer, "chat_template", None) or SHIPPED_TEMPLATE.read_text()
        self.bos_id: int | None = self.tokenizer.bos_token_id
        self.bos_token: str | None = self.tokenizer.bos_token

    def render(self, messages: list[dict[str, str]]) -> str:
        """Plain {"role", "content": str} messages -> prompt text ending in the assistant's turn."""
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self._encode(self.render(messages))
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


def normalize_messages(messages: list) -> list[dict[str, str]]:
    """Request messages -> {"role", "content": str}; list content = its text parts joined by newlines.

    Raises APIError (param named) for roles or parts this model cannot take.
    """
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role = m.role
        if role in ("tool", "function"):
            raise APIError(
                f"messages[{i}].role {role!r} is not supported: this model has no tool format",
                param=f"messages[{i}].role",
            )
        if role not in ROLES:
            raise APIError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}",
                param=f"messages[{i}].role",
            )
        if getattr(m, "tool_calls", None):
            raise APIError(
                f"messages[{i}].tool_calls is not supported: this model has no tool format",
                param=f"messages[{i}].tool_calls",
            )
        content = m.content
        if content is None:
            if role != "assistant":
                raise APIError(
                    f"messages[{i}].content is required for role {role!r}", param=f"messages[{i}].content"
                )
            content = ""
        elif isinstance(content, list):
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
            content = "\n".join(texts)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if not out:
        raise APIError("messages must contain at least one message", param="messages")
    return out
