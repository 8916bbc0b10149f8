"""ROUGE against the rouge-score package and torchmetrics, on real TweetSumm summaries."""

import json
import socket

import nltk
import pytest
from rouge_score import rouge_scorer
from torchmetrics.functional.text import rouge as tm_rouge
from torchmetrics.text import ROUGEScore

from experiments.data import BUNDLED_TWEETSUMM
from experiments.metrics import ROUGE_KEYS, Rouge, rouge_scores, split_sentences


def _test_set() -> tuple[list[str], list[list[str]]]:
    """Predictions that are real but imperfect: one annotator's summary scored against the others',
    and a lead baseline (the first two turns) for the dialogues with a single summary."""
    predictions, references = [], []
    with open(BUNDLED_TWEETSUMM / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            summaries = row["summaries"]
            if len(summaries) > 1:
                predictions.append(summaries[0])
                references.append(summaries[1:])
            else:
                predictions.append(" ".join(t["text"] for t in row["turns"][:2]))
                references.append(summaries)
    return predictions, references


PREDICTIONS, REFERENCES = _test_set()


def test_matches_rouge_score_package_on_tweetsumm():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    expected = {k: 0.0 for k in ROUGE_KEYS}
    for pred, refs in zip(PREDICTIONS, REFERENCES):
        # rouge1/2/L on the raw texts; rougeLsum needs one sentence per line
        plain = [scorer.score(ref, pred) for ref in refs]
        lines = [
            scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred))) for ref in refs
        ]
        for key in ("rouge1", "rouge2", "rougeL"):
            expected[key] += max(s[key].fmeasure for s in plain) / len(PREDICTIONS)
        expected["rougeLsum"] += max(s["rougeLsum"].fmeasure for s in lines) / len(PREDICTIONS)
    got = rouge_scores(PREDICTIONS, REFERENCES)
    assert set(got) == set(ROUGE_KEYS)
    for key in ROUGE_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-6)
    assert 0.1 < got["rouge2"] < got["rouge1"] < 0.7  # a 0..1 scale, and not a degenerate case
    assert any(len(split_sentences(p)) > 1 for p in PREDICTIONS)  # Lsum saw multi-sentence texts


def test_matches_torchmetrics_best_of_references(monkeypatch):
    """An independent implementation; its sentence splitter would download nltk punkt, so it gets ours."""
    monkeypatch.setattr(tm_rouge, "_split_sentence", split_sentences)
    reference = ROUGEScore(use_stemmer=True, accumulate="best")(PREDICTIONS, REFERENCES)
    got = rouge_scores(PREDICTIONS, REFERENCES)
    for key in ROUGE_KEYS:
        assert got[key] == pytest.approx(reference[f"{key}_fmeasure"].item(), abs=1e-6)


def test_rouge_lsum_scores_sentences_not_the_whole_text():
    # One LCS over the whole text matches only "the dog ran" (3 of 6 tokens);
    # per sentence, each reference sentence finds its match.
    scores = rouge_scores(["The cat sat. The dog ran!"], [["The dog ran. The cat sat."]])
    assert scores["rougeL"] == pytest.approx(0.5)
    assert scores["rougeLsum"] == pytest.approx(1.0)
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rouge2"] == pytest.approx(4 / 5)  # "sat the" is not in the reference


def test_split_sentences():
    assert split_sentences("Hi there. How are you?\nFine!  ok\n\n") == [
        "Hi there.",
        "How are you?",
        "Fine!",
        "ok",
    ]
    assert split_sentences("Version 11.1.2 is out") == ["Version 11.1.2 is out"]
    assert split_sentences("") == []


def test_best_reference_and_stemming():
    scores = rouge_scores(["customers were asking"], [["nothing in common", "the customer asked"]])
    assert scores["rouge1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))  # stems: custom, ask
    assert scores["rouge1"] > 0.6


def test_empty_prediction_scores_zero():
    assert rouge_scores([""], [["The agent helped."]]) == {k: 0.0 for k in ROUGE_KEYS}
    mixed = rouge_scores(["The agent helped.", ""], [["The agent helped."], ["Something."]])
    assert mixed == pytest.approx({k: 0.5 for k in ROUGE_KEYS})


def test_accumulator_over_batches_equals_one_call():
    metric = Rouge()
    metric.update(PREDICTIONS[:40], REFERENCES[:40])
    metric.update(PREDICTIONS[40:], REFERENCES[40:])
    batched = {k: v.item() for k, v in metric.compute().items()}
    assert batched == pytest.approx(rouge_scores(PREDICTIONS, REFERENCES), abs=1e-12)
    metric.reset()
    metric.update(PREDICTIONS[:3], REFERENCES[:3])
    assert {k: v.item() for k, v in metric.compute().items()} == pytest.approx(
        rouge_scores(PREDICTIONS[:3], REFERENCES[:3]), abs=1e-12
    )


def test_states_add_up_across_ranks():
    """What DDP's sync does (sum of every state): two ranks' halves give the score over all."""
    rank0, rank1 = Rouge(), Rouge()
    rank0.update(PREDICTIONS[::2], REFERENCES[::2])
    rank1.update(PREDICTIONS[1::2], REFERENCES[1::2])
    assert all(rank0._reductions[name] is not None for name in rank0._defaults)
    rank0.merge_state(rank1)
    merged = {k: v.item() for k, v in rank0.compute().items()}
    assert merged == pytest.approx(rouge_scores(PREDICTIONS, REFERENCES), abs=1e-12)


def test_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("ROUGE tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(nltk, "download", refuse)
    assert rouge_scores(["One. Two."], [["One. Two."]])["rougeLsum"] == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        rouge_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        rouge_scores(["a"], ["a"])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        rouge_scores(["a"], [[]])
    with pytest.raises(ValueError, match="at least one prediction"):
        rouge_scores([], [])
