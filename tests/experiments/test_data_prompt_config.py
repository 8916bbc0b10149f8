"""prompt_tuning.yaml's tokenizer names the bundled one, so the config works from any working directory."""

from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

import experiments.data as data_mod
from experiments.data import load_tokenizer, tokenizer_path
from peftcore import PromptTuningConfig
from peftcore.prompt import _text_ids

PROMPT_TUNING_YAML = Path(data_mod.__file__).parent / "configs" / "prompt_tuning.yaml"


def test_prompt_tuning_yaml_tokenizer_resolves_outside_the_repository(monkeypatch, tmp_path):
    """The prompt config's tokenizer names the bundled one, so it loads from any working directory."""
    section = yaml.safe_load(PROMPT_TUNING_YAML.read_text())["model"]["peft"]
    monkeypatch.chdir(tmp_path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--peft", type=PromptTuningConfig)
    config = parser.instantiate_classes(parser.parse_object({"peft": section["init_args"]})).peft
    # what the model module does with the setting before inject(): a bundled name becomes its path
    resolved = PromptTuningConfig(**{**vars(config), "tokenizer": tokenizer_path(config.tokenizer)})
    ids = _text_ids(resolved, resolved.num_virtual_tokens)
    expected = load_tokenizer("bundled")(config.init_text)["input_ids"]
    assert len(ids) == 20 and ids[: len(expected)] == expected[:20]
    assert config.init == "text" and data_mod.is_bundled(config.tokenizer)
