"""Chat templates rendered in a Jinja sandbox, tokenized so message text can never forge a turn.

Each message's content is wrapped in random marker strings before rendering. After rendering, text
between markers is tokenized as plain text (control strings such as `<|im_start|>` become ordinary
characters); only the template's own text may produce special tokens.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tertulia.errors import ModelLoadError, PromptError
from tertulia.models.tokenizer import Tokenizer

# For base models without a template: readable turns, generation continues after "assistant:".
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str | None, tokenizer: Tokenizer) -> None:
        self.source = source or PLAIN_TEMPLATE
        self.tokenizer = tokenizer
        try:
            self._template = _environment().from_string(self.source)
        except TemplateError as exc:
            raise ModelLoadError(f"The model's chat template does not compile: {exc}") from None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt as text (for display and token counting of the template's overhead)."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.tokenizer.bos_token or "",
                eos_token=self.tokenizer.eos_token or "",
                **extra,
            )
        except TemplateError as exc:
            raise PromptError(f"The chat template rejected these messages: {exc}") from None

    def encode(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of the prompt; message text is always tokenized as plain text."""
        nonce = secrets.token_hex(8)
        open_mark, close_mark = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
        wrapped = [
            dict(m, content=f"{open_mark}{m['content']}{close_mark}") if isinstance(m.get("content"), str) else m
            for m in messages
        ]
        text = self.render(wrapped, add_generation_prompt=add_generation_prompt, **extra)
        ids: list[int] = []
        pattern = re.compile(re.escape(open_mark) + "(.*?)" + re.escape(close_mark), re.DOTALL)
        cursor = 0
        for match in pattern.finditer(text):
            ids += self.tokenizer.encode(text[cursor : match.start()], allow_special=True)
            ids += self.tokenizer.encode(match.group(1))
            cursor = match.end()
        ids += self.tokenizer.encode(text[cursor:], allow_special=True)
        return ids
