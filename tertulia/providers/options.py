"""The sampling options a reply can be asked for: one table of names, ranges, defaults and meanings.

Every entry point validates against this model and nothing else: the /v1 request bodies, the /api
settings of conversations, personas, requests and imports, and the terminal chat's flags and slash
commands. A value is checked once, here, at the edge; the local provider turns it into the engine's
parameters, and the engine only re-asserts what would break its arithmetic.

Fields left unset (None) take the value of the layer below (persona, then conversation, then
request), and at the bottom the default named in each description.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_SEQUENCES = 4
# Larger than any vocabulary: top_k beyond the vocabulary size keeps every token.
MAX_TOP_K = 1_000_000
INT64 = (-(2**63), 2**63 - 1)
_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")  # the engine then checks it is in the vocabulary
# What OpenAI's own API knows; the rest (top_k, min_p, repetition_penalty) are vLLM's and llama.cpp's
# extensions, not sent to a remote server that may refuse them.
OPENAI_NAMES = {
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "max_tokens",
    "stop",
    "logit_bias",
}


def _real(description: str, **bounds: float) -> Any:
    """A finite number within `bounds`; an integer is a number, a string or a boolean is not."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, description=description, **bounds)]


def _integer(description: str, **bounds: int) -> Any:
    """A whole number within `bounds`: 1.0, "1" and true are refused (no silent rounding)."""
    return Annotated[int, Field(strict=True, description=description, **bounds)]


Temperature = _real("Randomness; 0 always picks the likeliest token. Default 1.", ge=0, le=2)
TopP = _real("Keep the likeliest tokens whose probabilities add up to this. Default 1 (all).", gt=0, le=1)
TopK = _integer("Keep only the k likeliest tokens; 0 keeps all. Default 0.", ge=0, le=MAX_TOP_K)
MinP = _real("Drop tokens less likely than this fraction of the likeliest. Default 0.", ge=0, le=1)
Penalty = _real(
    "OpenAI's additive penalty on tokens already in the reply (frequency: per occurrence; presence: "
    "once). Default 0.",
    ge=-2,
    le=2,
)
RepetitionPenalty = _real(
    "Divides the logits of tokens seen in the prompt or the reply (>1 discourages repeats). Default 1.",
    ge=0.01,
    le=10,
)
Seed = _integer("Same seed, same options: the same text from this server.", ge=INT64[0], le=INT64[1])
MaxTokens = _integer("Most tokens the reply may have. Default: the room left in the context.", ge=1)
Bias = _real("Added to the token's logit; -100 bans it.", ge=-100, le=100)


class Options(BaseModel):
    """Sampling options; unknown names are refused (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    max_tokens: MaxTokens | None = None
    stop: Annotated[
        str | list[str] | None,
        Field(description=f"Up to {MAX_STOP_SEQUENCES} strings that end the reply (not included)."),
    ] = None
    logit_bias: Annotated[
        dict[str, Bias] | None,
        Field(description="Token id -> added to its logit, in [-100, 100]; -100 bans the token."),
    ] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:20]!r}")
        return value

    def set_values(self) -> dict[str, Any]:
        """The options this layer sets (JSON-ready, for storing)."""
        return self.model_dump(exclude_none=True, include=set(Options.model_fields))


def description(name: str) -> str:
    """What option `name` means, its range and default, as the table says (for help texts)."""
    field = Options.model_fields[name]
    if field.description:
        return field.description
    for kind in typing.get_args(field.annotation):
        for meta in getattr(kind, "__metadata__", ()):
            if getattr(meta, "description", None):
                return meta.description
    return ""


class OptionsError(ValueError):
    """A value no entry point accepts; `param` names it as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def describe_error(error: ValidationError) -> OptionsError:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown option"
    return OptionsError(f"{param}: {message}" if param else message, param)


def parse(values: dict[str, Any] | None) -> Options:
    """Options from a JSON object (settings, an import): OptionsError says what is wrong."""
    if values is not None and not isinstance(values, dict):
        raise OptionsError("settings must be an object", None)
    try:
        return Options.model_validate(values or {})
    except ValidationError as exc:
        raise describe_error(exc) from None


def merged(*layers: dict[str, Any] | Options | None) -> Options:
    """Later layers win; a layer's unset options leave the ones below in place.

    Validated again as a whole: settings stored by an older version may hold what is now refused.
    """
    values: dict[str, Any] = {}
    for layer in layers:
        if isinstance(layer, Options):
            layer = layer.set_values()
        values.update({k: v for k, v in (layer or {}).items() if v is not None})
    return parse(values)


def _from_text(text: str) -> Any:
    """A value typed as text (a flag, a chat command): a JSON number, true/false or null when it reads
    as one (so "1.5" is the number 1.5, and a seed of 1.5 is refused as the API refuses it); else
    the string itself, which the table refuses where a number is wanted."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, int | float | bool) or value is None else text


def parse_text(values: dict[str, str | list[str] | dict[str, str] | None]) -> Options:
    """Options from text: `stop` a list of strings, `logit_bias` token id -> bias text, the rest one
    text each; None is unset. Checked by the same table as JSON (OptionsError says what is wrong)."""
    parsed: dict[str, Any] = {}
    for name, text in values.items():
        if text is None:
            continue
        if name == "stop":
            parsed[name] = text
        elif isinstance(text, dict):
            parsed[name] = {key: _from_text(value) for key, value in text.items()}
        elif isinstance(text, str):
            parsed[name] = _from_text(text)
        else:
            parsed[name] = text
    return parse(parsed)
