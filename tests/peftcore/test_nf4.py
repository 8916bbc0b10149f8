"""NF4 quantization and NF4Linear, checked against bitsandbytes (its CPU backend here; GPU tests
against its CUDA kernels are marked ``gpu``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftcore.config import NF4Config
from peftcore.nf4 import (
    DYNAMIC_MAP_8BIT,
    NF4_CODES,
    NF4Linear,
    dequantize_absmax,
    dequantize_nf4,
    quantize_nf4,
    reciprocal_of_absmax,
    table,
)
from peftcore.surgery import quantize

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes' pure-torch fallback (odd shapes) is wrapped in torch.compile; eager gives the same
    # numbers without compiling once per shape and dtype.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    packed, state = BF.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )
    return packed, state


def bnb_dequantize(packed, state, dtype, shape) -> torch.Tensor:
    """bitsandbytes' dequantization of the flattened tensor (its C++ CPU kernel mis-decodes 2-D
    shapes whose rows are not whole blocks; the format itself is flat), reshaped."""
    state = copy.copy(state)
    state.shape, state.dtype = torch.Size([shape.numel()]), dtype
    return BF.dequantize_4bit(packed, state).reshape(shape)


def t5_tiny() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from peftcore.t5 import t5_config

    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(t5_config("t5-tiny")).eval()


# ---------------------------------------------------------------- codebooks


def test_nf4_codes_are_bitsandbytes_table():
    assert torch.equal(NF4_CODES, BF.get_4bit_type("nf4", device="cpu"))


def test_dynamic_map_is_bitsandbytes_map():
    assert torch.equal(DYNAMIC_MAP_8BIT, BF.create_dynamic_map())


# ---------------------------------------------------------------- quantization parity

PARITY_CASES = [
    ((64, 64), 64),
    ((768, 96), 64),
    ((7,), 64),  # odd length: one padding nibble
    ((3, 11), 32),  # odd length, blocks span rows
    ((100,), 64),  # partial last block
    ((33, 30), 32),
    ((5, 4099), 4096),  # odd, partial last block, largest blocksize
    *[((48, 128), b) for b in (32, 64, 128, 256, 512, 1024, 2048, 4096)],
]


@pytest.mark.parametrize("shape,blocksize", PARITY_CASES)
def test_packed_bytes_and_absmax_match_bitsandbytes(shape, blocksize):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize))
    packed, ref = bnb_quantize(w, blocksize)
    ours = quantize_nf4(w, blocksize, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, ref.absmax)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision_input_matches_bitsandbytes(dtype):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    packed, ref = bnb_quantize(w)
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, ref.absmax)
    assert torch.equal(dequantize_nf4(ours), bnb_dequantize(packed, ref, dtype, w.shape))


def test_ties_go_to_the_lower_code():
    # Block = [1.0, midpoint_0, ..., midpoint_14]: absmax 1 so the scaled values are the exact midpoints.
    mids = (NF4_CODES[:-1] + NF4_CODES[1:]) / 2
    w = torch.cat([torch.ones(1), mids, torch.zeros(48)])
    q = unpack(quantize_nf4(w, double_quant=False))
    assert q[1:16].tolist() == list(range(15))  # midpoint k lies between codes k and k+1
    packed, _ = bnb_quantize(w)
    assert torch.equal(quantize_nf4(w, double_quant=False).packed, packed.view(-1))


def test_all_zero_block_gives_zeros_not_nan():
    w = torch.zeros(3, 64)
    w[1] = torch.randn(64, generator=torch.Generator().manual_seed(2))
    ours = quantize_nf4(w, double_quant=False)
    packed, ref = bnb_quantize(w)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, ref.absmax)
    assert ours.absmax[0] == 0 and (unpack(ours)[:64] == 7).all()  # code 7 is 0.0
    out = dequantize_nf4(ours, torch.float32)
    assert not out.isnan().any() and (out[0] == 0).all() and (out[2] == 0).all()
    double = dequantize_nf4(quantize_nf4(w, double_quant=True), torch.float32)
    assert not double.isnan().any() and (double[0] == 0).all() and (double[2] == 0).all()


def test_partial_last_block_is_divided_like_bitsandbytes_cpu():
    # x / a and x * (1 / a) round to opposite sides of the midpoint between codes 13 and 14.
    x, a = 0.7278317213058472, 1.1323063373565674
    assert (torch.tensor(x) / torch.tensor(a)).item() != (torch.tensor(x) * (1 / torch.tensor(a))).item()
    pair = torch.tensor([x, a])
    full = torch.cat([pair, torch.zeros(62)])  # a full block: multiplied by the reciprocal -> code 14
    partial = torch.cat(
        [torch.randn(64, generator=torch.Generator().manual_seed(3)), pair]
    )  # 66: divided -> 13
    assert unpack(quantize_nf4(full, double_quant=False))[0] == 14
    assert unpack(quantize_nf4(partial, double_quant=False))[64] == 13
    for w in (full, partial):
        assert torch.equal(quantize_nf4(w, double_quant=False).packed, bnb_quantize(w)[0].view(-1))


def unpack(state) -> torch.Tensor:
    return torch.stack((state.packed >> 4, state.packed & 0xF), dim=1).view(-1)


# ---------------------------------------------------------------- dequantization parity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize", PARITY_CASES[:7])
def test_dequantized_weights_match_bitsandbytes(shape, blocksize, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    packed, ref = bnb_quantize(w, blocksize)
    assert torch.equal(
        dequantize_nf4(quantize_nf4(w, blocksize, double_quant=False), dtype),
        bnb_dequantize(packed, ref, dtype, w.shape),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantized_2d_matches_bitsandbytes_2d_kernel(dtype):
    # Rows made of whole blocks, as in every T5 layer: bitsandbytes' 2-D C++ kernel decodes correctly.
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(8))
    packed, ref = bnb_quantize(w, 64)
    ref.dtype = dtype
    assert torch.equal(
        dequantize_nf4(quantize_nf4(w, double_quant=False), dtype), BF.dequantize_4bit(packed, ref)
    )


# ---------------------------------------------------------------- double quantization


@pytest.mark.parametrize(
    "shape,blocksize", [((768, 768), 64), ((3072, 64), 128), ((100, 30), 32), ((64, 64), 4096)]
)
def test_double_quantization_matches_bitsandbytes(shape, blocksize):
    w = 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(11))
    packed, ref = bnb_quantize(w, blocksize, double_quant=True)
    ours = quantize_nf4(w, blocksize, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.offset, ref.offset)
    assert torch.equal(ours.absmax2, ref.state2.absmax)
    assert torch.equal(ours.absmax, ref.absmax)  # the 8-bit codes, byte for byte
    for dtype in DTYPES:
        expected = bnb_dequantize(packed, ref, dtype, w.shape)
        got = dequantize_nf4(ours, dtype)
        torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=1e-6)
        assert torch.equal(got, expected)


def test_cpu_8bit_rounding_is_a_lookup_table_not_nearest():
    """Why this module rounds the 8-bit step through bitsandbytes' table on CPU: the exact nearest
    code (the CUDA kernel's rule) differs from bitsandbytes' CPU result in some blocks, by a full code."""
    w = 0.02 * torch.randn(768, 768, generator=torch.Generator().manual_seed(11))
    _, ref = bnb_quantize(w, 64, double_quant=True)
    absmax = quantize_nf4(w, double_quant=False).absmax
    centred = (absmax - absmax.mean()).view(-1, 256)
    scaled = (centred * (1.0 / centred.abs().amax(1, keepdim=True))).clamp(-1, 1)
    nearest = torch.bucketize(scaled, (DYNAMIC_MAP_8BIT[:-1] + DYNAMIC_MAP_8BIT[1:]) / 2).view(-1)
    differ = nearest != ref.absmax.long()
    assert 0 < differ.sum() < 0.01 * differ.numel()
    assert ((nearest - ref.absmax.long()).abs() <= 1).all()
    # Where they differ the value sits within half a table slot (1 / 65535) of a code midpoint.
    mids = (DYNAMIC_MAP_8BIT[:-1] + DYNAMIC_MAP_8BIT[1:]) / 2
    gap = (scaled.reshape(-1)[differ, None] - mids).abs().amin(1)
    assert (gap <= 1 / 65535).all()


def bnb_cuda_dquantize(code: list[float], x: float) -> int:
    """bitsandbytes' CUDA ``dQuantize<0>`` (csrc/kernels.cu), step by step in fp32: the reference
    for how the CUDA kernels round a value to an 8-bit code, ties included."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper, val = -1.0, 1.0, code[127]
    for i in (64, 32, 16, 8, 4, 2, 1):
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
    if upper_pivot == 255:
        upper = code[255]
    if lower_pivot == 0:
        lower = code[0]
    if x > val:
        return upper_pivot if x > f32(f32(upper + val) * 0.5) else pivot
    return lower_pivot if x < f32(f32(lower + val) * 0.5) else pivot


def test_8bit_codes_follow_bitsandbytes_cuda_search_ties_included():
    from peftcore.nf4 import nearest_dynamic8_code

    code = DYNAMIC_MAP_8BIT.tolist()
    midpoints = (DYNAMIC_MAP_8BIT[:-1] + DYNAMIC_MAP_8BIT[1:]) / 2
    ulp = torch.finfo(torch.float32).eps * midpoints.abs().clamp(min=1e-6)
    values = (
        torch.cat(
            [
                midpoints,
                midpoints + ulp,
                midpoints - ulp,
                DYNAMIC_MAP_8BIT,
                torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                torch.tensor([-1.0, 0.0, 1.0]),
            ]
        )
        .float()
        .clamp(-1, 1)
    )
    expected = torch.tensor([bnb_cuda_dquantize(code, float(v)) for v in values], dtype=torch.uint8)
    got = nearest_dynamic8_code(values)
    assert torch.equal(got, expected), values[got != expected][:5]
    ties = values[:255] == midpoints  # exact midpoints: some go up, some down
    assert ties.all() and 0 < int((got[:255] == torch.arange(255)).sum()) < 255


def test_double_quantized_absmax_error_is_bounded():
    # The table picks the code nearest to the slot centre, at most half a slot (1 / 65535) from the
    # value, so the error is at most half the widest code gap plus half a slot, times the block scale.
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(12))
    exact = quantize_nf4(w, double_quant=False).absmax
    state = quantize_nf4(w, double_quant=True)
    scale = state.absmax2.repeat_interleave(256)[: exact.numel()]
    bound = (DYNAMIC_MAP_8BIT.diff().max() / 2 + 1 / 65535) * scale
    error = (dequantize_absmax(state) - exact).abs()
    assert (error <= bound * (1 + 1e-5)).all()
    assert error.max() > 0.5 * bound.max()  # and the bound is not vacuous


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("blocksize", [16, 48, 8192, True, 64.0])
def test_bad_blocksize_is_refused(blocksize):
    with pytest.raises(ValueError, match="power of two"):
        quantize_nf4(torch.randn(64), blocksize)


