"""prompt_tuning.yaml's tokenizer names the bundled one, so the config works from any working directory."""

from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser

import experiments.data as data_mod
from experiments.data import load_tokenizer
from experiments.module import Seq2SeqFineTuner
from peftcore import PromptTuningConfig

PROMPT_TUNING_YAML = Path(data_mod.__file__).parents[1] / "configs" / "prompt_tuning.yaml"


def test_prompt_tuning_yaml_tokenizer_resolves_outside_the_repository(monkeypatch, tmp_path):
    """The prompt config's tokenizer names the bundled one, so it loads from any working directory."""
    section = yaml.safe_load(PROMPT_TUNING_YAML.read_text())["model"]["peft"]
    monkeypatch.chdir(tmp_path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--peft", type=PromptTuningConfig)
    config = parser.instantiate_classes(parser.parse_object({"peft": section["init_args"]})).peft
    model = Seq2SeqFineTuner(pretrained="bundled:t5-tiny-dialogue", peft=config).model  # as fit builds it
    expected = load_tokenizer("bundled")(config.init_text)["input_ids"]
    prompt = next(p for n, p in model.named_parameters() if p.requires_grad)
    embeddings = model.get_input_embeddings().weight
    assert prompt.shape[0] == 20 and torch.equal(prompt[: len(expected)], embeddings[expected[:20]])
    assert config.init == "text" and data_mod.is_bundled(config.tokenizer)
