"""How close a model's answers come to reference answers: BLEU, chrF, ROUGE, exact and contains match.

BLEU and chrF are sacrebleu's corpus scores with its defaults (13a tokenization, what its command line
prints); ROUGE-1/2/L are rouge-score's F-measures averaged over answers, with its Porter stemmer. Exact
match and contains match compare normalised text: lower case, punctuation dropped, whitespace
collapsed; "contains" asks whether the reference appears in the answer as whole words (short
reference answers, long chatty replies). All are on a 0-100 scale. The `eval` extra supplies
sacrebleu and rouge-score.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from tertulia.errors import TertuliaError

METHOD = (
    "BLEU and chrF: sacrebleu corpus scores (defaults, 13a tokenization); ROUGE-1/2/L: rouge-score "
    "F-measure with stemming, averaged over answers; exact/contains: after lower-casing, dropping "
    "punctuation and collapsing whitespace"
)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def _libraries() -> tuple[Any, Any]:
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise TertuliaError(
            "Reference metrics need sacrebleu and rouge-score.", "Install them: pip install 'tertulia[eval]'"
        ) from None
    return sacrebleu, rouge_scorer


def reference_scores(answers: list[str], references: list[str]) -> dict[str, Any]:
    """Every metric over paired answers and references."""
    if len(answers) != len(references) or not answers:
        raise ValueError("one answer per reference, at least one")
    sacrebleu, rouge_scorer = _libraries()
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rouge = {kind: 0.0 for kind in ROUGE_TYPES}
    for answer, reference in zip(answers, references, strict=True):
        scores = scorer.score(reference, answer)
        for kind in ROUGE_TYPES:
            rouge[kind] += scores[kind].fmeasure
    pairs = [(normalise(a), normalise(r)) for a, r in zip(answers, references, strict=True)]
    count = len(answers)
    return {
        "bleu": sacrebleu.corpus_bleu(answers, [references]).score,
        "chrf": sacrebleu.corpus_chrf(answers, [references]).score,
        **{kind: 100 * total / count for kind, total in rouge.items()},
        "exact_match": 100 * sum(a == r for a, r in pairs) / count,
        "contains_match": 100 * sum(bool(r) and f" {r} " in f" {a} " for a, r in pairs) / count,
        "answers": count,
        "method": METHOD,
    }