def test_non_float_weight_is_refused():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        quantize_nf4(torch.ones(64, dtype=torch.int8))


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 0, True, "64"])
def test_nf4config_validates_blocksize(blocksize):
    with pytest.raises(ValueError, match="NF4Config.blocksize must be a power of two"):
        NF4Config(blocksize=blocksize)


# ---------------------------------------------------------------- NF4Linear


def make_linear(in_features=128, out_features=64, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_is_linear_with_the_dequantized_weight(compute_dtype, double_quant):
    linear = make_linear()
    config = NF4Config(compute_dtype=compute_dtype, double_quant=double_quant)
    layer = NF4Linear.from_linear(linear, config)
    x = torch.randn(2, 5, 128)
    expected = F.linear(x.to(compute_dtype), layer.dequantize(), linear.bias.to(compute_dtype)).to(x.dtype)
    assert torch.equal(layer(x), expected)
    # ... and that weight is bitsandbytes' dequantized weight
    packed, ref = bnb_quantize(linear.weight.detach(), 64, double_quant)
    ref.dtype = compute_dtype
    assert torch.equal(layer.dequantize(), BF.dequantize_4bit(packed, ref))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_grad_match_bitsandbytes_linear4bit(compute_dtype):
    linear = make_linear()
    theirs = bnb.nn.Linear4bit(
        128, 64, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True
    )
    theirs.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
        blocksize=64,
    )
    theirs.bias = nn.Parameter(linear.bias.detach().clone())
    theirs = theirs.to("cpu").train()  # training mode: bitsandbytes' dequantize-then-matmul path
    ours = NF4Linear.from_linear(linear, NF4Config(compute_dtype=compute_dtype))
    x1 = torch.randn(3, 7, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    assert y1.dtype == y2.dtype == torch.float32
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)


