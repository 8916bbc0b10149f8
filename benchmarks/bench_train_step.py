"""One training step (forward + backward + AdamW step), peftcore next to peft, same weights, same batch.

    python -m benchmarks.bench_train_step [--device cuda] [--shapes t5-small t5-base] [--methods ...]
                                          [--precision bf16|fp32] [--repeats 20] [--compile]

For each T5 shape and method, both libraries wrap copies of one randomly initialised model; our
adapter is perturbed away from its init (B != 0, IA3 vectors != 1) and copied into peft's, so the
first step checks parity (loss, logits and adapter gradients, dropout off) before anything is
timed. Then the two steps alternate ``--repeats`` times with a third, the floor: the frozen base
alone with the gradient flowing back to its input embeddings, the work every adapter's step
contains. The ratio is ours / peft (below 1: ours is faster), with the range of the per-repeat
ratios; each library's cost above the floor shows what the adapter itself costs. QLoRA's
reference is peft over bitsandbytes' ``Linear4bit`` (NF4, double quantization; bf16 compute
under ``--precision bf16``, else fp32), quantized from the same fp32 weights.

``--precision bf16`` runs forward and loss under ``torch.autocast(bfloat16)`` with fp32 master
weights (what Lightning's ``bf16-mixed`` and the HF Trainer's ``bf16=True`` do). On CUDA the run
also reports each step's peak memory above the model, the FLOPs of a step (counted by
``torch.utils.flop_counter``) and the model FLOPs utilisation against the bf16 matrix-product rate
measured in the same run. Results go to ``benchmarks/results/bench_train_step_<device>.json``.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers
from torch import nn

import peftcore
from benchmarks import common
from benchmarks.common import (
    machine,
    measured_ceilings,
    print_table,
    ratio,
    summary,
    swap_to_bitsandbytes_nf4,
    time_interleaved,
    write_result,
)
from peftcore.surgery import adapter_layers
from peftcore.t5 import t5_config

ALL_LINEAR = ("q", "k", "v", "o", "wi", "wo")
METHODS: dict[str, dict] = {
    "lora r=16 q,v": dict(config=peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "v"))),
    "lora r=32 all linear": dict(config=peftcore.LoRAConfig(r=32, alpha=64, target_modules=ALL_LINEAR)),
    # the study's LoRA (experiments/configs/lora.yaml) has dropout: peft's draws a mask per element
    "lora r=32 all linear, dropout 0.05": dict(
        config=peftcore.LoRAConfig(r=32, alpha=64, dropout=0.05, target_modules=ALL_LINEAR)
    ),
    "ia3": dict(config=peftcore.IA3Config()),
    "qlora r=16 q,v": dict(config=peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "v")), nf4=True),
    "dora r=16 all linear": dict(config=peftcore.DoRAConfig(r=16, alpha=32, target_modules=ALL_LINEAR)),
    "qdora r=16 q,v": dict(config=peftcore.DoRAConfig(r=16, alpha=32, target_modules=("q", "v")), nf4=True),
}


def build_base(shape: str, device: torch.device, seed: int = 0) -> nn.Module:
    """A random-init T5 of ``shape`` without dropout: the two libraries would draw different masks."""
    torch.manual_seed(seed)
    config = t5_config(shape)
    config.dropout_rate = 0.0
    with torch.device(device):
        return transformers.T5ForConditionalGeneration(config)


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter tensor away from its init, so that the adapter changes outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for tensor in layer.adapter_params().values():
                noise = torch.randn(tensor.shape, generator=g).to(tensor.device)
                tensor.add_(0.02 * noise)


def peft_reference(
    base: nn.Module, ours: nn.Module, config, nf4: bool, compute_dtype: torch.dtype
) -> nn.Module:
    """peft over a copy of ``base`` (over bitsandbytes Linear4bit for QLoRA), holding our adapter's values."""
    import peft
    from safetensors.torch import load_file

    model = copy.deepcopy(base)
    if nf4:
        swap_to_bitsandbytes_nf4(model, compute_dtype)
    if isinstance(config, peftcore.LoRAConfig):
        peft_config = peft.LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            use_dora=isinstance(config, peftcore.DoRAConfig),
            task_type="SEQ_2_SEQ_LM",
        )
    else:
        peft_config = peft.IA3Config(
            target_modules=list(config.target_modules),
            feedforward_modules=list(config.feedforward_modules),
            task_type="SEQ_2_SEQ_LM",
        )
    reference = peft.get_peft_model(model, peft_config)
    with tempfile.TemporaryDirectory() as tmp:
        peftcore.save_adapter(ours, tmp)
        result = peft.set_peft_model_state_dict(reference, load_file(f"{tmp}/adapter_model.safetensors"))
    assert not result.unexpected_keys, result.unexpected_keys
    return reference


