"""transformers' Conv1D (GPT-2's transposed linear layer, weight (in, out), y = x W + b) as a base for
LoRA, DoRA and IA3, and in quantize, against peft (which adapts Conv1D with fan_in_fan_out=True) and
bitsandbytes (transformers loads GPT-2 in 4 bit with each Conv1D as a Linear4bit of the transposed
weight). Every adapter tensor is moved off its init first: an adapter that does nothing proves nothing.
"""

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftcore
from peftcore import DoRAConfig, IA3Config, LoRAConfig, NF4Config, NF4Linear, peft_format
from peftcore.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_adapter_tensors, to_peft_config
from peftcore.nf4 import quantize_nf4
from peftcore.surgery import wrapped_layers
from peftcore.testing import move_off_init

CASES = {
    "lora-c_attn": LoRAConfig(r=4, alpha=8, target_modules=("c_attn",)),
    "lora-all-linear": LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
    "dora-c_attn-c_proj": DoRAConfig(r=4, alpha=8, target_modules=("c_attn", "c_proj")),
    # peft's default for GPT-2 (peft.utils.constants): c_attn and mlp.c_proj, mlp.c_proj feed-forward
    "ia3-gpt2-default": IA3Config(
        target_modules=("c_attn", "mlp.c_proj"), feedforward_modules=("mlp.c_proj",)
    ),
}
# The same adapters as peft users write them: peft finds the Conv1D targets and sets fan_in_fan_out itself.
PEFT_CONFIGS = {
    "lora-c_attn": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"
    ),
    "lora-all-linear": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"
    ),
    "dora-c_attn-c_proj": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True, task_type="CAUSAL_LM"
    ),
    "ia3-gpt2-default": lambda: peft.IA3Config(task_type="CAUSAL_LM"),  # targets from peft's GPT-2 defaults
}
GRADIENT_TOLERANCE = 1e-5  # relative L2 difference of each adapter gradient


def tiny_gpt2(seed: int = 0, n_embd: int = 16) -> transformers.GPT2LMHeadModel:
    """A two-layer GPT-2 with random weights and random Conv1D biases (they start at zero, which
    would hide a bias left out of a merge or of DoRA's ``W x``), dropout off, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=n_embd, n_layer=2, n_head=2, vocab_size=100, eos_token_id=0, bos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Conv1D):
                module.bias.normal_(std=0.1)
    return model


def gpt2_batch(batch: int = 2, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def ours_off_init(base, case: str, seed: int = 3):
    return move_off_init(peftcore.inject(copy.deepcopy(base), CASES[case]), seed)


def conv1d_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def adapter_grads_in_file_names(model, tensors) -> dict[str, torch.Tensor]:
    """The adapter's gradients under the file's names: the gradients are written into the trainable
    parameters, and ``tensors()`` then returns them as the file names them (IA3's ``ia3_l`` shape too)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.grad)
    return {k: v.detach().clone() for k, v in tensors().items()}


# ---------------------------------------------------------------- the seam


def test_the_seam_reads_and_writes_a_conv1d_weight_as_out_by_in():
    from peftcore import weights

    layer = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    assert weights.is_linear(layer) and weights.is_transposed(layer) and weights.is_dense(layer)
    assert (weights.in_features(layer), weights.out_features(layer)) == (4, 6)
    assert torch.equal(weights.read_weight(layer), layer.weight.detach().t())
    assert torch.equal(weights.dense_weight(layer, torch.float64), layer.weight.detach().t().double())
    new = torch.randn(6, 4)
    weights.write_weight(layer, new)
    assert torch.equal(layer.weight.detach(), new.t())
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), x @ weights.read_weight(layer).t() + layer.bias)


# ---------------------------------------------------------------- against peft