def test_output_dtype_follows_input():
    layer = NF4Linear.from_linear(make_linear(), NF4Config(compute_dtype=torch.bfloat16))
    assert layer(torch.randn(4, 128)).dtype == torch.float32
    assert layer(torch.randn(4, 128, dtype=torch.float16)).dtype == torch.float16
    assert layer.dequantize().dtype == torch.bfloat16 and layer.dequantize().shape == (64, 128)
    assert layer.dequantize(torch.float32).dtype == torch.float32


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_dtype_casts_leave_the_quantization_state_exact(cast):
    for double_quant in (False, True):
        layer = NF4Linear.from_linear(
            make_linear(), NF4Config(compute_dtype=torch.float32, double_quant=double_quant)
        )
        weight, dtypes = layer.dequantize(), {n: b.dtype for n, b in layer.named_buffers()}
        cast(layer)
        assert {n: b.dtype for n, b in layer.named_buffers()} == dtypes
        assert torch.equal(layer.dequantize(), weight)
        x = torch.randn(2, 128, dtype=layer.bias.dtype)
        assert layer(x).dtype == x.dtype  # the bias was cast; the forward pass still runs in compute_dtype


def test_gradients_reach_the_input_and_nothing_trains():
    layer = NF4Linear.from_linear(make_linear(), NF4Config(compute_dtype=torch.float32))
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert layer.bias.requires_grad is False and layer.bias.grad is None
    assert all(not b.requires_grad for b in layer.buffers())
    # no full weight matrix to hand out: what model code reads from a linear layer's weight, no tensor
    assert not isinstance(layer.weight, torch.Tensor)
    assert (layer.weight.shape, layer.weight.dtype, layer.weight.device) == (
        (64, 128),
        torch.float32,
        x.device,
    )


