"""Adapter files both ways, over the configurations peft users save: each adapter peft saves loads
here to peft's logits, the same adapter saved here loads in peft to ours, and every setting
peftcore cannot honour is refused by name. Every adapter tensor is moved away from its init first
(B != 0, IA3 vectors != 1): an adapter that does nothing proves nothing.

To check a new peft release: ``pip install -U peft && pytest tests/peftcore/test_peft_matrix.py``.
"""

import copy
import json
import warnings

import peft
import pytest
import safetensors.torch
import torch
from helpers import build_t5, t5_batch

from peftcore import count_parameters, load_adapter, save_adapter
from peftcore.checkpoint import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

ALL_LINEAR = ["q", "k", "v", "o", "wi", "wo"]
LORA = dict(r=4, lora_alpha=8, target_modules=["q", "v"])

# id: (peft config class, its arguments, gated T5)
CASES = {
    "lora-qv": ("lora", LORA, False),
    "lora-regex": ("lora", dict(LORA, target_modules=r"decoder\.block\.\d+\.layer\.\d\.\w+\.(q|v)"), False),
    "lora-all-linear": ("lora", dict(LORA, target_modules="all-linear"), False),
    "lora-patterns": (
        "lora",
        dict(
            LORA,
            target_modules=["q", "k", "v", "o"],
            rank_pattern={"k": 2, r"decoder\.block\.1\.layer\.\d\.\w+\.q": 6},
            alpha_pattern={"o": 3, "v": 32},
        ),
        False,
    ),
    "lora-layers-to-transform": ("lora", dict(LORA, layers_to_transform=[1]), False),
    "lora-layers-pattern": (
        "lora",
        dict(LORA, target_modules=["q", "v", "wi"], layers_to_transform=0, layers_pattern="block"),
        False,
    ),
    "lora-exclude": ("lora", dict(LORA, target_modules=ALL_LINEAR, exclude_modules=["wo", "o"]), False),
    "lora-exclude-regex": (
        "lora",
        dict(LORA, target_modules=ALL_LINEAR, exclude_modules=r"encoder\..*"),
        False,
    ),
    "lora-rslora": ("lora", dict(LORA, r=8, lora_alpha=4, use_rslora=True, target_modules=ALL_LINEAR), False),
    "lora-dropout": ("lora", dict(LORA, lora_dropout=0.1), False),
    "lora-lm-head": ("lora", dict(LORA, target_modules=["q", "lm_head"]), False),
    "lora-gated": ("lora", dict(LORA, target_modules=["q", "wi_0", "wi_1", "wo"]), True),
    "lora-gated-all-linear": ("lora", dict(LORA, target_modules="all-linear"), True),
    "lora-save-lm-head": ("lora", dict(LORA, modules_to_save=["lm_head"]), False),
    "lora-save-embed-tokens": ("lora", dict(LORA, modules_to_save=["embed_tokens"]), False),
    "lora-save-final-layer-norm": ("lora", dict(LORA, modules_to_save=["final_layer_norm"]), False),
    "lora-save-suffix": ("lora", dict(LORA, modules_to_save=["layer_norm"]), False),  # also final_layer_norm
    "lora-save-untied-lm-head": ("lora", dict(LORA, modules_to_save=["lm_head", "embed_tokens"]), True),
    "lora-gaussian": ("lora", dict(LORA, init_lora_weights="gaussian"), False),
    "lora-pissa": ("lora", dict(LORA, init_lora_weights="pissa"), False),
    "lora-olora": ("lora", dict(LORA, init_lora_weights="olora"), False),
    "lora-pissa-patterns": ("lora", dict(LORA, init_lora_weights="pissa", rank_pattern={"v": 2}), False),
    "lora-bias-lora-only": ("lora", dict(LORA, bias="lora_only"), False),  # T5's linears have no bias
    "lora-fan-in-fan-out": ("lora", dict(LORA, fan_in_fan_out=True), False),  # peft resets it for nn.Linear
    "ia3-defaults": ("ia3", dict(), False),
    "ia3-all": (
        "ia3",
        dict(target_modules=ALL_LINEAR + ["lm_head"], feedforward_modules=["wo", "wi"]),
        False,
    ),
    "ia3-gated": (
        "ia3",
        dict(target_modules=["k", "v", "wi_0", "wi_1", "wo"], feedforward_modules=["wi_0", "wi_1", "wo"]),
        True,
    ),
    "ia3-feedforward-suffix": (
        "ia3",
        dict(target_modules=["k", "o", "wo"], feedforward_modules=["o"]),
        False,
    ),  # o and wo
    "ia3-regex": ("ia3", dict(target_modules=r".*\.(k|v|wo)", feedforward_modules=r".*\.wo"), False),
    "ia3-exclude": (
        "ia3",
        dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"], exclude_modules=r"decoder\..*"),
        False,
    ),
    "ia3-save-lm-head": ("ia3", dict(modules_to_save=["lm_head"]), False),
}