@pytest.mark.parametrize("case", CASES)
def test_peft_reads_our_conv1d_adapter_to_our_logits_and_gradients(case, tmp_path):
    """(1) peft opens our file (fan_in_fan_out: true, so peft has nothing to correct) to our logits;
    (3) the loss's adapter gradients agree; (5) the trainable counts agree."""
    base, batch = tiny_gpt2(), gpt2_batch()
    ours = ours_off_init(base, case)
    assert {type(layer.base) for _, layer in wrapped_layers(ours)} == {Conv1D}
    if isinstance(ours.peftcore_config, LoRAConfig) and not isinstance(ours.peftcore_config, DoRAConfig):
        x = torch.randn(2, 16)
        assert all(layer.uses_fused_kernel(x) for _, layer in wrapped_layers(ours))  # covered below
    peftcore.save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert written["fan_in_fan_out"] is True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    difference = (logits(reader, batch) - logits(ours, batch)).abs().max().item()
    print(f"{case}: peft reading our file, largest logit difference {difference:.2e}")
    torch.testing.assert_close(logits(reader, batch), logits(ours, batch), atol=1e-6, rtol=1e-6)

    data = {**to_peft_config(ours.peftcore_config, ours), "inference_mode": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PeftConfig.from_peft_type(**data))
    loaded = peft.set_peft_model_state_dict(theirs, read_adapter_tensors(tmp_path / "ours"))
    assert not loaded.unexpected_keys
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), atol=1e-6, rtol=1e-6)
    assert peftcore.count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]

    for model in (ours, theirs):
        model.eval()(**batch).loss.backward()
    config = ours.peftcore_config
    ours_grads = adapter_grads_in_file_names(ours, lambda: peft_format.adapter_tensors(ours, config))
    theirs_grads = adapter_grads_in_file_names(theirs, lambda: peft.get_peft_model_state_dict(theirs))
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    assert all(g.abs().sum() > 0 for g in theirs_grads.values())  # gradients that prove something
    worst = max(relative_l2(ours_grads[k], theirs_grads[k]) for k in ours_grads)
    print(f"{case}: largest relative gradient difference {worst:.2e} over {len(ours_grads)} tensors")
    assert worst < GRADIENT_TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_we_read_peft_conv1d_adapter_to_peft_logits(case, tmp_path):
    """(2) peft's own adapter on GPT-2 (fan_in_fan_out set by peft) loads here to peft's logits; (5)
    the trainable counts agree."""
    base, batch = tiny_gpt2(), gpt2_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = move_off_init(peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[case]()), seed=4)
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = peftcore.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert type(ours.peftcore_config) is type(CASES[case])
    difference = (logits(ours, batch) - logits(theirs, batch)).abs().max().item()
    print(f"{case}: our reading of peft's file, largest logit difference {difference:.2e}")
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=1e-6, rtol=1e-6)
    assert peftcore.count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    assert sorted(n for n, _ in wrapped_layers(ours)) == sorted(
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
    )


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unmerge_on_conv1d_keep_the_logits_and_match_peft_merged_weights(case):
    """(4) merge within 1e-5, unmerge within 1e-6; the merged Conv1D weights equal peft's
    merge_and_unload on the same adapter, so the merge is written back transposed."""
    base, batch = tiny_gpt2(), gpt2_batch()
    ours = ours_off_init(base, case)
    adapted = logits(ours, batch)
    peftcore.merge(ours)
    assert all(layer.merged for _, layer in wrapped_layers(ours))
    merged_error = (logits(ours, batch) - adapted).abs().max().item()
    torch.testing.assert_close(logits(ours, batch), adapted, atol=1e-5, rtol=1e-5)
    merged_weights = {n: layer.base.weight.detach().clone() for n, layer in wrapped_layers(ours)}
    peftcore.unmerge(ours)
    unmerged_error = (logits(ours, batch) - adapted).abs().max().item()
    torch.testing.assert_close(logits(ours, batch), adapted, atol=1e-6, rtol=1e-6)
    print(f"{case}: merge changes the logits by {merged_error:.2e}, unmerge by {unmerged_error:.2e}")

    plain = peftcore.unload(copy.deepcopy(ours), merge=True)
    assert conv1d_names(plain) == conv1d_names(base)
    torch.testing.assert_close(logits(plain, batch), adapted, atol=1e-5, rtol=1e-5)

    data = {**to_peft_config(ours.peftcore_config, ours), "inference_mode": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PeftConfig.from_peft_type(**data))
        peft.set_peft_model_state_dict(theirs, peft_format.adapter_tensors(ours, ours.peftcore_config))
        theirs = theirs.merge_and_unload()
    for name, weight in merged_weights.items():
        torch.testing.assert_close(weight, theirs.get_submodule(name).weight, atol=1e-6, rtol=1e-6, msg=name)