def test_backward_keeps_no_dequantized_weight():
    """The weight is dequantized again in backward (as bitsandbytes' MatMul4Bit does), so a frozen
    4-bit layer holds no full-precision copy of its weight between forward and backward."""
    layer = NF4Linear.from_linear(make_linear(128, 64), NF4Config(compute_dtype=torch.float32))
    x = torch.randn(4, 128, requires_grad=True)

    def saved_sizes(fn) -> list[int]:
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return sizes

    assert 64 * 128 in saved_sizes(lambda: F.linear(x, layer.dequantize()))  # what plain autograd would keep
    assert 64 * 128 not in saved_sizes(lambda: layer(x))
    y = layer(x)
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * y.detach() @ layer.dequantize())


def test_dequantize_backend_is_checked():
    state = quantize_nf4(torch.randn(64, 64))
    with pytest.raises(ValueError, match="backend must be one of .*'cuda'"):
        dequantize_nf4(state, backend="cuda")


def test_state_is_held_in_buffers_with_the_real_bytes():
    layer = NF4Linear.from_linear(make_linear(128, 64), NF4Config(double_quant=True))
    sizes = {name: b.numel() * b.element_size() for name, b in layer.named_buffers()}
    assert sizes == {"weight_packed": 64 * 128 // 2, "absmax": 128, "absmax2": 4, "absmax_offset": 4}
    plain = NF4Linear.from_linear(make_linear(128, 64), NF4Config(double_quant=False))
    assert {n: b.dtype for n, b in plain.named_buffers()} == {
        "weight_packed": torch.uint8,
        "absmax": torch.float32,
    }


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip(double_quant):
    config = NF4Config(compute_dtype=torch.float32, double_quant=double_quant, blocksize=128)
    layer = NF4Linear.from_linear(make_linear(), config)
    fresh = NF4Linear(128, 64, bias=True, config=config)
    x = torch.randn(3, 128)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize(
    "shape,config",
    [
        ((128, 64), NF4Config()),  # transposed: buffers of the same sizes, only the layout differs
        ((64, 128), NF4Config(blocksize=128)),
        ((64, 128), NF4Config(double_quant=False)),
        ((128, 128), NF4Config()),
    ],
)
def test_loading_another_layout_is_refused_and_changes_nothing(shape, config):
    layer = NF4Linear.from_linear(make_linear(128, 64), NF4Config())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    other = NF4Linear.from_linear(make_linear(shape[1], shape[0], seed=1), config).state_dict()
    with pytest.raises(ValueError, match="expected|this one has") as err:
        layer.load_state_dict(other)
    assert "'in_features': 128" in str(err.value)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_set_weight_requantizes_in_place():
    layer = NF4Linear.from_linear(make_linear(), NF4Config(compute_dtype=torch.float32))
    packed = layer.weight_packed
    new = torch.randn(64, 128)
    layer.set_weight_(new)
    assert layer.weight_packed is packed  # same buffer, new content
    assert torch.equal(layer.dequantize(), dequantize_nf4(quantize_nf4(new), torch.float32))
    with pytest.raises(ValueError, match=r"\(128, 64\).*expected \(64, 128\)"):
        layer.set_weight_(torch.randn(128, 64))


# ---------------------------------------------------------------- quantize(model)


def linear_names(model: nn.Module, kind: type) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m) is kind}