def peft_config(kind: str, arguments: dict):
    cls = peft.LoraConfig if kind == "lora" else peft.IA3Config
    return cls(task_type="SEQ_2_SEQ_LM", **copy.deepcopy(arguments))


def perturb(model, seed: int) -> None:
    """Move every trainable tensor (A, B, IA3 vectors, trained copies) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def peft_trained(base, kind: str, arguments: dict, seed: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(kind, arguments))
    perturb(theirs, seed)
    return theirs


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_adapters_cross_both_ways_with_equal_logits(case, tmp_path):
    kind, arguments, gated = CASES[case]
    base = build_t5("t5-tiny", gated=gated)
    batch = t5_batch()
    theirs = peft_trained(base, kind, arguments)
    theirs.save_pretrained(tmp_path / "peft")

    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")  # onto the original base, as peft loads it
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=1e-5, rtol=1e-5)
    assert count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]

    perturb(ours, seed=2)
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(again, batch), logits(ours, batch), atol=1e-5, rtol=1e-5)


def test_two_adapters_in_one_directory(tmp_path):
    """peft writes the first adapter at the top and each other one in a subdirectory of its name."""
    base = build_t5("t5-tiny")
    theirs = peft_trained(base, "lora", LORA)
    theirs.add_adapter("second", peft_config("lora", dict(LORA, r=2, target_modules=["k", "wo"])))
    theirs.set_adapter("second")
    perturb(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    batch = t5_batch()
    for adapter, directory in [("default", tmp_path), ("second", tmp_path / "second")]:
        theirs.set_adapter(adapter)
        ours = load_adapter(copy.deepcopy(base), directory)
        torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=1e-5, rtol=1e-5)


def test_pickled_bin_adapter_loads(tmp_path):
    base = build_t5("t5-tiny")
    theirs = peft_trained(base, "lora", dict(LORA, modules_to_save=["lm_head"]))
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / WEIGHTS_NAME).exists()
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, t5_batch()), logits(theirs, t5_batch()), atol=1e-5, rtol=1e-5)


class Opaque:
    """Not a tensor: unpickling it would need this module's code."""


def test_a_bin_that_needs_pickle_is_refused(tmp_path):
    theirs = peft_trained(build_t5("t5-tiny"), "lora", LORA)
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    tensors = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    torch.save({**tensors, "extra": Opaque()}, tmp_path / "adapter_model.bin")
    model = build_t5("t5-tiny")
    with pytest.raises(
        ValueError, match=r"adapter_model.bin holds Python objects other than tensors.*weights_only=True"
    ):
        load_adapter(model, tmp_path)
    assert not hasattr(model, "peftcore_config")


def test_layers_to_transform_of_peft_before_0_20(tmp_path):
    """peft <= 0.19 took the last number in a module's name as its layer: in T5 that is the
    sub-layer inside a block, so layers_to_transform=[0] meant every block's self-attention."""
    base = build_t5("t5-tiny")
    names = [
        n for n, _ in base.named_modules() if n.endswith(("q", "v")) and ".layer.0." in n
    ]  # what 0.19 selected
    theirs = peft_trained(base, "lora", dict(LORA, target_modules=names))
    theirs.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    data.update(
        target_modules=["q", "v"], layers_to_transform=[0], layers_pattern=None, peft_version="0.19.1"
    )
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, t5_batch()), logits(theirs, t5_batch()), atol=1e-5, rtol=1e-5)


