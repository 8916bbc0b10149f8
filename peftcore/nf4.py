"""4-bit NormalFloat (NF4) quantization of frozen weights, bit-exact with bitsandbytes (QLoRA).

Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3.

Blockwise quantization. The weight is flattened and cut into blocks of ``B`` elements
(default 64; a partial last block gets its own scale). For block ``j`` with elements ``w_i``::

    c_j = max_i |w_i|                                     (fp32 absmax)
    q_i = argmin_k | NF4[k] - w_i * (1 / c_j) |            (ties go to the lower code)
    w_i ~= NF4[q_i] * c_j                                  (dequantization, in fp32, then cast)

``NF4`` is the 16-value codebook of normal quantiles below. The nearest code is found with
``torch.bucketize`` on the 15 fp32 midpoints: a value equal to a midpoint goes to the lower code,
exactly as bitsandbytes' threshold tree (``x > midpoint`` picks the upper code). Two codes share a
byte, the first element in the high nibble; an odd length is padded with the code of 0.0 (7).
An all-zero block has ``c_j = 0``; its reciprocal is taken of ``max(c_j, 1e-38)`` (bitsandbytes'
clamp), so every element maps to the code 0.0 and no NaN appears.

Double quantization (paper eq. 6). The fp32 absmax vector ``c`` is itself quantized::

    offset = mean(c)
    c2_k, q8 = blockwise 8-bit quantization of (c - offset), blocks of 256, signed dynamic map
    c_j ~= DYN8[q8_j] * c2_{j // 256} + offset                                (fp32)

The 8-bit rounding: CPU versus CUDA (bitsandbytes 0.50). Both backends scale ``c - offset`` by
``1 / c2`` of its block, but they pick the code differently:

* CUDA (``kQuantizeBlockwise`` -> ``dQuantize``): binary search over the 256 sorted codes, then a
  comparison with the midpoint of the neighbours: the exact nearest code.
* CPU (``quantize_cpu_impl``): a 65,536-slot lookup table. A normalized value ``v`` in [-1, 1]
  goes to slot ``trunc((v + 1) * 0.5 * 65535 + 0.5)`` (fp32), and slot ``i`` holds the code nearest
  to its centre ``-1 + 2 i / 65535``. A slot is 3e-5 wide, so a value within 1.5e-5 of a midpoint
  can land on the neighbouring code, a full step away (up to 0.014 of ``c2`` near |v| = 1). On
  Gaussian weights 0.1-0.2 % of the absmax codes differ from the nearest code, and the dequantized
  weights of those blocks differ by up to ~5e-4 for weights of scale 0.1: far more than rounding noise.

This module rounds as bitsandbytes does on the device that runs the quantization: the table on CPU,
the nearest code elsewhere. The scale ``1 / c`` follows the device too: bitsandbytes' CUDA build uses
fast math, whose ``1.0f / c`` is the approximate reciprocal ``rcp.approx.ftz.f32`` (off by one ulp
for some ``c``), so on CUDA this module scales by that instruction's result (``nf4_triton.reciprocal``);
on CPU by the correctly rounded quotient, as bitsandbytes' C++ does. That keeps the promise "bit-exact with bitsandbytes" on every device (the
CPU tests compare all bytes and all dequantized values exactly), so a peftcore QLoRA model and a
peft + bitsandbytes one built on the same machine share the same base weights. The price is that
the same weight quantized on CPU and on GPU can differ in a few absmax codes, as with bitsandbytes.

Smaller differences between the two bitsandbytes backends, followed here where they matter:

* bitsandbytes' CPU path divides a partial last block by its absmax, where the full blocks (and the
  CUDA kernel) multiply by the reciprocal. The two can differ in the last bit and, rarely, by a code;
  on CPU this module divides the partial block too.
* bitsandbytes' CUDA kernel gives an all-zero NF4 block the code -1.0 (``0 * (1/0)`` is NaN and falls
  through its threshold tree); this module gives it the code 0.0 on every device, as the CPU path
  does. The dequantized value is 0 either way. (For the 8-bit step both backends use code index 0.)
* bitsandbytes 0.50's C++ CPU ``dequantize_4bit`` reads the wrong absmax when a block spans two rows
  (row length not a multiple of the blocksize, e.g. a (64, 64) weight with blocksize 128). The format
  is flat blocks over the whole tensor, which is what this module, bitsandbytes' CUDA kernel and its
  pure-torch path decode; the tests compare against bitsandbytes on the flattened tensor.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftcore.config import NF4Config, is_nf4_blocksize

# bitsandbytes' hard-coded NF4 table: create_normal_map(offset=0.9677083) in fp32 (Gaussian quantiles,
# normalized to [-1, 1], with an exact 0). Copied, not regenerated: no scipy at runtime, and no way for
# a different quantile routine to move a code (and with it the midpoints) by an ulp.
NF4_CODES = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

DOUBLE_QUANT_BLOCKSIZE = 256  # bitsandbytes' fixed block for the 8-bit absmax quantization
LUT_SLOTS = 65536  # bitsandbytes' CPU rounding table for 8-bit codes
QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_ABSMAX = 1e-38  # bitsandbytes clamps the absmax to this before taking the reciprocal


def dynamic_map_8bit() -> Tensor:
    """The signed 8-bit dynamic map (Dettmers, 2015): 256 sorted fp32 values in [-0.993, 1].

    For exponent ``e`` in 0..6 it holds ``+-10^(e-6) * m`` for the ``2^e`` midpoints ``m`` of
    ``linspace(0.1, 1, 2^e + 1)``, plus 0 and 1 (bitsandbytes' ``create_dynamic_map()``).
    """
    values = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += [10.0 ** (e - 6) * mids, -(10.0 ** (e - 6)) * mids]
    return torch.cat(values).sort().values


DYNAMIC_MAP_8BIT = dynamic_map_8bit()


def _midpoints(codes: Tensor) -> Tensor:
    return (codes[:-1] + codes[1:]) / 2


def _dynamic8_lut() -> Tensor:
    """bitsandbytes' CPU rounding table: slot ``i`` (centre ``-1 + 2 i / 65535`` in fp32) holds the
    index of the nearest code, i.e. the number of code midpoints strictly below the centre."""
    centres = -1.0 + (2.0 * torch.arange(LUT_SLOTS, dtype=torch.float32)) / (LUT_SLOTS - 1)
    return torch.searchsorted(_midpoints(DYNAMIC_MAP_8BIT), centres).to(torch.uint8)


def _nf4_byte_table() -> Tensor:
    """(256,) int64: the 8 bytes of entry ``b`` are the two fp32 NF4 values packed in byte ``b``
    (high nibble first). Decoding is then one 8-byte gather per byte, viewed back as fp32 pairs,
    about 4x faster than gathering rows of a (256, 2) float table."""
    byte = torch.arange(256)
    return torch.stack((NF4_CODES[byte >> 4], NF4_CODES[byte & 0xF]), dim=1).view(torch.int64).view(-1)


_TABLES = {
    "nf4": NF4_CODES,
    "nf4_midpoints": _midpoints(NF4_CODES),
    "nf4_bytes": _nf4_byte_table(),
    "dynamic8": DYNAMIC_MAP_8BIT,
    "dynamic8_midpoints": _midpoints(DYNAMIC_MAP_8BIT),
    "dynamic8_lut": _dynamic8_lut(),
}
_TABLES_ON: dict[tuple[str, torch.device], Tensor] = {}


def _table(name: str, device: torch.device) -> Tensor:
    """One of the constant tables above, copied to ``device`` once (a plain dict, which
    torch.compile traces without graph breaks)."""
    key = (name, device)
    if key not in _TABLES_ON:
        _TABLES_ON[key] = _TABLES[name].to(device)
    return _TABLES_ON[key]


def triton_available() -> bool:
    """Whether the Triton kernels of ``peftcore.nf4_triton`` can run (Triton is installed: it ships
    with PyTorch's CUDA builds)."""
    return importlib.util.find_spec("triton") is not None


def _per_block(flat: Tensor, blocksize: int) -> Tensor:
    """View a flat tensor as (blocks, blocksize), zero-padding a partial last block."""
    pad = -flat.numel() % blocksize
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)


def _check_blocksize(blocksize: int) -> None:
    if not is_nf4_blocksize(blocksize):
        raise ValueError(
            f"blocksize must be a power of two in [32, 4096] (64 is the default), got {blocksize!r}"
        )


def _inverse(absmax: Tensor) -> Tensor:
    """``1 / absmax`` per block, as bitsandbytes computes it on ``absmax``'s device: the correctly
    rounded quotient on CPU, the approximate reciprocal of its fast-math CUDA build on a GPU (see
    ``nf4_triton``). An all-zero block gets 0 (every element then takes the code of 0.0)."""
    if absmax.is_cuda and triton_available():
        from peftcore import nf4_triton

        return torch.where(absmax > 0, nf4_triton.reciprocal(absmax), 0.0)
    return 1.0 / absmax.clamp(min=_MIN_ABSMAX)


def quantize_dynamic8(values: Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization with the signed dynamic map, rounded as bitsandbytes rounds on
    ``values``' device (CPU: its lookup table; elsewhere: the nearest code). An all-zero block gets
    code index 0, as on both bitsandbytes backends (its value is 0 either way).

    Returns uint8 code indices (one per element) and the fp32 absmax of each block.
    """
    n = values.numel()
    blocks = _per_block(values.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * _inverse(absmax).unsqueeze(1)).clamp_(-1.0, 1.0)
    if values.device.type == "cpu":
        slot = ((scaled + 1.0) * 0.5 * (LUT_SLOTS - 1) + 0.5).long()  # fp32, in bitsandbytes' order
        q = _table("dynamic8_lut", values.device)[slot]
    else:
        q = nearest_dynamic8_code(scaled)
    q.masked_fill_((absmax == 0).unsqueeze(1), 0)
    return q.view(-1)[:n], absmax


def nearest_dynamic8_code(scaled: Tensor) -> Tensor:
    """uint8 index of the dynamic-map code nearest to each value in [-1, 1], as bitsandbytes' CUDA
    ``dQuantize`` picks it: a 7-step binary search from index 127, then the nearer of the two codes
    around the value. A value exactly on the midpoint of two codes goes to the code the search
    probed last (the lower one when the value lies above that probe, else the upper one), not
    always to the lower one."""
    codes = _table("dynamic8", scaled.device)
    nearest = torch.bucketize(scaled, _table("dynamic8_midpoints", scaled.device))  # ties: lower code
    probe = torch.full_like(nearest, 127)
    for step in (64, 32, 16, 8, 4, 2, 1):
        probe += torch.where(scaled > codes[probe], step, -step)
    midpoints = _table("dynamic8_midpoints", scaled.device)
    on_midpoint = scaled == midpoints[nearest.clamp(max=midpoints.numel() - 1)]
    return torch.where(on_midpoint, probe, nearest).to(torch.uint8)


def dequantize_dynamic8(q: Tensor, absmax: Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE) -> Tensor:
    """``DYN8[q_i] * absmax[i // blocksize]`` in fp32."""
    values = _table("dynamic8", q.device).index_select(0, q.reshape(-1).int())
    return (_per_block(values, blocksize) * absmax.unsqueeze(1)).view(-1)[: q.numel()]


@dataclass
class NF4State:
    """A quantized tensor. With double quantization ``absmax`` holds uint8 codes of the 8-bit
    dynamic map and ``absmax2`` / ``offset`` are set; otherwise ``absmax`` is the fp32 scale."""

    packed: Tensor  # uint8, ceil(numel / 2): two codes per byte, first element in the high nibble
    absmax: Tensor  # fp32 (blocks,), or uint8 (blocks,) when double-quantized
    shape: torch.Size
    dtype: torch.dtype  # the dtype dequantize_nf4 returns by default
    blocksize: int = 64
    absmax2: Tensor | None = None  # fp32 (ceil(blocks / 256),), double quantization only
    offset: Tensor | None = None  # fp32 scalar, double quantization only

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None


@torch.no_grad()
def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """Quantize ``weight`` (fp32, bf16 or fp16, any shape) to NF4 blocks of ``blocksize`` elements."""
    _check_blocksize(blocksize)
    if weight.dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(
            f"NF4 quantization needs a float32, bfloat16 or float16 tensor, got {weight.dtype}; "
            "convert it with .float() first"
        )
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(weight.shape)})")
    n = weight.numel()
    blocks = _per_block(weight.reshape(-1).float(), blocksize)  # zero padding never raises an absmax
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * _inverse(absmax).unsqueeze(1)
    if n % blocksize and weight.device.type == "cpu":
        # bitsandbytes' CPU path divides the partial last block instead (can differ in the last bit).
        scaled[-1] = blocks[-1] / absmax[-1].clamp(min=_MIN_ABSMAX)
    q = torch.bucketize(
        scaled.clamp_(-1.0, 1.0).view(-1), _table("nf4_midpoints", weight.device), out_int32=True
    )
    q = q[: n + n % 2].to(torch.uint8)  # an odd length keeps one padding code: the code of 0.0
    state = NF4State((q[0::2] << 4) | q[1::2], absmax, weight.shape, weight.dtype, blocksize)
    if double_quant:
        state.offset = absmax.mean()
        state.absmax, state.absmax2 = quantize_dynamic8(absmax - state.offset)
    return state


def dequantize_absmax(state: NF4State) -> Tensor:
    """The fp32 per-block scales: stored as is, or ``DYN8[q8_j] * absmax2[j // 256] + offset``."""
    if not state.double_quant:
        return state.absmax
    return dequantize_dynamic8(state.absmax, state.absmax2) + state.offset


DEQUANTIZE_BACKENDS = ("auto", "torch", "triton")


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """``NF4[q_i] * absmax[i // blocksize]`` computed in fp32, cast to ``dtype`` (default: the
    quantized tensor's dtype), in the original shape.

    ``backend``: ``torch`` (plain PyTorch ops, any device), ``triton`` (one fused kernel,
    ``peftcore.nf4_triton``), or ``auto``: Triton for CUDA tensors when it is installed, else torch.
    Both give bit-identical results.
    """
    if backend not in DEQUANTIZE_BACKENDS:
        raise ValueError(f"backend must be one of {DEQUANTIZE_BACKENDS}, got {backend!r}")
    dtype = dtype or state.dtype
    if backend == "triton" or (backend == "auto" and state.packed.is_cuda and triton_available()):
        from peftcore import nf4_triton

        device = state.packed.device
        return nf4_triton.dequantize(
            state.packed,
            state.absmax,
            state.absmax2,
            state.offset,
            _table("nf4", device),
            _table("dynamic8", device),
            state.shape,
            state.blocksize,
            dtype,
        )
    absmax = dequantize_absmax(state)
    pairs = _table("nf4_bytes", state.packed.device).index_select(0, state.packed.reshape(-1).int())
    values = pairs.view(torch.float32)
    n = state.shape.numel()
    weight = (_per_block(values, state.blocksize) * absmax.unsqueeze(1)).view(-1)[:n]
    return weight.view(state.shape).to(dtype)


class _DequantizingLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized in forward and again in backward (as bitsandbytes'
    ``MatMul4Bit`` does). Autograd would otherwise keep each layer's dequantized weight alive from
    forward to backward: for t5-base in bf16 that is 340 MB of frozen copies, on top of the 4-bit
    weights QLoRA exists to keep small. The weight and bias are frozen: no gradient for them."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: NF4Linear, bias: Tensor | None) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(), bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_output @ ctx.layer.dequantize().to(grad_output.dtype), None, None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: ``y = x W^T + b`` with ``W = dequant(NF4 state)``.

    The packed weight and its quantization state are buffers (``weight_packed``, ``absmax`` and,
    with double quantization, ``absmax2`` and ``absmax_offset``), so ``state_dict()`` carries them
    and a parameter+buffer count sees the real bytes. There is deliberately no ``weight``
    attribute: use :meth:`dequantize`. The forward pass runs in ``compute_dtype`` and returns in
    the input's dtype (as bitsandbytes' ``Linear4bit``); the weight and bias never get gradients.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: NF4Config | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = config or NF4Config()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = config.blocksize
        self.double_quant = config.double_quant
        self.compute_dtype = config.compute_dtype
        n = in_features * out_features
        blocks = -(-n // self.blocksize)
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if self.double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            groups = -(-blocks // DOUBLE_QUANT_BLOCKSIZE)
            self.register_buffer("absmax2", torch.zeros(groups, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
            self.absmax2 = self.absmax_offset = None
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: NF4Config) -> NF4Linear:
        """Quantize ``linear``'s weight; the bias is copied, frozen, in its own dtype."""
        weight = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, config, device=weight.device
        )
        layer.set_weight_(weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def quant_state(self) -> NF4State:
        """The quantized weight as an :class:`NF4State` (sharing this layer's buffers)."""
        return NF4State(
            self.weight_packed,
            self.absmax,
            torch.Size((self.out_features, self.in_features)),
            self.compute_dtype,
            self.blocksize,
            self.absmax2,
            self.absmax_offset,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) weight, in ``compute_dtype`` unless ``dtype`` is given."""
        return dequantize_nf4(self.quant_state(), dtype or self.compute_dtype)

    @torch.no_grad()
    def set_weight_(self, weight: Tensor) -> None:
        """Re-quantize a new full-precision weight into this layer's buffers, in place (lossy)."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"NF4Linear.set_weight_: weight of shape {tuple(weight.shape)}, expected {expected}"
            )
        state = quantize_nf4(weight.to(self.weight_packed.device), self.blocksize, self.double_quant)
        self.weight_packed.copy_(state.packed)
        self.absmax.copy_(state.absmax)
        if self.double_quant:
            self.absmax2.copy_(state.absmax2)
            self.absmax_offset.copy_(state.offset)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _DequantizingLinear.apply(x.to(self.compute_dtype), self, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .half() and Lightning's "bf16-true" cast every floating buffer; the fp32
        # scales must stay exact (bitsandbytes keeps its quantization state out of such casts too).
        # They pass through as int32 bit patterns, which device moves copy and dtype casts skip.
        floats = [name for name, b in self._buffers.items() if b is not None and b.dtype == torch.float32]
        for name in floats:
            self._buffers[name] = self._buffers[name].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in floats:
                self._buffers[name] = self._buffers[name].view(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )

    # The layout travels in the state dict as a small int64 tensor so that a state dict of another
    # layout is refused instead of silently misread: a (128, 32) and a (64, 64) weight have buffers
    # of identical sizes.
    def _layout(self) -> dict[str, int]:
        return dict(
            out_features=self.out_features,
            in_features=self.in_features,
            blocksize=self.blocksize,
            double_quant=int(self.double_quant),
        )

    def get_extra_state(self) -> Tensor:
        return torch.tensor(list(self._layout().values()))

    def set_extra_state(self, state: Tensor) -> None:
        pass  # checked in _load_from_state_dict; the layout itself is fixed at construction

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Check everything before anything is copied, so that a refused load leaves the layer unchanged.
        where = f"NF4Linear '{prefix.rstrip('.')}'" if prefix else "NF4Linear"
        fix = "build the NF4Linear with the saved shape and NF4Config"
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None:
            given = dict(zip(self._layout(), torch.as_tensor(saved).tolist()))
            if given != self._layout():
                raise ValueError(
                    f"{where}: the state dict holds a layer with {given}, this one has {self._layout()}; {fix}"
                )
        for name, tensor in [*self._buffers.items(), *self._parameters.items()]:
            given = state_dict.get(prefix + name)
            if tensor is None or given is None:
                continue
            # Buffers must match exactly (a float absmax is not a uint8 one); the bias may change dtype.
            if given.shape != tensor.shape or (name in self._buffers and given.dtype != tensor.dtype):
                raise ValueError(
                    f"{where}: '{name}' in the state dict has shape {tuple(given.shape)} and dtype {given.dtype}, "
                    f"expected shape {tuple(tensor.shape)} and dtype {tensor.dtype} (this layer has "
                    f"{self._layout()}); {fix}"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
