"""Answer checks with a margin: a fact asked several ways, and most answers must hold it.

One phrasing's greedy answer can flip on another CPU (its kernels round bf16 differently); a model
that knows the fact answers most phrasings, and a broken one (noise weights, a wrong cache) none.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence

# Each of these gets "Paris" from the default model, greedy, in float32 and in int4 on AVX2 and
# without vector kernels: requiring all but one leaves room for one flip and none for a broken model.
PARIS_QUESTIONS = [
    "What is the capital of France?",
    "Which city is the capital of France?",
    "Name the capital of France.",
    "France's capital is which city?",
    "Tell me the capital of France.",
]


def assert_mostly(answers: Sequence[str], expected: str, *, misses: int = 1) -> None:
    """At most `misses` of the answers lack `expected` (case-insensitive)."""
    hits = [expected.lower() in answer.lower() for answer in answers]
    assert answers and hits.count(False) <= misses, list(zip(answers, hits, strict=True))


# A reply: "› text" (maybe wrapped over lines), then its stats line; never spanning another "› " line.
_ANSWER = re.compile(r"^› ((?:(?!\n› ).)*?)\n  \d+ tokens? ·", re.DOTALL | re.MULTILINE)


def ask_in_terminal_chat(
    questions: Sequence[str], *extra: str, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[list[str], subprocess.CompletedProcess]:
    """Ask each question in a fresh conversation of one interactive `tertulia chat` (greedy, /reset
    between them); return the answers and the finished process."""
    script = "\n/reset\n".join(questions) + "\n/exit\n"
    result = subprocess.run(
        [sys.executable, "-m", "tertulia", "chat", "--temperature", "0", "--max-tokens", "32", *extra],
        input=script,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TERTULIA_LANG": "en", **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return _ANSWER.findall(result.stdout), result
