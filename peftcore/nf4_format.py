"""The NF4 format: codebooks, blockwise 4-bit quantization and double quantization of the scales,
bit-exact with bitsandbytes. Tensors in, tensors out; no modules (``NF4Linear`` is in ``nf4.py``).

Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3. The weight is
flattened and cut into blocks of ``B`` elements (default 64; a partial last block gets its own
scale). For block ``j`` with elements ``w_i``::

    c_j = max_i |w_i|                                     (fp32 absmax)
    q_i = argmin_k | NF4[k] - w_i * (1 / c_j) |            (ties go to the lower code)
    w_i ~= NF4[q_i] * c_j                                  (dequantization, in fp32, then cast)

Double quantization (paper eq. 6). The fp32 absmax vector ``c`` is itself quantized::

    offset = mean(c)
    c2_k, q8 = blockwise 8-bit quantization of (c - offset), blocks of 256, signed dynamic map
    c_j ~= DYN8[q8_j] * c2_{j // 256} + offset                                (fp32)

How bitsandbytes' CPU and CUDA backends round, how this module follows each, and the edge cases:
docs/nf4.md.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from peftcore.config import is_nf4_blocksize

__all__ = [
    "DEQUANTIZE_BACKENDS",
    "DOUBLE_QUANT_BLOCKSIZE",
    "DYNAMIC_MAP_8BIT",
    "LUT_SLOTS",
    "NF4_CODES",
    "QUANTIZABLE_DTYPES",
    "TABLES",
    "NF4State",
    "dequantize_absmax",
    "dequantize_dynamic8",
    "dequantize_nf4",
    "dynamic_map_8bit",
    "nearest_dynamic8_code",
    "quantize_dynamic8",
    "quantize_nf4",
    "reciprocal_of_absmax",
    "table",
    "triton_available",
]

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
TABLES = tuple(_TABLES)  # the names table() accepts
_TABLES_ON: dict[tuple[str, torch.device], Tensor] = {}


def table(name: str, device: torch.device) -> Tensor:
    """One of the constant tables, by name (``TABLES``), copied to ``device`` once (a plain dict,
    which torch.compile traces without graph breaks). Do not modify the result: it is shared.

    ``nf4``: the 16 codes; ``nf4_midpoints``: the 15 fp32 midpoints ``torch.bucketize`` rounds
    against; ``nf4_bytes``: (256,) int64, the two fp32 values of each packed byte; ``dynamic8``,
    ``dynamic8_midpoints``: the same for the 8-bit dynamic map; ``dynamic8_lut``: bitsandbytes' CPU
    rounding table of ``LUT_SLOTS`` uint8 code indices.
    """
    key = (name, device)
    if key not in _TABLES_ON:
        if name not in _TABLES:
            raise ValueError(f"no NF4 table named {name!r}; the tables are {TABLES}")
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


def reciprocal_of_absmax(absmax: Tensor) -> Tensor:
    """``1 / absmax`` per block, as bitsandbytes computes it on ``absmax``'s device: the correctly
    rounded quotient on CPU, the approximate reciprocal of its fast-math CUDA build on a GPU (see
    ``nf4_triton``). An all-zero block gets a finite value (CPU: ``1 / 1e-38``, bitsandbytes'
    clamp; CUDA: 0), so every element of it scales to 0 and takes the code of 0.0."""
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
    scaled = (blocks * reciprocal_of_absmax(absmax).unsqueeze(1)).clamp_(-1.0, 1.0)
    if values.device.type == "cpu":
        slot = ((scaled + 1.0) * 0.5 * (LUT_SLOTS - 1) + 0.5).long()  # fp32, in bitsandbytes' order
        q = table("dynamic8_lut", values.device)[slot]
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
    codes = table("dynamic8", scaled.device)
    nearest = torch.bucketize(scaled, table("dynamic8_midpoints", scaled.device))  # ties: lower code
    probe = torch.full_like(nearest, 127)
    for step in (64, 32, 16, 8, 4, 2, 1):
        probe += torch.where(scaled > codes[probe], step, -step)
    midpoints = table("dynamic8_midpoints", scaled.device)
    on_midpoint = scaled == midpoints[nearest.clamp(max=midpoints.numel() - 1)]
    return torch.where(on_midpoint, probe, nearest).to(torch.uint8)


def dequantize_dynamic8(q: Tensor, absmax: Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE) -> Tensor:
    """``DYN8[q_i] * absmax[i // blocksize]`` in fp32."""
    values = table("dynamic8", q.device).index_select(0, q.reshape(-1).int())
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
    scaled = blocks * reciprocal_of_absmax(absmax).unsqueeze(1)
    if n % blocksize and weight.device.type == "cpu":
        # bitsandbytes' CPU path divides the partial last block instead (can differ in the last bit).
        scaled[-1] = blocks[-1] / absmax[-1].clamp(min=_MIN_ABSMAX)
    q = torch.bucketize(
        scaled.clamp_(-1.0, 1.0).view(-1), table("nf4_midpoints", weight.device), out_int32=True
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


DEQUANTIZE_BACKENDS = ("auto", "torch", "triton", "native")


def _native_applies(state: NF4State) -> bool:
    """Whether ``auto`` takes the native CPU kernel: plain CPU tensors, outside torch.compile's
    tracing (which cannot see into a ctypes call), with the kernel built."""
    from peftcore.kernels import nf4_cpu

    tensors = (state.packed, state.absmax)
    return (
        all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu" for t in tensors)
        and not torch.compiler.is_compiling()
        and nf4_cpu.available()
    )


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """``NF4[q_i] * absmax[i // blocksize]`` computed in fp32, cast to ``dtype`` (default: the
    quantized tensor's dtype), in the original shape.

    ``backend``: ``torch`` (plain PyTorch ops, any device), ``triton`` (one fused kernel for CUDA,
    ``peftcore.nf4_triton``), ``native`` (one pass in C for x86-64 CPUs, ``peftcore.kernels.nf4_cpu``,
    compiled on first use), or ``auto``: Triton for CUDA tensors when it is installed, the native
    kernel for CPU tensors when it builds, else torch. All give bit-identical results.
    """
    if backend not in DEQUANTIZE_BACKENDS:
        raise ValueError(f"backend must be one of {DEQUANTIZE_BACKENDS}, got {backend!r}")
    dtype = dtype or state.dtype
    kernel = None
    if backend == "triton" or (backend == "auto" and state.packed.is_cuda and triton_available()):
        from peftcore import nf4_triton as kernel
    elif backend == "native" or (
        backend == "auto" and dtype in QUANTIZABLE_DTYPES and _native_applies(state)
    ):
        from peftcore.kernels import nf4_cpu as kernel
    if kernel is not None:  # both kernels take the state's tensors and the two codebooks
        device = state.packed.device
        return kernel.dequantize(
            state.packed,
            state.absmax,
            state.absmax2,
            state.offset,
            table("nf4", device),
            table("dynamic8", device),
            state.shape,
            state.blocksize,
            dtype,
        )
    absmax = dequantize_absmax(state)
    pairs = table("nf4_bytes", state.packed.device).index_select(0, state.packed.reshape(-1).int())
    values = pairs.view(torch.float32)
    n = state.shape.numel()
    weight = (_per_block(values, state.blocksize) * absmax.unsqueeze(1)).view(-1)[:n]
    return weight.view(state.shape).to(dtype)
