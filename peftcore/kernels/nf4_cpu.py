"""NF4 dequantization on the CPU in one native pass (``nf4_cpu.c``, AVX2 + F16C), loaded with ctypes.

``w_i = NF4[q_i] * absmax[i // blocksize]`` in fp32, rounded to the output dtype: the same values as
the PyTorch path of ``peftcore.nf4_format.dequantize_nf4``, bit for bit, without its three
full-size temporaries (the gathered fp32 pairs, the scaled product, the cast).

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``) into
``$PEFTCORE_CACHE`` (default ``~/.cache/peftcore``), named by the source's hash, written to a
temporary name and renamed into place, so concurrent processes never load a half-written library.
Where there is no compiler, the CPU lacks AVX2/F16C, or the build fails, ``available()`` is False
and says why in ``unavailable_reason()``; ``dequantize_nf4(backend="auto")`` then uses the PyTorch
path (same values, slower) and ``backend="native"`` raises that reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_suffix(".c")
OUTPUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INSTRUCTION_SETS = {"avx2": 1, "avx512": 2}  # avx512: a faster fp32 path where the CPU has AVX-512F


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTCORE_CACHE") or Path.home() / ".cache" / "peftcore") / "kernels"


def library_path(source: Path = SOURCE) -> Path:
    """Where the library built from ``source`` is cached: named by a hash of the source text."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{digest}.so"


def _build(source: Path) -> Path:
    """Compile ``source`` into the cache (once per source text) and return the library's path."""
    library = library_path(source)
    if library.exists():
        return library
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set CC to one)")
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=library.parent, prefix=f".{library.name}.", suffix=".partial")
    os.close(handle)
    try:
        command = [compiler, "-O3", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC"]
        command += ["-o", partial, str(source)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or the reason it cannot be used (a string)."""
    if os.environ.get("PEFTCORE_NATIVE_NF4", "1") == "0":
        return "disabled by PEFTCORE_NATIVE_NF4=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the native kernel is written for x86-64 (AVX2); this CPU is {platform.machine()}"
    try:
        path = _build(SOURCE)
        try:
            library = ctypes.CDLL(str(path))
        except OSError:  # a cached file that is not a loadable library (truncated, foreign): rebuild it
            path.unlink(missing_ok=True)
            library = ctypes.CDLL(str(_build(SOURCE)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"could not build {SOURCE.name}: {error}"
    if library.peftcore_nf4_cpu_isa() == 0:
        return "this CPU lacks AVX2 or F16C"
    library.peftcore_nf4_dequantize.restype = ctypes.c_int
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.peftcore_nf4_dequantize.argtypes = [pointer] * 5 + [
        ctypes.c_float,
        pointer,
        size,
        size,
        pointer,
        ctypes.c_int,
    ]
    return library


def available() -> bool:
    return not isinstance(_library(), str)


def instruction_sets() -> list[str]:
    """The instruction sets the kernel can use on this CPU (empty where it is unavailable)."""
    library = _library()
    best = 0 if isinstance(library, str) else library.peftcore_nf4_cpu_isa()
    return [name for name, level in INSTRUCTION_SETS.items() if level <= best]


def unavailable_reason() -> str | None:
    reason = _library()
    return reason if isinstance(reason, str) else None


def dequantize(
    packed: Tensor,
    absmax: Tensor,
    absmax2: Tensor | None,
    offset: Tensor | None,
    codes: Tensor,
    dynamic8: Tensor,
    shape: torch.Size,
    blocksize: int,
    dtype: torch.dtype,
    isa: str | None = None,
) -> Tensor:
    """``NF4[q_i] * absmax[i // blocksize]`` as ``dtype`` in ``shape``. ``packed``: uint8, ceil(n/2) bytes, first element
    in the high nibble; ``absmax``: fp32 scales, or with ``absmax2`` and ``offset`` (double
    quantization) uint8 codes of ``dynamic8``; ``codes``: the 16 NF4 values. All on the CPU.
    ``isa``: the instruction set, default the best this CPU has (``instruction_set()``)."""
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"the native NF4 CPU kernel is unavailable: {library}")
    if dtype not in OUTPUT_KINDS:
        raise ValueError(f"the native NF4 kernel writes {tuple(OUTPUT_KINDS)}, got {dtype}")
    best = library.peftcore_nf4_cpu_isa()
    if isa is not None and (isa not in INSTRUCTION_SETS or INSTRUCTION_SETS[isa] > best):
        raise ValueError(f"isa must be one this CPU runs, {instruction_sets()}, got {isa!r}")
    n = shape.numel()
    double_quant = absmax2 is not None
    scales_expected = torch.uint8 if double_quant else torch.float32
    if (
        packed.numel() != (n + 1) // 2
        or absmax.numel() != -(-n // blocksize)
        or absmax.dtype != scales_expected
    ):
        raise ValueError(
            f"NF4 state does not match shape {tuple(shape)} with blocksize {blocksize}: {packed.numel()} "
            f"packed bytes, {absmax.numel()} scales of {absmax.dtype} (expected {scales_expected})"
        )
    packed, absmax = packed.contiguous(), absmax.contiguous()
    codes, dynamic8 = codes.float().contiguous(), dynamic8.float().contiguous()
    out = torch.empty(shape, dtype=dtype)
    if double_quant:
        absmax2 = absmax2.float().contiguous()
        scale_pointers = (None, absmax.data_ptr(), dynamic8.data_ptr(), absmax2.data_ptr(), float(offset))
    else:
        scale_pointers = (absmax.data_ptr(), None, None, None, 0.0)
    status = library.peftcore_nf4_dequantize(
        packed.data_ptr(),
        *scale_pointers,
        codes.data_ptr(),
        n,
        blocksize,
        out.data_ptr(),
        OUTPUT_KINDS[dtype],
        best if isa is None else INSTRUCTION_SETS[isa],
    )
    if status != 0:
        raise ValueError(f"the native NF4 kernel refused blocksize {blocksize} / dtype {dtype}")
    return out
