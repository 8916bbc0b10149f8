"""The model a run trains, built from the module's settings before anything trains:

    from_pretrained(hub name | local path | bundled:<name>)     real weights, in float32
    or T5(config of a named shape), random weights              only with random_init: true

then, in the fine-tuning module, quantized (QLoRA) and given the method's adapter. The method
option's type (any method's config) and the allow-list that lets checkpoints holding those
configs load with ``weights_only=True`` live here too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch
import transformers

from experiments.data import ASSETS, tokenizer_path
from experiments.settings import GenerationSettings, OptimizerSettings
from peftcore import methods
from peftcore.config import NF4Config
from peftcore.t5 import SHAPES, t5_config

# Checkpoints store the hyperparameters, method configs included; torch.load(weights_only=True)
# (Lightning's default on resume) unpickles only allow-listed classes. These are plain dataclasses.
torch.serialization.add_safe_globals(
    [*methods.config_classes(), NF4Config, OptimizerSettings, GenerationSettings]
)
# The method option: any method's config (the CLI then knows their fields).
MethodConfig = Union[methods.config_classes()]  # noqa: UP007 (a Union of a runtime tuple)


def method_fields() -> str:
    """One line per method: its config class and its fields (for ``fit --help``)."""
    return "; ".join(
        f"{cls.__name__} ({', '.join(f.name for f in dataclasses.fields(cls))})"
        for cls in methods.config_classes()
    )


BUNDLED = "bundled:"  # pretrained: bundled:t5-tiny-dialogue names a model shipped in experiments/assets


def bundled_model(name: str) -> Path:
    path = ASSETS / name
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())
        raise ValueError(f"no bundled model {name!r}; the bundled models are {shipped}")
    return path


def check_model_source(pretrained: str | None, shape: str | None, random_init: bool) -> None:
    """Exactly one of: real weights from ``pretrained``, or a named shape with ``random_init``."""
    if pretrained and shape:
        raise ValueError(f"give either pretrained ({pretrained!r}) or shape ({shape!r}), not both")
    if pretrained:
        if pretrained.startswith(BUNDLED):
            bundled_model(pretrained.removeprefix(BUNDLED))
        return
    if not shape:
        raise ValueError("set pretrained (a hub name such as google-t5/t5-base, or a local path) or shape")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {sorted(SHAPES)}")
    if not random_init:
        raise ValueError(
            f"shape={shape!r} builds a model with random weights; set random_init: true to ask for that explicitly, "
            "or set pretrained to load real weights"
        )


def build_model(
    pretrained: str | None, shape: str | None, random_init: bool, gated: bool, dropout_rate: float | None
) -> transformers.T5ForConditionalGeneration:
    """The model ``check_model_source`` allows: real weights, or a named shape's random ones."""
    check_model_source(pretrained, shape, random_init)
    overrides = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
    if pretrained:
        if pretrained.startswith(BUNDLED):
            pretrained = str(bundled_model(pretrained.removeprefix(BUNDLED)))
        # float32 whatever the file stores (the shipped tiny base is bfloat16 on disk): Lightning's
        # precision setting decides the compute dtype.
        return transformers.T5ForConditionalGeneration.from_pretrained(
            pretrained, dtype=torch.float32, **overrides
        )
    config = t5_config(shape, gated=gated)
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.T5ForConditionalGeneration(config)


def with_tokenizer_path(peft: MethodConfig) -> MethodConfig:
    """``peft`` with its ``tokenizer`` (prompt tuning's text init) as a hub name or a path: a
    bundled name (``bundled:t5-tokenizer``) becomes the shipped tokenizer's path, found from any
    working directory (the saved hyperparameters keep the portable name)."""
    tokenizer = getattr(peft, "tokenizer", None)
    return peft if tokenizer is None else dataclasses.replace(peft, tokenizer=tokenizer_path(tokenizer))
