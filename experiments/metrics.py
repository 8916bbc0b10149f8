"""ROUGE for dialogue summaries: multi-reference, stemmed, offline.

Scores are F1 values in 0..1 (the scale of HF `evaluate`'s rouge); multiply by 100 for the
usual table layout. Each prediction is scored against every reference summary of its
dialogue and keeps, per ROUGE type, the best F1 over those references (``rouge-score``'s
``score_multi``, torchmetrics' ``accumulate="best"``); the corpus score is the mean over
examples.

The per-pair scoring is the ``rouge-score`` package (Google's reference implementation, the
one HF `evaluate` wraps) with the Porter stemmer. ROUGE-Lsum needs one sentence per line;
the usual recipe calls ``nltk.sent_tokenize``, which needs the ``punkt`` model and thus a
download, so sentences are split here with a regex (`split_sentences`) instead.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torchmetrics import Metric

if TYPE_CHECKING:  # imported when first scored: rouge-score pulls in nltk (0.4 s at every CLI start)
    from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at ., ! or ? followed by whitespace. Punkt also knows abbreviations
# ("e.g. this"); summaries of customer-support chats rarely contain them.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences: at line breaks and after ``.``, ``!`` or ``?``."""
    return [s for line in text.splitlines() for s in _SENTENCE_END.split(line.strip()) if s]


def _scorer() -> rouge_scorer.RougeScorer:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def check_references(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "each prediction needs the list of its references"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


def _best_f1(scorer: rouge_scorer.RougeScorer, prediction: str, references: list[str]) -> dict[str, float]:
    """Per ROUGE type, the best F1 of ``prediction`` over ``references``."""
    pred = "\n".join(split_sentences(prediction))
    refs = ["\n".join(split_sentences(r)) for r in references]
    scores = [scorer.score(ref, pred) for ref in refs]
    return {key: max(s[key].fmeasure for s in scores) for key in ROUGE_KEYS}


class Rouge(Metric):
    """ROUGE-1/2/L/Lsum F1 (0..1), best over each example's references, mean over examples.

    Call ``update(predictions, references)`` once per batch and ``compute()`` at the end of
    the epoch; the state is a running sum and count per ROUGE type, so under DDP the ranks'
    states add up to the score over every example seen by any rank.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scorer = _scorer()
        for key in ROUGE_KEYS:
            # float64: sums over thousands of examples stay exact to ~1e-12.
            self.add_state(key, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[list[str]]) -> None:
        """Score one batch: ``references[i]`` holds every reference summary of example ``i``."""
        check_references(predictions, references)
        for prediction, refs in zip(predictions, references):
            for key, value in _best_f1(self.scorer, prediction, refs).items():
                setattr(self, key, getattr(self, key) + value)
        self.count = self.count + len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean F1 per ROUGE type over all examples: keys rouge1, rouge2, rougeL, rougeLsum."""
        return {key: getattr(self, key) / self.count for key in ROUGE_KEYS}


def rouge_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F1 in 0..1, best over each example's references, mean over examples.

    Args:
        predictions: One generated summary per example.
        references: For each example, the list of its reference summaries.
    """
    if not predictions:
        raise ValueError("rouge_scores needs at least one prediction")
    metric = Rouge()
    metric.update(predictions, references)
    return {key: value.item() for key, value in metric.compute().items()}
