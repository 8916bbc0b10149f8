"""FSDP2 (peftcore.sharding) on two CPU processes (gloo): training is exact against one process,
the adapter is saved whole, the 4-bit base is sharded, and the counts are the whole model's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import peftcore
from peftcore.sharding import full_parameters, is_sharded, shard, units
from peftcore.testing import random_t5, t5_batch

WORLD = 2
STEPS = 3
# QLoRA in fp32 compute: with bf16, one process and two sum the weight gradient in different
# orders and bf16 rounds them apart; the sharding itself is what is tested here.
METHODS = {
    "full": None,
    "lora": peftcore.LoRAConfig(r=4, alpha=8, target_modules=("q", "v", "wi", "o")),
    # a trained copy in a block (a FSDP unit of its own) and one in the model's root unit
    "lora+copies": peftcore.LoRAConfig(
        r=4, target_modules=("q",), modules_to_save=("final_layer_norm", "lm_head")
    ),
    "dora": peftcore.DoRAConfig(r=4, alpha=8, target_modules=("q", "v", "wo")),
    "ia3": peftcore.IA3Config(),
    "qlora": peftcore.LoRAConfig(r=4, alpha=8, target_modules=("q", "v", "wi", "o")),
    "prompt": peftcore.PromptTuningConfig(num_virtual_tokens=4),  # in the model's own unit
}


def build(method: str) -> nn.Module:
    model = random_t5("t5-tiny")  # eval mode: no dropout, so one process and two see the same model
    if method == "qlora":
        peftcore.quantize(model, peftcore.NF4Config(compute_dtype=torch.float32))
    if METHODS[method] is not None:
        peftcore.inject(model, METHODS[method])
    return model


def train(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    # SGD: an update proportional to the gradient (Adam's first steps are +-lr for any gradient, so
    # a last-bit difference in a gradient of about 0 would show as a whole step)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def trained_tensors(model: nn.Module, method: str, directory: Path) -> dict[str, torch.Tensor]:
    """The adapter file (a method), or the whole state dict (full fine-tuning), as saved."""
    if method == "full":
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    peftcore.save_adapter(model, directory)
    return load_file(directory / "adapter_model.safetensors")


def storage_bytes(model: nn.Module, local: bool) -> int:
    """Bytes of the quantized layers' uint8 storage: this rank's slices, or the whole."""
    total = 0
    for module in model.modules():
        if isinstance(module, peftcore.NF4Linear):
            for name in ("weight_packed", "absmax"):
                t = getattr(module, name)
                t = t.to_local() if local and isinstance(t, DTensor) else t
                total += t.numel() * t.element_size()
    return total


def worker(rank: int, method: str, out: str) -> None:
    out_dir = Path(out)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=WORLD
    )
    try:
        model = build(method)
        counts_before = peftcore.count_parameters(model)
        shard(model, init_device_mesh("cpu", (WORLD,)))
        batch = {k: v.chunk(WORLD)[rank] for k, v in t5_batch(batch=4, src=9, tgt=6).items()}
        train(model, batch)
        record = {
            "counts_before": [counts_before.total, counts_before.trainable],
            "counts_sharded": [
                peftcore.count_parameters(model).total,
                peftcore.count_parameters(model).trainable,
            ],
            "storage_local": storage_bytes(model, local=True),
            "storage_whole": storage_bytes(model, local=False),
            "sharded": is_sharded(model),
        }
        if method == "full":  # torch's own gathering of a whole state dict (what Lightning saves)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            whole = get_model_state_dict(model, options=options)
            if rank == 0:
                torch.save(whole, out_dir / "sharded.pt")
        with full_parameters(model):
            record["dtensors_inside"] = sum(isinstance(p, DTensor) for p in model.parameters())
            if rank == 0 and method != "full":
                torch.save(trained_tensors(model, method, out_dir / "adapter"), out_dir / "sharded.pt")
        record["dtensors_after"] = sum(isinstance(p, DTensor) for p in model.parameters())
        (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
        # Both ranks done before either tears gloo down: a rank destroying the group while the
        # other still talks to it aborted the process now and then ("terminate called without an
        # active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_on_two_processes_trains_like_one_and_saves_whole_tensors(tmp_path, method):
    single = build(method)
    counts = peftcore.count_parameters(single)
    train(single, t5_batch(batch=4, src=9, tgt=6))  # the two ranks' halves at once
    expected = trained_tensors(single, method, tmp_path / "single")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(worker, args=(method, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    got = torch.load(tmp_path / "sharded.pt", weights_only=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    assert got.keys() == expected.keys()
    for key, tensor in expected.items():  # whole tensors, never one rank's slice
        assert got[key].shape == tensor.shape, key
        torch.testing.assert_close(got[key], tensor, atol=2e-6, rtol=1e-5, msg=key)
    untrained = trained_tensors(build(method), method, tmp_path / "untrained")
    assert any(not torch.equal(expected[k], untrained[k]) for k in expected)  # the steps moved it
    layers = sum(isinstance(m, peftcore.NF4Linear) for m in single.modules())
    for record in ranks:
        assert record["sharded"] and record["dtensors_inside"] == 0 and record["dtensors_after"] > 0
        # every rank counts the whole model, sharded or not
        assert record["counts_before"] == record["counts_sharded"] == [counts.total, counts.trainable]
        if method == "qlora":  # each rank holds half of the packed base (a slice padded by a byte at most)
            assert record["storage_whole"] == storage_bytes(single, local=False) > 0
            assert record["storage_local"] <= record["storage_whole"] / WORLD + 2 * layers
        else:
            assert record["storage_whole"] == 0


def test_units_are_the_blocks_of_each_stack():
    model = random_t5("t5-tiny")
    blocks = units(model)
    assert blocks == [*model.encoder.block, *model.decoder.block]


def test_shard_refuses_a_two_dimensional_mesh():
    class Mesh:  # only what shard reads before it shards
        ndim = 2
        mesh_dim_names = ("data_parallel", "tensor_parallel")

    with pytest.raises(ValueError, match="tensor parallelism is not supported"):
        shard(random_t5("t5-tiny"), Mesh())


def test_storage_held_as_parameters_keeps_names_values_and_counts():
    model = random_t5("t5-tiny")
    peftcore.quantize(model, peftcore.NF4Config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts, footprint = peftcore.count_parameters(model), peftcore.memory_footprint(model)
    for module in model.modules():
        if isinstance(module, peftcore.NF4Linear):
            module.hold_storage_as_parameters()
            assert isinstance(module.weight_packed, nn.Parameter) and not module.weight_packed.requires_grad
            assert isinstance(module.absmax, nn.Parameter) and "absmax2" in dict(module.named_buffers())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert peftcore.count_parameters(model) == counts and peftcore.memory_footprint(model) == footprint
    model.to(torch.bfloat16)  # the fp32 scales stay exact, the uint8 storage untouched
    assert all(torch.equal(model.state_dict()[k].float(), before[k].float()) for k in before if "absmax" in k)