def test_dora_with_dropout_on_conv1d_trains_as_peft():
    """DoRA's training forward with dropout computes ``W dropout(x)`` from the base weight itself
    (a Conv1D's, transposed by the seam): the same masks (one seed, one draw per layer in both
    libraries) give peft's loss and gradients."""
    base, batch = tiny_gpt2(), gpt2_batch()
    config = DoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=("c_attn", "c_proj"))
    ours = move_off_init(peftcore.inject(copy.deepcopy(base), config), 3)
    data = {**to_peft_config(config, ours), "inference_mode": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PeftConfig.from_peft_type(**data))
    peft.set_peft_model_state_dict(theirs, peft_format.adapter_tensors(ours, config))
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(7)
        loss = model.train()(**batch).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    ours_grads = adapter_grads_in_file_names(ours, lambda: peft_format.adapter_tensors(ours, config))
    theirs_grads = adapter_grads_in_file_names(theirs, lambda: peft.get_peft_model_state_dict(theirs))
    worst = max(relative_l2(ours_grads[k], theirs_grads[k]) for k in ours_grads)
    assert worst < GRADIENT_TOLERANCE, worst


def test_all_linear_on_gpt2_selects_what_peft_selects():
    """Every Conv1D (c_attn, c_proj, c_fc, mlp.c_proj) and not the output head lm_head, as peft."""
    base = tiny_gpt2()
    ours = peftcore.inject(copy.deepcopy(base), LoRAConfig(target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS["lora-all-linear"]())
    selected = sorted(n for n, _ in wrapped_layers(ours))
    assert selected == sorted(conv1d_names(base)) and len(selected) == 8
    assert selected == sorted(theirs.peft_config["default"].target_modules)


def test_a_file_with_fan_in_fan_out_false_on_conv1d_loads_with_peft_warning(tmp_path):
    """peft sets fan_in_fan_out to true for Conv1D targets whatever the file says (warning); so do
    we: the weight's layout comes from the layer, never from the field."""
    base, batch = tiny_gpt2(), gpt2_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = move_off_init(peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS["lora-c_attn"]()), 4)
    theirs.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, "fan_in_fan_out": False}))
    with pytest.warns(UserWarning, match="fan_in_fan_out is false but the targets are transformers' Conv1D"):
        ours = peftcore.load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module is `Conv1D`"):
        reader = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(reader, batch), logits(theirs, batch), atol=1e-6, rtol=1e-6)


def test_fan_in_fan_out_stays_false_for_linear_targets_on_gpt2():
    """GPT-2's lm_head is an nn.Linear: an adapter on it alone is written with fan_in_fan_out false."""
    model = peftcore.inject(tiny_gpt2(), LoRAConfig(target_modules=("lm_head",)))
    assert to_peft_config(model.peftcore_config, model)["fan_in_fan_out"] is False


# ---------------------------------------------------------------- quantize (NF4) and QLoRA


def test_quantized_gpt2_computes_with_the_dequantized_conv1d_weights():
    """quantize turns each Conv1D into an NF4Linear of the transposed weight (lm_head stays, the
    family's default): the model equals GPT-2 holding the dequantized values in its Conv1D layers."""
    model = tiny_gpt2(n_embd=64)
    quantized = peftcore.quantize(copy.deepcopy(model), NF4Config(compute_dtype=torch.float32))
    assert not conv1d_names(quantized)
    assert type(quantized.lm_head) is nn.Linear
    nf4 = {n: m for n, m in quantized.named_modules() if isinstance(m, NF4Linear)}
    assert sorted(nf4) == sorted(conv1d_names(model))
    with torch.no_grad():
        for name, layer in nf4.items():
            conv = model.get_submodule(name)
            assert (layer.in_features, layer.out_features) == (conv.nx, conv.nf)
            # quantized as bitsandbytes quantizes the transposed weight (transformers' Conv1D path)
            assert torch.equal(layer.weight_packed, quantize_nf4(conv.weight.t().contiguous()).packed)
            conv.weight.copy_(layer.dequantize(torch.float32).t())
    batch = gpt2_batch()
    difference = (logits(quantized, batch) - logits(model, batch)).abs().max().item()
    print(
        f"quantized GPT-2 against the dequantized Conv1D weights: largest logit difference {difference:.2e}"
    )
    torch.testing.assert_close(logits(quantized, batch), logits(model, batch), atol=1e-6, rtol=1e-6)


