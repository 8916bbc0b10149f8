"""LoRA+ puts the same parameters at ratio x lr as peft's create_loraplus_optimizer."""

import copy

import peft
import pytest
import torch
from helpers import build_t5
from peft.optimizers import create_loraplus_optimizer

from peftcore import DoRAConfig, IA3Config, LoRAConfig, inject
from peftcore.loraplus import param_groups


def peft_name(name: str) -> str:
    """peft's parameter name in ours: no base_model.model. prefix, no adapter name."""
    return (
        name.removeprefix("base_model.model.")
        .replace(".default", "")
        .replace("lora_magnitude_vector.weight", "magnitude")
        .replace("modules_to_save.", "trained.")
    )


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(r=4, alpha=8, target_modules=("q", "v"), modules_to_save=("final_layer_norm",)),
        DoRAConfig(r=4, alpha=8, target_modules=("q", "wo")),
    ],
    ids=["lora-with-a-trained-norm", "dora"],
)
def test_the_fast_parameters_are_peft_loraplus_ones(config):
    base = build_t5("t5-tiny")
    ours = inject(copy.deepcopy(base), config)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            target_modules=list(config.target_modules),
            task_type="SEQ_2_SEQ_LM",
            modules_to_save=list(config.modules_to_save) or None,
            use_dora=isinstance(config, DoRAConfig),
        ),
    )
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in theirs.named_parameters()}
    expected = {peft_name(names[id(p)]): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in ours.named_parameters()}
    got = {names[id(p)]: g["lr"] for g in param_groups(ours, 1e-3, 0.01, ratio=16) for p in g["params"]}
    assert got == expected
    assert {lr for lr in got.values()} == {1e-3, 16e-3}


def test_weight_decay_stays_on_matrices_and_without_a_ratio_nothing_changes():
    model = inject(build_t5("t5-tiny"), DoRAConfig(r=4, alpha=8))
    for group in param_groups(model, 1e-3, 0.01, ratio=16):
        assert group["weight_decay"] == (0.01 if all(p.dim() >= 2 for p in group["params"]) else 0.0)
    plain = param_groups(model, 1e-3, 0.01)
    assert {g["lr"] for g in plain} == {1e-3}
    ia3 = param_groups(inject(build_t5("t5-tiny"), IA3Config()), 1e-3, 0.01, ratio=16)
    assert {g["lr"] for g in ia3} == {16e-3}  # as peft: every 1-D trainable parameter
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number"):
        param_groups(model, 1e-3, 0.01, ratio=0)
