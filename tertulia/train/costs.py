"""What text costs in tokens: exact counts with a model's tokenizer and chat template, priced with a
dated table of hosted models and, measured on this machine, in CPU time of the local engine."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tertulia.errors import TertuliaError
from tertulia.models.registry import TextSide

Message = dict[str, Any]
FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".md")  # an argument ending so is a file that must exist


@dataclass
class PriceTable:
    date: str
    models: dict[str, tuple[float, float]]  # USD per 1M tokens: (input, output)
    training: dict[str, float] = field(default_factory=dict)  # USD per 1M training tokens

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        """The shipped table, or an edited copy of it."""
        try:
            if path is None:
                text = resources.files("tertulia.train").joinpath("prices.json").read_text(encoding="utf-8")
            else:
                text = path.read_text(encoding="utf-8")
            data = json.loads(text)
            models = {name: (float(i), float(o)) for name, (i, o) in data["models"].items()}
            training = {name: float(price) for name, price in data.get("training", {}).items()}
            return cls(str(data["date"]), models, training)
        except OSError as exc:
            raise TertuliaError(f"Cannot read the price table {path}: {exc.strerror}.") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise TertuliaError(
                f"The price table {path} is not in the expected shape ({exc}).",
                'Write {"date": "YYYY-MM-DD", "models": {"name": [input_usd_per_1m, output_usd_per_1m]}}.',
            ) from None


@dataclass
class Count:
    """Tokens of one input: plain text, or chat messages (with the template's own tokens)."""

    total: int
    per_message: list[tuple[str, int]] | None = None  # (role, content tokens) for chat input

    @property
    def overhead(self) -> int:
        """Tokens the chat template adds around the messages (role markers, default system prompt)."""
        return self.total - sum(n for _, n in self.per_message or [])


def read_input(argument: str) -> str | list[Message]:
    """TEXT, '-' (stdin), a text file, or a .json/.jsonl file of chat messages."""
    if argument == "-":
        return sys.stdin.read()
    path = Path(argument)
    if not path.is_file():
        if "\n" not in argument and path.suffix in FILE_SUFFIXES:
            raise TertuliaError(
                f"No file {argument}.", "To count that text itself, write it without the suffix."
            )
        return argument
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        return _messages(json.loads(text), path)
    if path.suffix == ".jsonl":
        messages: list[Message] = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                messages += _messages(json.loads(line), path, number)
        return messages
    return text


def _messages(data: Any, path: Path, line: int | None = None) -> list[Message]:
    where = f"{path}:{line}" if line else str(path)
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
        for m in data
    ):
        raise TertuliaError(
            f"{where} is not chat messages.",
            'Give a list of {"role": ..., "content": ...} objects, or {"messages": [...]}.',
        )
    return data


def count(text_side: TextSide, what: str | list[Message]) -> Count:
    if isinstance(what, str):
        return Count(len(text_side.tokenizer.encode(what)))
    total = len(text_side.template.encode(what, add_generation_prompt=True))
    per_message = [(m["role"], len(text_side.tokenizer.encode(m["content"]))) for m in what]
    return Count(total, per_message)


def hosted_costs(
    table: PriceTable, input_tokens: int, output_tokens: int
) -> list[tuple[str, float, float, float]]:
    """(model, input USD, output USD, total USD), cheapest first."""
    rows = []
    for name, (price_in, price_out) in table.models.items():
        cost_in, cost_out = input_tokens * price_in / 1e6, output_tokens * price_out / 1e6
        rows.append((name, cost_in, cost_out, cost_in + cost_out))
    return sorted(rows, key=lambda row: (row[3], row[0]))


@dataclass
class LocalSpeed:
    """The local engine's speed on this machine, measured: prompt (prefill) and generation (decode)."""

    prefill_per_second: float
    decode_per_second: float
    threads: int

    def seconds(self, input_tokens: int, output_tokens: int) -> float:
        return input_tokens / self.prefill_per_second + output_tokens / self.decode_per_second

    def cpu_hours(self, input_tokens: int, output_tokens: int) -> float:
        return self.seconds(input_tokens, output_tokens) * self.threads / 3600


def measure_local(spec: str | None, prompt_tokens: int = 256, decode_tokens: int = 48) -> LocalSpeed:
    """Load the model as `tertulia serve` does and time one prefill and one short generation."""
    import asyncio
    import time

    import torch

    from tertulia.providers.base import ReplyRequest
    from tertulia.providers.local import LocalProvider
    from tertulia.providers.options import Options

    provider = LocalProvider.load(spec, max_batch=1, prefix_cache=False, inline=True)
    vocab = provider.model.config.vocab_size
    prompt = [t % vocab for t in range(1000, 1000 + prompt_tokens)]

    async def stamps(ids: list[int], tokens: int) -> tuple[float, list[float]]:
        options = Options(temperature=0, max_tokens=tokens)
        started = time.perf_counter()
        reply = await provider.reply(ReplyRequest(prompt=ids, options=options, ignore_eos=True))
        return started, [time.perf_counter() async for event in reply if event.token_ids]

    asyncio.run(stamps(prompt[:16], 4))  # warm-up
    started, times = asyncio.run(stamps(prompt, decode_tokens))
    prefill = times[0] - started
    decode = (len(times) - 1) / (times[-1] - times[0])
    return LocalSpeed(prompt_tokens / prefill, decode, torch.get_num_threads())