QLORA_CASES = {
    "qlora": (LoRAConfig(r=4, alpha=8, target_modules=("c_attn",)), lambda: PEFT_CONFIGS["lora-c_attn"]()),
    "qdora": (
        DoRAConfig(r=4, alpha=8, target_modules=("c_attn", "c_proj")),
        lambda: PEFT_CONFIGS["dora-c_attn-c_proj"](),
    ),
    "ia3-nf4": (CASES["ia3-gpt2-default"], lambda: PEFT_CONFIGS["ia3-gpt2-default"]()),
}


@pytest.mark.parametrize("case", QLORA_CASES)
def test_qlora_on_gpt2_matches_peft_over_bitsandbytes(case, tmp_path):
    """GPT-2 loaded by transformers in 4 bit (BitsAndBytesConfig: each Conv1D becomes a Linear4bit of
    the transposed weight, lm_head stays) then wrapped by peft, against ours: quantize, then inject.
    The 4-bit bytes and quantization constants are equal before any forward; our adapter, moved off
    its init, copied into peft's. On the CPU both libraries dequantize the same bytes and compute in
    bf16 with the same operations, so the loss agrees within 1e-6 and each adapter gradient within
    1e-5 relative L2 (they are equal here); test_qlora.py's bf16 tolerances are for the GPU."""
    ours_config, peft_config = QLORA_CASES[case]
    model = tiny_gpt2(n_embd=64)
    model.save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    reference = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "base", quantization_config=quantization, dtype=torch.float32, device_map="cpu"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(reference, peft_config())

    ours = peftcore.quantize(
        copy.deepcopy(model), NF4Config(blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    )
    theirs_4bit = {
        n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
        for n, m in theirs.named_modules()
        if type(m).__name__ == "Linear4bit"
    }
    ours_4bit = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert ours_4bit.keys() == theirs_4bit.keys() == set(conv1d_names(model))
    for name, layer in ours_4bit.items():  # before any forward: bitsandbytes' CPU forward recasts its state
        weight = theirs_4bit[name].weight
        assert torch.equal(layer.weight_packed, weight.data.view(-1)), name
        assert torch.equal(layer.absmax, weight.quant_state.absmax), name
        assert torch.equal(layer.absmax2, weight.quant_state.state2.absmax), name
        assert torch.equal(layer.absmax_offset, weight.quant_state.offset), name

    move_off_init(peftcore.inject(ours, ours_config), seed=5)
    assert peftcore.count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    peftcore.save_adapter(ours, tmp_path / "adapter")
    assert (
        json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["fan_in_fan_out"] is False
    )  # NF4 targets
    loaded = peft.set_peft_model_state_dict(theirs, load_file(tmp_path / "adapter" / WEIGHTS_NAME))
    assert not loaded.unexpected_keys

    batch = gpt2_batch()
    losses = []
    for model_ in (ours, theirs):
        # train mode (dropout is off): in eval mode, with an input that needs no gradient, bitsandbytes'
        # CPU Linear4bit repacks its weight for an AVX512-BF16 kernel on the first forward, after which
        # peft's DoRA dequantizes the repacked bytes as if they were the plain layout (wrong by ~10%).
        loss = model_.train()(**batch).loss
        loss.backward()
        losses.append(loss.item())
    print(f"{case}: loss {losses[0]:.6f} (peft + bitsandbytes {losses[1]:.6f})")
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[1])
    config = ours.peftcore_config
    ours_grads = adapter_grads_in_file_names(ours, lambda: peft_format.adapter_tensors(ours, config))
    theirs_grads = adapter_grads_in_file_names(theirs, lambda: peft.get_peft_model_state_dict(theirs))
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    worst = max(relative_l2(ours_grads[k], theirs_grads[k]) for k in ours_grads)
    print(f"{case}: largest relative gradient difference {worst:.2e}")
    assert worst < GRADIENT_TOLERANCE