def make_batch(batch: int, src: int, tgt: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, 32000, (batch, src), generator=g).to(device),
        "attention_mask": torch.ones(batch, src, dtype=torch.long).to(device),
        "labels": torch.randint(2, 32000, (batch, tgt), generator=g).to(device),
    }


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def floor_step(base: nn.Module, batch: dict, autocast) -> Callable[[], torch.Tensor]:
    """The frozen base alone, the gradient flowing back to its input embeddings: the work every
    adapter's step contains (forward, and backward through every layer), with no adapter."""
    for param in base.parameters():
        param.requires_grad_(False)
    embed = base.get_input_embeddings()

    def step() -> torch.Tensor:
        inputs = embed(batch["input_ids"]).detach().requires_grad_()
        with autocast():
            loss = base(
                inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        loss.backward()
        return loss

    return step


def make_step(model: nn.Module, batch: dict, autocast, forward=None) -> Callable[[], torch.Tensor]:
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-5)
    forward = model if forward is None else forward

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def adapter_grads(model: nn.Module, ours: bool) -> list[torch.Tensor]:
    """Gradients of the adapter tensors in a common order (module name, then tensor role)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            key = key.replace("ia3_l", "scale").replace("lora_magnitude_vector.weight", "magnitude")
            grads[key] = param.grad.detach().float().reshape(-1)
    return [grads[k] for k in sorted(grads)]


def parity(ours: nn.Module, theirs: nn.Module, batch: dict, autocast) -> dict:
    out = {}
    losses, grads = [], []
    for model, is_ours in ((ours, True), (theirs, False)):
        model.zero_grad(set_to_none=True)
        with autocast():
            result = model(**batch)
        result.loss.backward()
        losses.append(result.loss.detach().float())
        out.setdefault("logits", []).append(result.logits.detach().float())
        grads.append(adapter_grads(model, is_ours))
        model.zero_grad(set_to_none=True)
    assert len(grads[0]) == len(grads[1]) and grads[0], (len(grads[0]), len(grads[1]))
    a, b = torch.cat(grads[0]), torch.cat(grads[1])
    logits = out["logits"]
    return dict(
        loss_ours=round(losses[0].item(), 6),
        loss_peft=round(losses[1].item(), 6),
        loss_abs_diff=float((losses[0] - losses[1]).abs()),
        logits_max_abs_diff=float((logits[0] - logits[1]).abs().max()),
        grad_rel_diff=float((a - b).norm() / b.norm()),
        grad_tensors=len(grads[0]),
    )


def floor_and_overheads(times: dict[str, list[float]]) -> dict:
    """The floor's time and each library's cost above it (medians), when the floor was timed."""
    if "floor" not in times:
        return {}
    floor = statistics.median(times["floor"])
    return dict(
        floor_ms=summary(times["floor"]),
        overhead_ms={name: round(statistics.median(times[name]) - floor, 1) for name in ("ours", "peft")},
    )


def step_flops(step_model: nn.Module, batch: dict, autocast) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            loss = step_model(**batch).loss
        loss.backward()
    step_model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_step_memory(step: Callable[[], torch.Tensor], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_case(shape: str, method: str, args, device: torch.device, ceilings: dict) -> dict:
    spec = METHODS[method]
    config, nf4 = spec["config"], spec.get("nf4", False)
    base = build_base(shape, device)
    ours = copy.deepcopy(base)
    compute = torch.bfloat16 if args.precision == "bf16" else torch.float32  # the 4-bit layers' matmuls
    if nf4:
        peftcore.quantize(ours, peftcore.NF4Config(blocksize=64, double_quant=True, compute_dtype=compute))
    peftcore.inject(ours, config)
    perturb(ours)
    theirs = peft_reference(base, ours, config, nf4, compute)
    batch = make_batch(args.batch, args.src, args.tgt, device)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.precision == "bf16"
        else nullcontext
    )
    ours.eval(), theirs.eval()  # parity without dropout: the two libraries would draw different masks
    check = parity(ours, theirs, batch, autocast)
    ours.train(), theirs.train(), base.train()

    forward_ours, forward_theirs = ours, theirs
    compile_s = {}
    if args.compile:
        forward_ours, forward_theirs = torch.compile(ours), torch.compile(theirs)
    steps = {
        "ours": make_step(ours, batch, autocast, forward_ours),
        "peft": make_step(theirs, batch, autocast, forward_theirs),
    }
    if not args.compile:
        steps["floor"] = floor_step(base, batch, autocast)
    for name, step in steps.items():  # first call: compilation (when asked) and allocator warm-up
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_s[name] = round(time.perf_counter() - start, 2)
    memory = {name: peak_step_memory(step, device) for name, step in steps.items()}
    times = time_interleaved(steps, args.repeats, device, warmup=args.warmup)
    row = dict(
        shape=shape,
        method=method,
        precision=args.precision,
        compiled=args.compile,
        batch=[args.batch, args.src, args.tgt],
        trainable_params=peftcore.count_parameters(ours).trainable,
        parity=check,
        ours_ms=summary(times["ours"]),
        peft_ms=summary(times["peft"]),
        ratio=ratio(times["ours"], times["peft"]),
        first_step_s=compile_s,
        **floor_and_overheads(times),
        peak_step_memory_mib={k: (round(v / 2**20, 1) if v is not None else None) for k, v in memory.items()},
    )
    if device.type == "cuda" and not args.compile:
        flops = step_flops(ours, batch, autocast)
        achieved = flops / (statistics.median(times["ours"]) * 1e-3)
        row["step_tflop"] = round(flops / 1e12, 3)
        row["ours_tflop_s"] = round(achieved / 1e12, 1)
        if ceilings.get("bf16_matmul_tflop_s"):
            row["mfu_vs_measured_bf16_peak"] = round(achieved / 1e12 / ceilings["bf16_matmul_tflop_s"], 3)
    del ours, theirs, steps, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__)
    parser.add_argument("--shapes", nargs="+", default=["t5-small", "t5-base"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=None,
        help="default: bf16 on CUDA, fp32 on CPU (what fit uses there)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src", type=int, default=512)
    parser.add_argument("--tgt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each after the first")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile both models (compile time reported)"
    )
    parser.add_argument("--name", default="bench_train_step", help="result file name (before the device tag)")
    args, device = common.parse(parser, argv)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    ceilings = measured_ceilings(device)
    result = dict(
        benchmark="training step, ours vs peft",
        machine=machine(device),
        ceilings=ceilings,
        settings=vars(args),
        results=[],
    )
    for shape in args.shapes:
        for method in args.methods:
            row = bench_case(shape, method, args, device, ceilings)
            result["results"].append(row)
            write_result(args.name, device, result)  # after every case: a cut-off run keeps what it measured
            print(
                f"{shape} {method}: ours {row['ours_ms']['median']:.2f} ms, peft {row['peft_ms']['median']:.2f} ms, "
                f"ratio {row['ratio']['median']} [{row['ratio']['low']}, {row['ratio']['high']}], "
                f"parity {row['parity']}",
                flush=True,
            )
    print_table(
        (
            "shape",
            "method",
            "ours ms",
            "peft ms",
            "floor ms",
            "ratio [range]",
            "verdict",
            "loss diff",
            "grad rel diff",
            "peak MiB ours/peft",
        ),
        [
            (
                r["shape"],
                r["method"],
                r["ours_ms"]["median"],
                r["peft_ms"]["median"],
                r.get("floor_ms", {}).get("median"),
                f"{r['ratio']['median']} [{r['ratio']['low']}, {r['ratio']['high']}]",
                r["ratio"]["verdict"],
                f"{r['parity']['loss_abs_diff']:.1e}",
                f"{r['parity']['grad_rel_diff']:.1e}",
                f"{r['peak_step_memory_mib']['ours']}/{r['peak_step_memory_mib']['peft']}",
            )
            for r in result["results"]
        ],
        f"training step on {result['machine']['device']} ({args.precision}, batch {args.batch}x{args.src}/{args.tgt}, "
        f"median of {args.repeats}{', compiled' if args.compile else ''})",
    )
    return result


if __name__ == "__main__":
    main()
