"""Parity: does peftcore compute what peft computes? Every method and init, on the same weights and batch.

    python -m benchmarks.bench_parity [--device cuda] [--shape t5-small] [--cases ...]

For each case one random-init T5 of ``--shape`` is the base of both libraries. Ours is injected
and every adapter tensor is moved away from its init (B != 0, IA3 vectors != 1, a DoRA magnitude
off the row norms, a prompt off its draw): an adapter that does nothing would prove nothing. Then:

* **ours -> peft**: our adapter is saved and peft loads the file onto its own copy of the base
  (``PeftModel.from_pretrained``; for QLoRA onto bitsandbytes ``Linear4bit`` layers quantized
  from the same fp32 weights, for PiSSA/OLoRA peft re-runs the init from the saved name); its
  logits are compared with ours;
* the same file in a trainable peft model: the loss, the logits and every adapter gradient of
  both, compared under the file's tensor names (max |difference| and the relative L2 difference
  of the gradients);
* **peft -> ours**: peft saves its adapter (holding other values: its gradients) and ours loads it;
  the logits are compared again;
* the adapter's effect (max |logits - the bare base's logits|) and the gradient norm, which show
  that the adapter under test changes something;
* trainable parameter counts of both (peft allocates 2n prompt rows for an encoder-decoder model,
  and trains n of them; ours allocates n).

fp32 throughout (QLoRA's 4-bit matmuls too), dropout off, eval mode. Results go to
``benchmarks/results/bench_parity_<device>.json``.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

import peftcore
from benchmarks import common
from benchmarks.bench_train_step import build_base
from benchmarks.common import machine, print_table, swap_to_bitsandbytes_nf4, write_result
from peftcore import peft_format
from peftcore.checkpoint import read_adapter_tensors, to_peft_config
from peftcore.testing import move_off_init

ALL_LINEAR = ("q", "k", "v", "o", "wi", "wo")
CASES: dict[str, dict] = {
    "LoRA kaiming": dict(config=peftcore.LoRAConfig(r=16, alpha=32)),
    "LoRA gaussian": dict(config=peftcore.LoRAConfig(r=16, alpha=32, init="gaussian")),
    "LoRA PiSSA": dict(config=peftcore.LoRAConfig(r=16, alpha=32, init="pissa")),
    "LoRA OLoRA": dict(config=peftcore.LoRAConfig(r=16, alpha=32, init="olora")),
    "rsLoRA": dict(config=peftcore.LoRAConfig(r=16, alpha=32, use_rslora=True)),
    "LoRA r=32 all linear + lm_head": dict(
        config=peftcore.LoRAConfig(r=32, alpha=64, target_modules=(*ALL_LINEAR, "lm_head"))
    ),
    "IA3": dict(config=peftcore.IA3Config()),
    "prompt tuning": dict(config=peftcore.PromptTuningConfig(num_virtual_tokens=20)),
    "DoRA": dict(config=peftcore.DoRAConfig(r=16, alpha=32)),
    "QLoRA (NF4, double quant)": dict(config=peftcore.LoRAConfig(r=16, alpha=32), nf4=True),
    "QDoRA": dict(config=peftcore.DoRAConfig(r=16, alpha=32), nf4=True),
}


def batch_on(device: torch.device, batch: int, src: int, tgt: int, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = {
        "input_ids": torch.randint(2, 32000, (batch, src), generator=g),
        "attention_mask": torch.ones(batch, src, dtype=torch.long),
        "labels": torch.randint(2, 32000, (batch, tgt), generator=g),
    }
    data["attention_mask"][-1, -src // 4 :] = 0  # padding on one row: the prompt must extend the mask right
    return {k: v.to(device) for k, v in data.items()}


def gradients_as_saved(model: nn.Module, save) -> dict[str, torch.Tensor]:
    """Each adapter tensor's gradient under the name the adapter file gives it: the gradients are
    written into the parameters (which they overwrite) and ``save`` returns the file's tensors."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.grad)
    return {k: v.detach().float().cpu() for k, v in save().items()}


