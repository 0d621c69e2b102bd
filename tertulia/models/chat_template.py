"""Chat templates rendered in a Jinja sandbox, tokenized so message text can never forge a turn.

Each message's content is wrapped in random marker strings before rendering. After rendering, text
between markers is tokenized as plain text (control strings such as `<|im_start|>` become ordinary
characters); only the template's own text may produce special tokens.
"""

from __future__ import annotations

import contextvars
import json
import re
import secrets
import time
from collections.abc import Collection
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tertulia.errors import ModelLoadError, PromptError
from tertulia.models.tokenizer import Tokenizer

# A template is a program from the model's files run over client data. Its output is bounded (each
# message appears a few times at most, plus the template's own text) and so is its time, checked
# between the pieces it yields and at every call it makes: a runaway template fails that request.
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


_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("template_deadline", default=None)


def _too_slow() -> PromptError:
    return PromptError(
        f"The chat template ran for more than {RENDER_SECONDS:.0f} s on these messages.",
        "The model's chat template is at fault; fix it or use another model.",
    )


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with the render's deadline checked at every call a template makes (loops call
    `range`, filters and methods), so a template that loops without writing anything stops too."""

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        deadline = _DEADLINE.get()
        if deadline is not None and time.monotonic() > deadline:
            raise _too_slow()
        return super().call(__context, __obj, *args, **kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
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
        token = _DEADLINE.set(deadline)
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
        finally:
            _DEADLINE.reset(token)

    def encode(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of the prompt; message text is always tokenized as plain text.

        Two guards, because a template may do anything with the text it is given. Each message is
        wrapped in markers, and the text between them is tokenized as plain text. And every control
        string inside a message is swapped for a placeholder before rendering, turned back into plain
        tokens afterwards: a template that slices the content (Qwen3's `content.split('</think>')[-1]`)
        can cut a marker away, never a placeholder's meaning.
        """
        nonce = secrets.token_hex(8)
        open_mark, close_mark = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
        controls = self.tokenizer.special_texts
        hidden = _ControlHider(controls, nonce)
        wrapped = [
            dict(m, content=f"{open_mark}{hidden.hide(_unmarked(m['content']))}{close_mark}")
            if isinstance(m.get("content"), str)
            else m
            for m in messages
        ]
        text = self.render(wrapped, add_generation_prompt=add_generation_prompt, **extra)
        ids: list[int] = []
        # A span runs from an open marker to the next close marker with no open marker between: a
        # template that dropped one message's close marker must not swallow the template text after it.
        opening = re.escape(open_mark)
        pattern = re.compile(f"{opening}((?:(?!{opening}).)*?){re.escape(close_mark)}", re.DOTALL)

        def template_text(part: str) -> list[int]:
            # A template that slices content leaves a lone marker behind: drop it so the model never
            # sees marker characters. Placeholders found here came from messages: plain text.
            part = part.replace(open_mark, "").replace(close_mark, "")
            out: list[int] = []
            for piece, is_control in hidden.split(part):
                out += self.tokenizer.encode(piece, allow_special=not is_control)
            return out

        cursor = 0
        for match in pattern.finditer(text):
            ids += template_text(text[cursor : match.start()])
            ids += self.tokenizer.encode(hidden.reveal(match.group(1)))
            cursor = match.end()
        ids += template_text(text[cursor:])
        return ids

    def encode_marked(
        self, messages: list[dict[str, Any]], end_ids: Collection[int]
    ) -> tuple[list[int], list[bool]]:
        """The whole conversation's ids, and which of them are the assistant's (each assistant turn up
        to and including its end token; turns with `weight: 0` are not). What fine-tuning trains on and
        what evaluation scores a model's replies on.

        Assistant spans are found by rendering growing prefixes of the conversation: this holds for any
        template whose rendering of the first k turns is a prefix of the whole (ChatML, Llama 3, ...).
        """
        ids = self.encode(messages, add_generation_prompt=False)
        marked = [False] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant" or not message.get("weight", 1):
                continue
            prompt = self.encode(messages[:turn], add_generation_prompt=True)
            through = self.encode(messages[: turn + 1], add_generation_prompt=False)
            if through[: len(prompt)] != prompt or ids[: len(through)] != through:
                raise PromptError(
                    "This model's chat template does not render conversations turn by turn, "
                    "so the assistant's tokens cannot be told apart.",
                    "Use a model with a ChatML- or Llama-style template.",
                )
            end = len(through)
            for position in range(len(prompt), len(through)):
                if through[position] in end_ids:
                    end = position + 1
                    break
            for position in range(len(prompt), end):
                marked[position] = True
        return ids, marked


# The private-use characters the markers and placeholders are made of: taken out of message text, so
# that nothing a user writes can complete, imitate or break one.
_MARKER_CHARS = re.compile("[\ue000-\ue005]")


def _unmarked(text: str) -> str:
    return _MARKER_CHARS.sub("", text)


class _ControlHider:
    """Swaps control strings in message text for placeholders no template treats specially."""

    def __init__(self, controls: list[str], nonce: str) -> None:
        self.controls = controls
        self.nonce = nonce
        self._find = re.compile("|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)))
        self._placeholder = re.compile(f"\ue004{nonce}([0-9a-f]+)\ue005")
        self._debris = re.compile(f"[\ue004\ue005]|{nonce}")

    def hide(self, text: str) -> str:
        if not self.controls:
            return text
        return self._find.sub(lambda m: f"\ue004{self.nonce}{self.controls.index(m.group(0)):x}\ue005", text)

    def reveal(self, text: str) -> str:
        return self._placeholder.sub(lambda m: self.controls[int(m.group(1), 16)], text)

    def split(self, text: str) -> list[tuple[str, bool]]:
        """(piece, is a hidden control string) in order; a placeholder cut in half is dropped."""
        pieces, cursor = [], 0
        for match in self._placeholder.finditer(text):
            pieces.append((self._debris.sub("", text[cursor : match.start()]), False))
            pieces.append((self.controls[int(match.group(1), 16)], True))
            cursor = match.end()
        pieces.append((self._debris.sub("", text[cursor:]), False))
        return [(piece, control) for piece, control in pieces if piece]