def test_quantize_t5_swaps_attention_and_wi_but_keeps_wo_and_lm_head():
    model = quantize(t5_tiny(), NF4Config())
    assert linear_names(model, NF4Linear) == {"q", "k", "v", "o", "wi"}
    assert linear_names(model, nn.Linear) == {"wo", "lm_head"}
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2 * 5 + 2 * (4 + 4 + 1)


def test_quantized_t5_equals_t5_with_bitsandbytes_weights_and_stays_close():
    model = t5_tiny()
    reference = copy.deepcopy(model)
    quantized = quantize(copy.deepcopy(model), NF4Config(compute_dtype=torch.float32))
    ids = torch.randint(2, 32128, (2, 12), generator=torch.Generator().manual_seed(0))
    dec = torch.randint(2, 32128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, module in reference.named_modules():  # bitsandbytes' round trip of the same weights
            if isinstance(quantized.get_submodule(name), NF4Linear):
                packed, state = bnb_quantize(module.weight, 64, double_quant=True)
                module.weight.copy_(BF.dequantize_4bit(packed, state))
        original = model(input_ids=ids, decoder_input_ids=dec).logits
        expected = reference(input_ids=ids, decoder_input_ids=dec).logits
        got = quantized(input_ids=ids, decoder_input_ids=dec).logits
    assert torch.equal(got, expected)
    relative_error = ((got - original).norm() / original.norm()).item()
    assert 0 < relative_error < 0.3  # 0.178 for this random-init t5-tiny (4-bit weights, no training)


def test_skip_modules_and_model_keep_list():
    model = quantize(t5_tiny(), NF4Config(skip_modules=("q", "lm_head")))
    assert linear_names(model, nn.Linear) == {"q", "lm_head"}
    assert "wo" in linear_names(model, NF4Linear)

    class Toy(nn.Module):
        _keep_in_fp32_modules = ["special"]

        def __init__(self):
            super().__init__()
            self.special, self.plain, self.lm_head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
            self.block = nn.Sequential(nn.Linear(64, 64))  # name "block.0"

    toy = quantize(Toy(), NF4Config())
    assert type(toy.special) is nn.Linear and type(toy.lm_head) is nn.Linear
    assert isinstance(toy.plain, NF4Linear) and isinstance(toy.block[0], NF4Linear)
    toy = quantize(Toy(), NF4Config(skip_modules=r"block\.\d+"))  # one regex, as for target_modules
    assert type(toy.block[0]) is nn.Linear and isinstance(toy.special, NF4Linear)


def test_quantizing_twice_is_refused_and_changes_nothing():
    model = quantize(t5_tiny(), NF4Config())
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match="already quantized.*NF4Linear"):
        quantize(model, NF4Config())
    assert dict(model.named_modules()) == modules


def test_non_float_linear_is_refused_and_nothing_is_swapped():
    model = t5_tiny()
    bad = model.decoder.block[1].layer[0].SelfAttention.v
    bad.weight = nn.Parameter(torch.zeros(bad.weight.shape, dtype=torch.int8), requires_grad=False)
    modules = dict(model.named_modules())
    with pytest.raises(
        ValueError, match=r"decoder\.block\.1\.layer\.0\.SelfAttention\.v.*torch\.int8.*skip_modules"
    ):
        quantize(model, NF4Config())
    assert dict(model.named_modules()) == modules
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


def test_quantize_needs_a_model_and_an_nf4config():
    with pytest.raises(TypeError, match="NF4Linear.from_linear"):
        quantize(nn.Linear(64, 64), NF4Config())
    with pytest.raises(TypeError, match="needs an NF4Config, got dict"):
        quantize(nn.Sequential(nn.Linear(64, 64)), {"blocksize": 64})