def test_pissa_niter_is_saved_converted_for_the_original_base(tmp_path):
    """A randomised PiSSA cannot be re-run exactly, so it is saved as peft's conversion does: a
    rank-2r plain LoRA relative to the original base."""
    from peftcore import LoRAConfig, inject

    base = build_t5("t5-tiny")
    ours = inject(
        copy.deepcopy(base), LoRAConfig(r=4, alpha=8, init="pissa_niter_2", target_modules=("q", "v"))
    )
    perturb(ours, seed=3)
    save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(theirs, t5_batch()), logits(ours, t5_batch()), atol=1e-5, rtol=1e-5)


def test_peft_pissa_niter_loads_with_a_warning(tmp_path):
    base = build_t5("t5-tiny")
    peft_trained(base, "lora", dict(LORA, init_lora_weights="pissa_niter_2")).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="randomised.*path_initial_model_for_weight_conversion"):
        load_adapter(copy.deepcopy(base), tmp_path)


def saved_by_peft(tmp_path, kind="lora", arguments=LORA):
    peft_trained(build_t5("t5-tiny"), kind, arguments).save_pretrained(tmp_path)
    return json.loads((tmp_path / CONFIG_NAME).read_text())


REFUSED = [
    ("lora_bias", True, "lora_B"),
    ("use_qalora", True, "QALoRA"),
    ("trainable_token_indices", [1, 2], "token"),
    ("ensure_weight_tying", True, "tied"),
    ("layer_replication", [[0, 1]], "replication"),
    ("target_parameters", ["weight"], "nn.Parameters"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "Megatron"),
    ("alora_invocation_tokens", [5], "activated"),
    ("arrow_config", {"top_k": 2}, "Arrow"),
    ("use_bdlora", {"nblocks": 2}, "block-diagonal"),
    ("velora_config", {"num_groups": 8}, "VeLoRA"),
    ("monteclora_config", {"num_samples": 2}, "MonteCLoRA"),
    ("kasa_config", {"beta": 0.1}, "KaSA"),
    ("a_field_of_peft_0_99", 3, "does not know"),
    ("loftq_config", {"loftq_bits": 4, "loftq_iter": 2}, "no effect"),
    ("init_lora_weights", "corda", "CorDA"),
    ("init_lora_weights", "lora_ga", "LoRA-GA"),
    ("init_lora_weights", "mica", "MiCA"),
    ("init_lora_weights", "xavier", "does not know"),
    ("bias", "some", "'none', 'all' or 'lora_only'"),
]


@pytest.mark.parametrize("field, value, why", REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_settings_peftcore_cannot_honour_are_refused_by_name(tmp_path, field, value, why):
    data = saved_by_peft(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, field: value}))
    model = build_t5("t5-tiny")
    with pytest.raises(
        ValueError, match=rf"{field}={value!r}".replace("[", r"\[").replace("(", r"\(")
    ) as info:
        load_adapter(model, tmp_path)
    assert why in str(info.value) and not hasattr(model, "peftcore_config")


@pytest.mark.parametrize(
    "field, value",
    [
        ("a_field_of_peft_0_99", None),
        ("megatron_core", "other"),
        ("eva_config", {"rho": 3.0}),
        ("qalora_group_size", 32),
        ("runtime_config", {"ephemeral_gpu_offload": True}),
    ],
)
def test_empty_new_fields_and_inert_settings_load(tmp_path, field, value):
    data = saved_by_peft(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, field: value}))
    load_adapter(build_t5("t5-tiny"), tmp_path)


def test_ia3_fields_are_accounted_for_too(tmp_path):
    data = saved_by_peft(tmp_path, "ia3", {})
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, "init_ia3_weights": False, "new_field": [1]}))
    with pytest.raises(ValueError, match=r"new_field=\[1\]"):
        load_adapter(build_t5("t5-tiny"), tmp_path)


