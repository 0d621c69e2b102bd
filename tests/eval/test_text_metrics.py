"""Reference metrics equal sacrebleu's command line and rouge-score's own scorer on the same files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tertulia.eval.text_metrics import normalise, reference_scores

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

ANSWERS = [
    "The capital of France is Paris.",
    "Richard Nixon was the 37th president",
    "I think it was 1963, in Dallas.",
    "Echolocation!",
    "No idea, sorry — ask me something else.",
    "El río más largo es el Amazonas.",
]
REFERENCES = ["Paris", "Richard Nixon", "1963", "Echolocation", "The Andromeda Galaxy", "el Amazonas"]


def _sacrebleu_cli(tmp_path: Path, metric: str) -> float:
    (tmp_path / "hyp.txt").write_text("\n".join(ANSWERS) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
         "-m", metric, "-b", "-w", "4"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip())


def _rouge_score_cli(tmp_path: Path) -> dict[str, float]:
    """rouge-score's own command line, per answer, averaged here (its --aggregate bootstraps)."""
    targets, predictions = tmp_path / "targets.txt", tmp_path / "predictions.txt"
    targets.write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    predictions.write_text("\n".join(ANSWERS) + "\n", encoding="utf-8")
    output = tmp_path / "rouge.csv"
    subprocess.run(
        [sys.executable, "-m", "rouge_score.rouge", f"--target_filepattern={targets}",
         f"--prediction_filepattern={predictions}", f"--output_filename={output}",
         "--use_stemmer=true", "--aggregate=false", "--rouge_types=rouge1,rouge2,rougeL"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = list(csv.DictReader(output.open()))
    return {
        kind: 100 * sum(float(r[f"{kind}-F"]) for r in rows) / len(rows)
        for kind in ("rouge1", "rouge2", "rougeL")
    }


def test_bleu_and_chrf_equal_sacrebleus_cli(tmp_path: Path) -> None:
    scores = reference_scores(ANSWERS, REFERENCES)
    assert scores["bleu"] == pytest.approx(_sacrebleu_cli(tmp_path, "bleu"), abs=1e-4)
    assert scores["chrf"] == pytest.approx(_sacrebleu_cli(tmp_path, "chrf"), abs=1e-4)


def test_rouge_equals_rouge_score(tmp_path: Path) -> None:
    scores = reference_scores(ANSWERS, REFERENCES)
    for kind, value in _rouge_score_cli(tmp_path).items():
        assert scores[kind] == pytest.approx(value, abs=1e-4), kind  # its CSV has 6 decimals of 0-1


def test_exact_and_contains_match() -> None:
    scores = reference_scores(["Paris.", "It is paris", "Parisian food", "  PARIS  "], ["Paris"] * 4)
    assert scores["exact_match"] == 50.0  # "Paris." and "  PARIS  "
    assert scores["contains_match"] == 75.0  # not "Parisian": whole words only
    assert normalise("¡Hola,  Mundo!") == "hola mundo"