# ---------------------------------------------------------------- the format module and the layer module


def test_nf4_reexports_the_format_which_holds_no_module():
    import peftcore.nf4 as layer_module
    import peftcore.nf4_format as format_module

    for name in format_module.__all__:
        assert name in layer_module.__all__, name
        assert getattr(layer_module, name) is getattr(format_module, name), name
    assert all(hasattr(layer_module, name) for name in layer_module.__all__)
    classes = [v for v in vars(format_module).values() if isinstance(v, type)]
    assert not [c for c in classes if issubclass(c, (nn.Module, torch.autograd.Function))]


def test_tables_are_shared_copies_by_name():
    cpu = torch.device("cpu")
    assert table("nf4", cpu) is table("nf4", cpu)
    assert torch.equal(table("nf4", cpu), NF4_CODES)
    assert torch.equal(table("dynamic8_midpoints", cpu), (DYNAMIC_MAP_8BIT[:-1] + DYNAMIC_MAP_8BIT[1:]) / 2)
    with pytest.raises(ValueError, match="no NF4 table named 'nf5'"):
        table("nf5", cpu)


def test_reciprocal_of_absmax_on_cpu_is_the_quotient_and_finite_for_zero():
    r = reciprocal_of_absmax(torch.tensor([2.0, 0.3, 0.0]))
    assert r[0] == 0.5 and r[1] == 1.0 / torch.tensor(0.3) and torch.isfinite(r[2])


# ---------------------------------------------------------------- CUDA (bitsandbytes' CUDA kernels)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
def test_cuda_quantization_matches_bitsandbytes_cuda(blocksize):
    # odd length and partial last blocks included
    w = 0.02 * torch.randn(769, 3077, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    packed, ref = bnb_quantize(w, blocksize, double_quant=True)
    ours = quantize_nf4(w, blocksize, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.offset, ref.offset) and torch.equal(ours.absmax2, ref.state2.absmax)
    assert torch.equal(ours.absmax, ref.absmax)  # nearest 8-bit code, as the CUDA kernel rounds
    for dtype in DTYPES:
        expected = bnb_dequantize(packed, ref, dtype, w.shape)
        for backend in ("torch", "triton"):
            assert torch.equal(dequantize_nf4(ours, dtype, backend=backend), expected), (dtype, backend)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "shape,blocksize,double_quant",
    [
        ((768, 768), 64, True),
        ((3072, 768), 64, False),
        ((7,), 64, True),
        ((33, 30), 32, False),
        ((5, 4099), 4096, True),
        ((1000, 1001), 256, True),
        ((4096, 4096), 64, True),
    ],
)
def test_cuda_triton_kernel_equals_the_torch_path(shape, blocksize, double_quant):
    """Bit for bit, on fresh random weights of several scales, for every output dtype."""
    for seed, scale in ((0, 0.02), (1, 1.0), (2, 30.0)):
        g = torch.Generator("cuda").manual_seed(seed)
        state = quantize_nf4(scale * torch.randn(shape, device="cuda", generator=g), blocksize, double_quant)
        for dtype in DTYPES:
            expected = dequantize_nf4(state, dtype, backend="torch")
            got = dequantize_nf4(state, dtype, backend="triton")
            assert got.shape == expected.shape and got.dtype == dtype
            assert torch.equal(got, expected), (seed, dtype)
    assert dequantize_nf4(state).dtype == torch.float32  # auto picks Triton on CUDA, keeps the default dtype


@pytest.mark.gpu
@requires_cuda
def test_cuda_nf4linear_forward_and_backward():
    linear = make_linear().cuda()
    layer = NF4Linear.from_linear(linear, NF4Config())
    assert layer.weight_packed.is_cuda
    x = torch.randn(4, 128, device="cuda", requires_grad=True)
    y = layer(x)
    expected = F.linear(x.detach().bfloat16(), layer.dequantize(), linear.bias.bfloat16()).float()
    assert y.dtype == torch.float32 and torch.equal(y.detach(), expected)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    cpu = NF4Linear(128, 64, config=NF4Config())
    cpu.load_state_dict(layer.state_dict())
    assert torch.equal(cpu.cuda().dequantize(), layer.dequantize())


