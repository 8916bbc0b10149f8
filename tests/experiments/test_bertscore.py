"""BERTScore with the packaged offline model (all-MiniLM-L6-v2) against bert_score.score itself."""

import bert_score
import pytest

from experiments.bertscore import OFFLINE_MODEL, OFFLINE_MODEL_LAYERS, bert_scores, offline_model_path

try:
    MODEL_PATH = offline_model_path()
except ImportError as err:
    pytest.skip(f"offline BERTScore model not installed ({err})", allow_module_level=True)

PREDICTIONS = [
    "The customer cannot log in to the app; the agent asks them to reinstall it.",
    "The customer's parcel is late and the agent promises a refund.",
]
REFERENCES = [
    ["Customer is unable to sign in to the application. Agent suggests reinstalling the app."],
    ["Customer complains the package has not arrived.", "The agent offers a refund for the delayed parcel."],
]


@pytest.fixture(scope="module")
def ours() -> dict:
    return bert_scores(PREDICTIONS, REFERENCES, model_type=OFFLINE_MODEL, device="cpu")


def test_identical_texts_score_one():
    texts = ["The agent resets the customer's password.", "The order was shipped yesterday."]
    got = bert_scores(texts, [[t] for t in texts], model_type=OFFLINE_MODEL, device="cpu")
    for key in ("precision", "recall", "f1"):
        assert got[key] == pytest.approx(1.0, abs=1e-5)


def test_paraphrase_beats_unrelated_text():
    reference = [["The customer cannot log in and the agent tells them to reset the password."]]
    kwargs = dict(model_type=OFFLINE_MODEL, device="cpu")
    paraphrase = bert_scores(
        ["Customer is unable to sign in; agent suggests a password reset."], reference, **kwargs
    )
    unrelated = bert_scores(
        ["Heavy rain is expected across the north of the country tomorrow."], reference, **kwargs
    )
    assert paraphrase["f1"] > unrelated["f1"] + 0.3  # about 0.83 against 0.06


def test_equals_bert_score_directly_with_multiple_references(ours):
    precision, recall, f1 = bert_score.score(
        PREDICTIONS, REFERENCES, model_type=MODEL_PATH, num_layers=OFFLINE_MODEL_LAYERS, device="cpu"
    )
    assert ours["precision"] == pytest.approx(precision.mean().item(), abs=1e-6)
    assert ours["recall"] == pytest.approx(recall.mean().item(), abs=1e-6)
    assert ours["f1"] == pytest.approx(f1.mean().item(), abs=1e-6)
    # best-of-references: the two-reference example scores at least as well as against either reference alone
    _, _, f1_first = bert_score.score(
        PREDICTIONS[1:], [REFERENCES[1][0]], model_type=MODEL_PATH, num_layers=6
    )
    _, _, f1_second = bert_score.score(
        PREDICTIONS[1:], [REFERENCES[1][1]], model_type=MODEL_PATH, num_layers=6
    )
    assert f1[1].item() == pytest.approx(max(f1_first.item(), f1_second.item()), abs=1e-6)


def test_local_path_without_num_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="num_layers"):
        bert_scores(["a"], [["a"]], model_type=MODEL_PATH)


def test_local_path_containing_t5_is_refused(tmp_path):
    """bert-score would load it as a T5 encoder whatever its config says."""
    model_dir = tmp_path / "t5-study" / "minilm"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="T5 encoder"):
        bert_scores(["a"], [["a"]], model_type=str(model_dir), num_layers=6)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        bert_scores(PREDICTIONS, REFERENCES[:1], model_type=OFFLINE_MODEL)
