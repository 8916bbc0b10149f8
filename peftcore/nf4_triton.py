"""NF4 dequantization in one Triton kernel (CUDA): the arithmetic of ``nf4_format.dequantize_nf4``.

Each program decodes ``BYTES`` packed bytes (``2 * BYTES`` weights). Per byte ``b`` of block ``j``::

    c_j        = DYN8[q8_j] * absmax2[j // 256] + offset     (double quantization; else the stored fp32 c_j)
    w[2i]      = NF4[b >> 4]  * c_j                           (the high nibble holds the first element)
    w[2i + 1]  = NF4[b & 15]  * c_j

all in fp32, then one rounding to the output dtype. The multiply and the add of ``c_j`` are two
roundings in the PyTorch path and in bitsandbytes (two separate kernels), so the kernel is compiled
with floating-point contraction off (``enable_fp_fusion=False``): a fused multiply-add would round
once and could move the last bit. The result is therefore bit-identical to the PyTorch path, which
the tests check.

One pass over the data: it reads the ``n / 2`` packed bytes and the small absmax vectors and writes
the ``n`` outputs, where the PyTorch path launches a handful of kernels and writes an fp32
intermediate of ``4 n`` bytes before the cast.

``reciprocal`` is the other half of bit-exactness on CUDA. bitsandbytes' CUDA kernels are compiled
with ``--use_fast_math``, so the ``1.0f / absmax`` of its blockwise quantization is the hardware's
approximate reciprocal (``rcp.approx.ftz.f32``), not the correctly rounded quotient; the two differ
in the last bit for some absmax values, and a weight lying that close to a code boundary then gets
the neighbouring code. Quantizing on CUDA, ``nf4_format`` scales by this same instruction's result
(docs/nf4.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch settings, from a sweep on an H100 (benchmarks/bench_nf4.py --sweep): t5-sized weights
# are done in a few microseconds either way; large ones run at ~85% of the copy bandwidth with more
# bytes and warps per program.
LARGE = 1 << 22  # elements


def launch_settings(n: int) -> tuple[int, int]:
    """(bytes per program, warps per program) for a weight of ``n`` elements."""
    return (2048, 8) if n >= LARGE else (1024, 4)


@triton.jit
def _dequantize_kernel(
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    offset_ptr,
    nf4_ptr,
    dynamic8_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BYTES + tl.arange(0, BYTES)
    in_range = byte < (n + 1) // 2
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    block = byte // (BLOCKSIZE // 2)  # both nibbles of a byte share a block: blocksizes are even
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(dynamic8_ptr + code8) * tl.load(absmax2_ptr + block // 256, mask=in_range, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    high = tl.load(nf4_ptr + (packed >> 4)) * scale
    low = tl.load(nf4_ptr + (packed & 15)) * scale
    values = tl.interleave(high, low)
    element = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < n)


# PTX for 1/x. bitsandbytes' fast-math build gives the first; the others are kept for the benchmark
# that checks which one its kernels match (benchmarks/bench_nf4.py --sweep).
RECIPROCALS = {
    "rcp.approx.ftz": "rcp.approx.ftz.f32 $0, $1;",
    "div.full.ftz": "div.full.ftz.f32 $0, 0f3F800000, $1;",
    "div.approx.ftz": "div.approx.ftz.f32 $0, 0f3F800000, $1;",
    "div.rn": "div.rn.f32 $0, 0f3F800000, $1;",
}
BITSANDBYTES_RECIPROCAL = "rcp.approx.ftz"


@triton.jit
def _reciprocal_kernel(x_ptr, out_ptr, n, ASM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = i < n
    x = tl.load(x_ptr + i, mask=in_range, other=1.0)
    y = tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(out_ptr + i, y, mask=in_range)


def reciprocal(x: torch.Tensor, instruction: str = BITSANDBYTES_RECIPROCAL) -> torch.Tensor:
    """``1 / x`` of an fp32 CUDA tensor, computed by one PTX ``instruction`` of ``RECIPROCALS``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    block = 1024
    _reciprocal_kernel[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), ASM=RECIPROCALS[instruction], BLOCK=block
    )
    return out


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    nf4_codes: torch.Tensor,
    dynamic8: torch.Tensor,
    shape: torch.Size,
    blocksize: int,
    dtype: torch.dtype,
    bytes_per_program: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The weight of ``shape`` in ``dtype``; arguments as stored in an ``NF4State`` (tables on its device)."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = out.numel()
    default_bytes, default_warps = launch_settings(n)
    bytes_per_program, num_warps = bytes_per_program or default_bytes, num_warps or default_warps
    double_quant = absmax2 is not None
    grid = (triton.cdiv((n + 1) // 2, bytes_per_program),)
    _dequantize_kernel[grid](
        packed,
        absmax,
        absmax2 if double_quant else absmax,  # unused without double quantization
        offset if double_quant else absmax,
        nf4_codes,
        dynamic8,
        out,
        n,
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double_quant,
        BYTES=bytes_per_program,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out
