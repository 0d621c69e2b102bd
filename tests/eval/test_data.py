"""The evaluation sets that ship are what build.py makes from the data packages, and they are hard
enough to mean something: a right answer never stands out by shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tertulia.eval.suite import DATA


def test_shipped_sets_rebuild_identically(tmp_path: Path) -> None:
    pytest.importorskip("chatterbot_corpus")
    pytest.importorskip("yaml")
    from tertulia.eval.data.build import build

    for built in build(tmp_path):
        assert built.read_bytes() == (DATA / built.name).read_bytes(), built.name


def test_trivia_choices() -> None:
    items = [json.loads(line) for line in (DATA / "trivia-choice.jsonl").read_text().splitlines()]
    assert len(items) == 260
    positions = [item["answer"] for item in items]
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
    # The right answer is spread over the four places: always answering "A" scores about 25%.
    assert all(40 < positions.count(p) < 90 for p in range(4))
    years = [i for i in items if i["choices"][i["answer"]].isdigit() and len(i["choices"][i["answer"]]) == 4]
    assert years and all(all(c.isdigit() for c in i["choices"]) for i in years)
