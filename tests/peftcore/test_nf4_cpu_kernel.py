"""The native NF4 CPU kernel (peftcore/kernels/nf4_cpu.c): bit-identical with the PyTorch path and
bitsandbytes' CPU kernel, taken by default on x86-64, and a clean fallback or error when it cannot
be built (no compiler, disabled, a corrupt cached library, two processes building at once)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import pytest
import torch

from peftcore.kernels import nf4_cpu
from peftcore.nf4_format import dequantize_nf4, quantize_nf4, table

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
buildable = platform.machine().lower() in ("x86_64", "amd64") and shutil.which("cc") is not None


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """The kernel built anew into an empty cache (and the cached answer restored afterwards)."""
    monkeypatch.setenv("PEFTCORE_CACHE", str(tmp_path / "cache"))
    nf4_cpu._library.cache_clear()
    yield tmp_path / "cache" / "kernels"
    nf4_cpu._library.cache_clear()


@pytest.mark.skipif(not buildable, reason="the native kernel needs x86-64 and a C compiler (cc)")
def test_the_kernel_builds_here():
    # where it can be built it must be: a silent fallback would hide a broken kernel behind the torch path
    assert nf4_cpu.available(), nf4_cpu.unavailable_reason()


needs_kernel = pytest.mark.skipif(not nf4_cpu.available(), reason=f"{nf4_cpu.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize(
    "shape,blocksize",
    [
        ((768, 768), 64),  # t5-base attention
        ((3072, 768), 64),  # t5-base feed-forward
        ((7, 9), 64),  # one partial block, odd length
        ((33, 31), 32),  # blocks narrower than the 64-value vector step
        ((100, 77), 128),  # partial last block over several vector steps
        ((5, 1001), 4096),  # one partial block of the largest size
        ((1,), 64),
        ((300, 257), 256),  # more than 256 blocks: the second double-quantization scale
    ],
)
@pytest.mark.parametrize("double_quant", [True, False])
def test_native_equals_the_torch_path(shape, blocksize, double_quant):
    weight = 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(blocksize))
    state = quantize_nf4(weight, blocksize, double_quant)
    tables = (table("nf4", torch.device("cpu")), table("dynamic8", torch.device("cpu")))
    for dtype in DTYPES:
        expected = dequantize_nf4(state, dtype, backend="torch")
        got = dequantize_nf4(state, dtype, backend="native")
        assert got.dtype == dtype and got.shape == weight.shape
        assert torch.equal(got, expected), (dtype, (got.float() - expected.float()).abs().max())
        for isa in nf4_cpu.instruction_sets():  # each path this CPU can run, not only the fastest
            state_args = (state.packed, state.absmax, state.absmax2, state.offset, *tables)
            got = nf4_cpu.dequantize(*state_args, state.shape, blocksize, dtype, isa=isa)
            assert torch.equal(got, expected), (dtype, isa)


@needs_kernel
def test_native_rounds_like_torch_at_the_edges_of_each_dtype():
    # large scales overflow fp16 to inf, tiny ones reach fp16 subnormals and bf16's last bits
    for scale in (1e5, 7e4, 1e-6, 3e-38, 1.0):
        weight = scale * torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
        state = quantize_nf4(weight, 64, double_quant=False)
        for dtype in DTYPES:
            assert torch.equal(
                dequantize_nf4(state, dtype, backend="native"), dequantize_nf4(state, dtype, backend="torch")
            ), (scale, dtype)
    assert torch.isinf(
        dequantize_nf4(quantize_nf4(1e5 * weight, 64, False), torch.float16, backend="native")
    ).any()


@needs_kernel
def test_non_finite_scales_give_the_same_values():
    # an inf weight makes its block's scale inf: codes * inf are +-inf, 0 * inf is NaN
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    weight[0, 5], weight[3, 70] = float("inf"), float("-inf")
    state = quantize_nf4(weight, 64, double_quant=False)
    for dtype in DTYPES:
        got = dequantize_nf4(state, dtype, backend="native")
        expected = dequantize_nf4(state, dtype, backend="torch")
        assert torch.isnan(expected).any() and torch.isinf(expected).any()
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@needs_kernel
def test_native_equals_bitsandbytes_cpu_kernel():
    bnb = pytest.importorskip("bitsandbytes.functional")
    weight = 0.02 * torch.randn(3072, 768, generator=torch.Generator().manual_seed(0))
    ours = quantize_nf4(weight, 64, double_quant=True)
    packed, theirs = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    for dtype in DTYPES:
        theirs.dtype = dtype
        assert torch.equal(dequantize_nf4(ours, dtype, backend="native"), bnb.dequantize_4bit(packed, theirs))


@needs_kernel
def test_auto_takes_the_native_kernel_on_the_cpu(monkeypatch):
    calls = []
    real = nf4_cpu.dequantize
    monkeypatch.setattr(nf4_cpu, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    state = quantize_nf4(torch.randn(64, 64), 64, True)
    dequantize_nf4(state, torch.bfloat16)
    assert calls == [1]


def test_disabled_kernel_falls_back_with_the_same_values(fresh_build, monkeypatch):
    monkeypatch.setenv("PEFTCORE_NATIVE_NF4", "0")
    assert not nf4_cpu.available()
    assert nf4_cpu.unavailable_reason() == "disabled by PEFTCORE_NATIVE_NF4=0"
    state = quantize_nf4(torch.randn(64, 96), 64, True)
    assert torch.equal(
        dequantize_nf4(state, torch.bfloat16), dequantize_nf4(state, torch.bfloat16, backend="torch")
    )
    with pytest.raises(
        RuntimeError, match="native NF4 CPU kernel is unavailable: disabled by PEFTCORE_NATIVE_NF4=0"
    ):
        dequantize_nf4(state, torch.bfloat16, backend="native")


@pytest.mark.skipif(not buildable, reason="needs x86-64")
def test_a_missing_compiler_is_named(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert not nf4_cpu.available()
    assert "'no-such-compiler-here' is not on PATH" in nf4_cpu.unavailable_reason()
    assert not list(fresh_build.glob("*.so"))


@pytest.mark.skipif(not buildable, reason="the native kernel needs x86-64 and a C compiler (cc)")
def test_a_corrupt_cached_library_is_rebuilt(fresh_build):
    library = nf4_cpu.library_path()
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared object")  # a truncated or foreign file under the cached name
    assert nf4_cpu.available(), nf4_cpu.unavailable_reason()
    assert library.stat().st_size > 1000
    state = quantize_nf4(torch.randn(64, 128), 64, True)
    assert torch.equal(dequantize_nf4(state, backend="native"), dequantize_nf4(state, backend="torch"))


@pytest.mark.skipif(not buildable, reason="the native kernel needs x86-64 and a C compiler (cc)")
def test_processes_building_at_once_leave_one_whole_library(fresh_build, monkeypatch):
    script = (
        "import torch; from peftcore.kernels import nf4_cpu; from peftcore.nf4_format import *; "
        "s = quantize_nf4(torch.randn(256, 256), 64, True); assert nf4_cpu.available(), nf4_cpu.unavailable_reason(); "
        "assert torch.equal(dequantize_nf4(s, backend='native'), dequantize_nf4(s, backend='torch'))"
    )
    workers = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0, 0]
    assert len(list(fresh_build.glob("nf4_cpu-*.so"))) == 1
    assert not [p for p in fresh_build.iterdir() if p.name.endswith(".partial")]


@needs_kernel
def test_mismatched_state_is_refused():
    state = quantize_nf4(torch.randn(64, 64), 64, True)
    codes = torch.zeros(16)
    scales = (state.absmax, state.absmax2, state.offset, codes, codes, state.shape, 64)
    with pytest.raises(ValueError, match="does not match shape"):
        nf4_cpu.dequantize(state.packed[:-1], *scales, torch.float32)
    with pytest.raises(ValueError, match="isa must be one this CPU runs"):
        nf4_cpu.dequantize(state.packed, *scales, torch.float32, isa="sse")
    with pytest.raises(ValueError, match="writes"):
        nf4_cpu.dequantize(state.packed, *scales, torch.float64)


def test_torch_compile_traces_the_torch_path_without_a_graph_break():
    # a ctypes call cannot be traced: under torch.compile, auto takes the PyTorch ops (fullgraph
    # makes a graph break an error)
    state = quantize_nf4(torch.randn(64, 96), 64, True)
    compiled = torch.compile(lambda s: dequantize_nf4(s, torch.bfloat16), backend="eager", fullgraph=True)
    assert torch.equal(compiled(state), dequantize_nf4(state, torch.bfloat16, backend="torch"))