def test_bias_all_is_refused_because_peft_trains_t5s_relative_attention_bias(tmp_path):
    """peft's bias='all' trains every parameter whose name holds 'bias': T5's linears have none,
    but its relative_attention_bias embeddings match."""
    saved_by_peft(tmp_path, "lora", dict(LORA, bias="all"))
    with pytest.raises(
        ValueError, match=r"bias='all', which trains 2 bias tensors .*relative_attention_bias"
    ):
        load_adapter(build_t5("t5-tiny"), tmp_path)


def test_a_copy_of_shared_is_refused_with_what_to_use(tmp_path):
    data = saved_by_peft(tmp_path, "lora", dict(LORA, modules_to_save=["shared"]))
    assert data["modules_to_save"] == ["shared"]
    with pytest.raises(ValueError, match=r"'shared'.*never used in forward.*'embed_tokens'.*'lm_head'"):
        load_adapter(build_t5("t5-tiny"), tmp_path)


def test_a_feedforward_vector_never_fills_an_output_slot(tmp_path):
    """t5-tiny's k is square (64 x 64): a (1, 64) vector scales its input, a (64, 1) its output."""
    theirs = peft_trained(
        build_t5("t5-tiny"), "ia3", dict(target_modules=["k", "wo"], feedforward_modules=["wo"])
    )
    theirs.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.encoder.block.0.layer.0.SelfAttention.k.ia3_l"
    assert tensors[key].shape == (64, 1)
    tensors[key] = tensors[key].reshape(1, 64)
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(
        ValueError, match=r"SelfAttention\.k\.ia3_l' has shape \(1, 64\), the model expects \(64, 1\)"
    ):
        load_adapter(build_t5("t5-tiny"), tmp_path)


def test_a_key_that_does_not_fit_names_the_field_that_explains_it(tmp_path):
    data = saved_by_peft(tmp_path, "lora", dict(LORA, layers_to_transform=[0, 1]))
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, "layers_to_transform": [0]}))
    with pytest.raises(
        ValueError, match=r"unexpected key .*block\.1.*layers_to_transform=\[0\] leaves out its layer 1"
    ):
        load_adapter(build_t5("t5-tiny"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, "exclude_modules": ["v"]}))
    with pytest.raises(ValueError, match=r"exclude_modules=\['v'\] excludes it"):
        load_adapter(build_t5("t5-tiny"), tmp_path)


def test_every_peft_field_is_in_exactly_one_table_and_in_the_readme():
    from pathlib import Path

    from peftcore.peft_format import FORMATS
    from peftcore.peft_format.ia3 import IA3Format
    from peftcore.peft_format.lora import LoRAFormat
    from peftcore.prefix import PrefixTuning

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Adapter files") :]
    for translator in FORMATS.values():
        tables = [set(translator.implemented), set(translator.at_default), set(translator.inert)]
        assert sum(len(t) for t in tables) == len(set().union(*tables)), type(translator).__name__
        missing = [f for f in set().union(*tables) if f"`{f}`" not in section]
        assert not missing, f"README's adapter section does not list {missing}"
    own = (
        set(peft.LoraConfig.__dataclass_fields__)
        - set(peft.PeftConfig.__dataclass_fields__)
        - {"runtime_config"}
    )
    accounted = set(LoRAFormat.implemented) | set(LoRAFormat.at_default) | set(LoRAFormat.inert)
    assert own <= accounted, (
        f"fields of the installed peft's LoraConfig nobody accounts for: {own - accounted}"
    )
    own = set(peft.IA3Config.__dataclass_fields__) - set(peft.PeftConfig.__dataclass_fields__)
    assert own <= set(IA3Format.implemented) | set(IA3Format.inert)
    own = set(peft.PrefixTuningConfig.__dataclass_fields__) - set(peft.PeftConfig.__dataclass_fields__)
    prefix = FORMATS[PrefixTuning]
    assert own <= set(prefix.implemented) | set(prefix.at_default) | set(prefix.inert)
