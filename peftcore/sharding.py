"""Sharded data parallelism (PyTorch FSDP2, ``fully_shard``) for models carrying peftcore layers.

Zhao et al., 2023, "PyTorch FSDP": each of N ranks keeps 1/N of every parameter (a slice along
dim 0); a unit's parameters are gathered whole for its forward and again for its backward, and
the gradients are reduce-scattered back onto the slices. On top of ``fully_shard`` itself:

- **The 4-bit base shards too.** FSDP slices parameters and replicates buffers, and an
  ``NF4Linear`` keeps its packed weight in buffers: every rank would hold the whole base.
  ``shard`` first makes each quantized layer hold its uint8 storage (packed weight, 8-bit block
  scales) as frozen parameters (no gradient, in no optimizer), so each rank keeps about 1/N of
  it. The fp32 scales (double quantization's second level: 4 bytes per 16,384 weights) stay
  replicated buffers, and so does the whole fp32 absmax of a layer quantized without double
  quantization (4 bytes per 64 weights, one ninth of its storage).
- **Units**: each element of the model's outermost ``nn.ModuleList``s (T5's and GPT-2's blocks,
  BART's and Llama's layers) is one unit, then the model itself (embeddings, final norms, head).
- :func:`full_parameters`: a context in which every parameter is whole on every rank, so that
  ``save_adapter``, ``merge`` or a parameter count reads full tensors, never one rank's slice.
  Every rank must enter it (it gathers); it gathers the whole model for the moment it lasts.
  The same context serves models wrapped by FSDP1 (``FullyShardedDataParallel``, CUDA only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard

from peftcore.weights import is_quantized


def units(model: nn.Module) -> list[nn.Module]:
    """The elements of ``model``'s outermost ``nn.ModuleList``s: its transformer blocks."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


def shard(model: nn.Module, mesh: DeviceMesh | None = None, **fully_shard_options) -> nn.Module:
    """Shard ``model`` across ``mesh`` (a 1-D mesh of the data-parallel ranks; None: every rank)
    with ``fully_shard``: each block a unit, then the model. Quantized layers' uint8 storage
    becomes frozen parameters first, so it is sharded too. Returns ``model`` (now an FSDPModule)."""
    if isinstance(model, FSDPModule):
        raise ValueError("the model is sharded already (fully_shard was applied to it)")
    if mesh is not None and mesh.ndim != 1:
        raise ValueError(
            f"shard takes a 1-D mesh of the data-parallel ranks, got one of dimensions {mesh.mesh_dim_names}: "
            "tensor parallelism is not supported; pass mesh['data_parallel']"
        )
    for module in model.modules():
        if is_quantized(module):
            module.hold_storage_as_parameters()
    try:
        for unit in [*units(model), model]:
            fully_shard(unit, mesh=mesh, **fully_shard_options)
    except RuntimeError as err:
        if "floating point dtype can require gradients" not in str(err):
            raise
        raise RuntimeError(
            f"torch {torch.__version__}'s fully_shard cannot hold the 4-bit base's uint8 storage (it makes every "
            "sharded parameter require a gradient); torch 2.13 can (peftcore's constraints.txt pins it). Upgrade "
            "torch, or train the 4-bit model with DDP"
        ) from None
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any part of ``model`` is sharded by FSDP2 or wrapped by FSDP1."""
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


@contextmanager
def gathered_for_generate(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model.generate`` runs on a model sharded by FSDP2: its outermost unit
    (embeddings, final norms, head) is gathered, since ``generate`` calls the encoder and decoder,
    never the model's forward whose hook would gather it (the blocks gather themselves when
    called). FSDP1 needs nothing: Lightning runs each step inside the wrapper's forward, where
    the parameters are whole. Not sharded: unchanged."""
    fsdp2 = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)
    if fsdp2 is None:
        yield model
        return
    fsdp2.unshard()
    try:
        yield model
    finally:
        fsdp2.reshard()


@contextmanager
def _summoned(model: nn.Module) -> Iterator[None]:
    """FSDP1's full parameters of every outermost FullyShardedDataParallel in ``model``, read-only."""
    fsdp1 = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    nested = {id(inner) for outer in fsdp1 for inner in outer.modules() if inner is not outer}
    with ExitStack() as stack:
        for root in (m for m in fsdp1 if id(m) not in nested):
            stack.enter_context(FullyShardedDataParallel.summon_full_params(root, writeback=False))
        yield


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every parameter of ``model`` is whole on this rank (FSDP2 units unsharded, FSDP1
    roots' full parameters summoned, read-only); outside, sharded again. Every rank must enter.
    A model that is not sharded passes through unchanged."""
    fsdp2 = [m for m in model.modules() if isinstance(m, FSDPModule)]
    with _summoned(model):
        for unit in fsdp2:
            unit.unshard()
        try:
            yield model
        finally:
            for unit in fsdp2:
                unit.reshard()