def quantization_differences(shape: str, device: str) -> dict[str, dict]:
    """Every weight ``quantize`` quantizes in a random-init T5 of ``shape`` (seed 0, built on
    ``device``, as test_qlora builds it), quantized by peftcore and by bitsandbytes on ``device``:
    per layer with a difference, the packed bytes and 8-bit absmax codes that differ and, for the
    first few, what each library stored and the scaled value it came from."""
    transformers = pytest.importorskip("transformers")
    from peftcore.t5 import t5_config

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.T5ForConditionalGeneration(t5_config(shape))
    quantized = copy.deepcopy(model)
    quantize(quantized, NF4Config(blocksize=64, double_quant=True))
    found = {}
    for name, layer in quantized.named_modules():
        if not isinstance(layer, NF4Linear):
            continue
        weight = model.get_submodule(name).weight.detach()
        packed, theirs = bnb_quantize(weight, 64, double_quant=True)
        bytes_off = (layer.weight_packed != packed.view(-1)).nonzero().view(-1)
        codes_off = (layer.absmax != theirs.absmax).nonzero().view(-1)
        if bytes_off.numel() or codes_off.numel():
            flat = weight.reshape(-1).float()
            absmax = flat.view(-1, 64).abs().amax(dim=1)
            scaled = flat * reciprocal_of_absmax(absmax).repeat_interleave(64)
            found[name] = dict(
                bytes=[
                    (
                        int(i),
                        int(layer.weight_packed[i]),
                        int(packed.view(-1)[i]),
                        scaled[2 * i : 2 * i + 2].tolist(),
                    )
                    for i in bytes_off[:4]
                ],
                absmax_codes=[(int(i), int(layer.absmax[i]), int(theirs.absmax[i])) for i in codes_off[:4]],
                counts=(bytes_off.numel(), codes_off.numel()),
            )
    return found


def test_quantization_of_every_t5_tiny_weight_matches_bitsandbytes_cpu():
    assert quantization_differences("t5-tiny", "cpu") == {}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.xfail(
    strict=True,
    reason="measured on an H200 on 2026-12-04 (bitsandbytes 0.50.2, torch 2.11 cu130): 4 of the 168 "
    "t5-base layers differed from bitsandbytes' CUDA kernel in one packed byte or absmax code each; "
    "cause not found yet. This test prints which and the values involved.",
)
def test_cuda_quantization_of_every_t5_base_weight_matches_bitsandbytes():
    """About 170 M values: the 0.8 M weights of the test above miss differences this rare."""
    found = quantization_differences("t5-base", "cuda")
    for name, what in found.items():
        print(name, what)
    assert found == {}


def bnb_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype, device: str) -> nn.Module:
    theirs = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        compress_statistics=True,
        device="cpu",
    )
    theirs.weight = bnb.nn.Params4bit(
        linear.weight.detach().cpu().clone(),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
        blocksize=64,
    )
    if linear.bias is not None:
        theirs.bias = nn.Parameter(linear.bias.detach().cpu().clone(), requires_grad=False)
    return theirs.to(device).train()  # moving it to the device quantizes it there


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("tokens", [4096, 64])
def test_cuda_nf4linear_matches_bitsandbytes_linear4bit_bf16(tokens):
    """bf16 compute, a t5-base feed-forward shape. With more than 1,536 rows bitsandbytes
    dequantizes and calls F.linear, as we do: identical outputs and input gradients. With fewer it
    runs its fused 4-bit GEMM, whose accumulation order differs: equal within bf16 rounding
    (relative L2 error under 1e-2; one bf16 rounding is 2^-8 = 3.9e-3)."""
    torch.manual_seed(0)
    linear = nn.Linear(768, 3072).cuda()
    ours = NF4Linear.from_linear(
        linear, NF4Config(blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    )
    theirs = bnb_linear4bit(linear, torch.bfloat16, "cuda")
    assert torch.equal(ours.weight_packed, theirs.weight.data.view(-1))
    assert torch.equal(ours.absmax, theirs.weight.quant_state.absmax)
    x1 = torch.randn(tokens, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert y1.dtype == y2.dtype == torch.bfloat16
    if tokens > 1536:
        assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    else:
        assert ((y1.float() - y2.float()).norm() / y2.float().norm()).item() < 1e-2
        assert torch.equal(x1.grad, x2.grad)  # backward is dequantize + matmul in both