def compare(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def run_case(name: str, shape: str, device: torch.device, batch_shape: tuple[int, int, int]) -> dict:
    import peft

    spec = CASES[name]
    config, nf4 = spec["config"], spec.get("nf4", False)
    translator = peft_format.for_config(config)
    base = build_base(shape, device).eval()
    batch = batch_on(device, *batch_shape)

    def ours_base() -> nn.Module:
        model = copy.deepcopy(base)
        if nf4:
            peftcore.quantize(
                model, peftcore.NF4Config(blocksize=64, double_quant=True, compute_dtype=torch.float32)
            )
        return model

    def peft_base() -> nn.Module:
        model = copy.deepcopy(base)
        return swap_to_bitsandbytes_nf4(model, torch.float32) if nf4 else model

    with torch.no_grad():
        base_logits = ours_base().eval()(**batch).logits  # for the adapter's effect: proof it does something
    ours = peftcore.inject(ours_base(), config)
    move_off_init(ours, seed=1)  # every adapter tensor off its init: an adapter doing nothing proves nothing

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftcore.save_adapter(ours, f"{tmp}/ours")
        with torch.no_grad():  # what a peft user does with our file
            reader = peft.PeftModel.from_pretrained(peft_base(), f"{tmp}/ours").eval()
            read_logits = reader(**batch).logits
        del reader
        # the same file into a trainable peft model, for the gradients (peft loads prompts frozen only)
        data = {**to_peft_config(ours.peftcore_config, ours), "inference_mode": False}
        theirs = peft.get_peft_model(peft_base(), peft.PeftConfig.from_peft_type(**data)).eval()
        peft.set_peft_model_state_dict(theirs, read_adapter_tensors(Path(tmp) / "ours"))
        results = [model(**batch) for model in (ours, theirs)]
        for result in results:
            result.loss.backward()
        grads = [
            gradients_as_saved(
                ours,
                lambda: (peftcore.save_adapter(ours, f"{tmp}/g"), read_adapter_tensors(Path(tmp) / "g"))[1],
            ),
            gradients_as_saved(theirs, lambda: peft.get_peft_model_state_dict(theirs)),
        ]
        grads = [translator.read_file_tensors(g, data) for g in grads]
        # peft also saves the frozen weight of a tied layer it adapts (lm_head): not an adapter tensor
        frozen_extra = sorted(k for k in grads[1].keys() - grads[0].keys() if k.endswith("base_layer.weight"))
        for key in frozen_extra:
            del grads[1][key]
        if grads[0].keys() != grads[1].keys():
            raise AssertionError(
                f"{name}: the two libraries' adapter tensors differ: "
                f"{sorted(grads[0].keys() ^ grads[1].keys())[:6]}"
            )
        relative = max(
            float((grads[0][k] - grads[1][k]).norm() / grads[1][k].norm().clamp_min(1e-30)) for k in grads[0]
        )

        theirs.save_pretrained(f"{tmp}/peft")  # now holding its gradients: other values than ours had
        with torch.no_grad():
            theirs_logits = theirs(**batch).logits
            loaded = peftcore.load_adapter(ours_base(), f"{tmp}/peft").eval()
            back_logits = loaded(**batch).logits
    trainable_peft = theirs.get_nb_trainable_parameters()[0]
    return dict(
        case=name,
        shape=shape,
        method=type(config).__name__,
        config=repr(config),
        loss=[round(float(r.loss.detach()), 6) for r in results],
        loss_abs_diff=abs(float(results[0].loss.detach() - results[1].loss.detach())),
        logits_max_abs_diff=compare(results[0].logits, results[1].logits),
        adapter_effect_on_logits=compare(results[0].logits, base_logits),
        peft_reads_ours_logits_max_abs_diff=compare(read_logits, results[0].logits),
        grad_max_abs_diff=max(compare(grads[0][k], grads[1][k]) for k in grads[0]),
        grad_max_rel_diff=relative,
        grad_tensors=len(grads[0]),
        grad_norm=float(torch.cat([g.reshape(-1) for g in grads[0].values()]).norm()),
        peft_to_ours_logits_max_abs_diff=compare(back_logits, theirs_logits),
        trainable_ours=peftcore.count_parameters(ours).trainable,
        trainable_peft=trainable_peft,
        peft_saves_frozen=frozen_extra,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__)
    parser.add_argument("--shape", default="t5-small")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, nargs=3, default=(4, 128, 32), metavar=("N", "SRC", "TGT"))
    args, device = common.parse(parser, argv)
    result = dict(
        benchmark="parity, ours vs peft (fp32, same weights and batch)",
        machine=machine(device),
        settings=vars(args),
        results=[],
    )
    for name in args.cases:
        row = run_case(name, args.shape, device, tuple(args.batch))
        result["results"].append(row)
        write_result("bench_parity", device, result)
        print(
            f"{name}: logits {row['logits_max_abs_diff']:.1e}, loss {row['loss_abs_diff']:.1e}, "
            f"grads {row['grad_max_abs_diff']:.1e} (rel {row['grad_max_rel_diff']:.1e}), "
            f"peft->ours {row['peft_to_ours_logits_max_abs_diff']:.1e}, "
            f"trainable {row['trainable_ours']:,} / {row['trainable_peft']:,}",
            flush=True,
        )
    print_table(
        (
            "case",
            "adapter effect",
            "max |Δ logits|",
            "peft reads ours",
            "|Δ loss|",
            "max |Δ grad|",
            "grad rel",
            "peft→ours",
            "trainable ours / peft",
        ),
        [
            (
                r["case"],
                f"{r['adapter_effect_on_logits']:.1e}",
                f"{r['logits_max_abs_diff']:.1e}",
                f"{r['peft_reads_ours_logits_max_abs_diff']:.1e}",
                f"{r['loss_abs_diff']:.1e}",
                f"{r['grad_max_abs_diff']:.1e}",
                f"{r['grad_max_rel_diff']:.1e}",
                f"{r['peft_to_ours_logits_max_abs_diff']:.1e}",
                f"{r['trainable_ours']:,} / {r['trainable_peft']:,}",
            )
            for r in result["results"]
        ],
        f"parity on {args.shape}, {device}",
    )
    return result


if __name__ == "__main__":
    main()
