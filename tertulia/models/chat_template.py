"""Chat templates rendered in a Jinja sandbox, tokenized so message text can never forge a turn.

Each message's content is wrapped in random marker strings before rendering. After rendering, text
between markers is tokenized as plain text (control strings such as `<|im_start|>` become ordinary
characters); only the template's own text may produce special tokens.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tertulia.errors import ModelLoadError, PromptError
from tertulia.models.tokenizer import Tokenizer

# A template is a program from the model's files run over client data. Its output is bounded (each
# message appears a few times at most, plus the template's own text) and so is its time, checked
# between the pieces it yields: a runaway template fails that request, not the server.
RENDER_GROWTH = 4
RENDER_OVERHEAD_CHARS = 1_000_000
RENDER_SECONDS = 10.0

# For base models without a template: readable turns, generation continues after "assistant:".
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


# A message's content while `encode` renders: its text between an open and a close marker.
_MARKED = re.compile(r"(\ue000([0-9a-f]{16})\ue001)(.*)(\ue002\2\ue003)", re.DOTALL)


def _trim(value: Any, chars: str | None = None) -> str:
    """Jinja's `trim`, applied inside the content markers too.

    Templates such as Llama 3's write `message['content'] | trim`; without this the markers around the
    content would shield its whitespace and the prompt would differ from the one the model was trained on.
    """
    text = str(value).strip(chars)
    marked = _MARKED.fullmatch(text)
    if marked:
        return marked.group(1) + marked.group(3).strip(chars) + marked.group(4)
    return text


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.filters["trim"] = _trim
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

    def render(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt as text (for display and token counting of the template's overhead)."""
        given = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        limit = RENDER_GROWTH * given + RENDER_OVERHEAD_CHARS
        deadline = time.monotonic() + RENDER_SECONDS
        parts, size = [], 0
        try:
            for part in self._template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.tokenizer.bos_token or "",
                eos_token=self.tokenizer.eos_token or "",
                **extra,
            ):
                size += len(part)
                if size > limit or time.monotonic() > deadline:
                    raise PromptError(
                        "The chat template's output grew past what these messages can need "
                        f"({size:,} characters, {time.monotonic() - deadline + RENDER_SECONDS:.1f} s).",
                        "The model's chat template is at fault; fix it or use another model.",
                    )
                parts.append(part)
            return "".join(parts)
        except PromptError:
            raise
        except TemplateError as exc:
            raise PromptError(f"The chat template rejected these messages: {exc}") from None
        except Exception as exc:
            # The template is a program from the model file run over client data: a TypeError
            # (content that is a list or None), OverflowError (the sandbox's range limit) and the like
            # are bad input for this template, not a server bug.
            raise PromptError(
                f"The chat template failed on these messages ({type(exc).__name__}: {exc}).",
                "Message content must be text; otherwise the model's chat template is at fault.",
            ) from None

    def encode(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of the prompt; message text is always tokenized as plain text."""
        nonce = secrets.token_hex(8)
        open_mark, close_mark = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
        wrapped = [
            dict(m, content=f"{open_mark}{m['content']}{close_mark}")
            if isinstance(m.get("content"), str)
            else m
            for m in messages
        ]
        text = self.render(wrapped, add_generation_prompt=add_generation_prompt, **extra)
        ids: list[int] = []
        pattern = re.compile(re.escape(open_mark) + "(.*?)" + re.escape(close_mark), re.DOTALL)

        def template_text(part: str) -> list[int]:
            # A template that slices content (e.g. `content.split('</think>')[-1]`) leaves a lone
            # marker behind: drop it so the model never sees marker characters.
            part = part.replace(open_mark, "").replace(close_mark, "")
            return self.tokenizer.encode(part, allow_special=True)

        cursor = 0
        for match in pattern.finditer(text):
            ids += template_text(text[cursor : match.start()])
            ids += self.tokenizer.encode(match.group(1))
            cursor = match.end()
        ids += template_text(text[cursor:])
        return ids
