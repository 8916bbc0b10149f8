"""Inference: generation throughput of an adapted model, unmerged and merged, ours next to peft.

    python -m benchmarks.bench_inference [--device cuda] [--shape t5-small] [--repeats 5]

peft users are told to merge the adapter for speed; this measures what merging buys in each
library. For each method the same perturbed adapter (ours, copied into peft through its file) runs
``generate`` (greedy, exactly ``--new-tokens`` tokens: ``min_new_tokens`` = ``max_new_tokens``)
on one batch of ``--batch`` x ``--src`` tokens, in six forms taking turns, three per library:
unmerged; merged, the adapter layers kept so that it can be unmerged (``peftcore.merge``, peft's
``merge_adapter``); unloaded, the plain model with the merged weights (``peftcore.unload(merge=True)``,
peft's ``merge_and_unload``). Reported: generated tokens per second (median, min, max), each form's
ratio to peft unmerged and each of ours to peft's same form, with their spreads, and whether every
form generated the same tokens as peft unmerged. Results go to
``benchmarks/results/bench_inference_<device>.json``.
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

import peftcore
from benchmarks import common, report
from benchmarks.bench_train_step import build_base, perturb
from benchmarks.common import machine, ratio, summary, time_interleaved, write_result

METHODS = {
    "lora r=16 q,v": peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "v")),
    "ia3": peftcore.IA3Config(),
}
REFERENCE = "peft unmerged"
FORMS = ("ours unmerged", "ours merged", "ours unloaded", REFERENCE, "peft merged", "peft unloaded")


def forms(shape: str, config, device: torch.device) -> dict[str, torch.nn.Module]:
    import peft

    base = build_base(shape, device)
    ours = peftcore.inject(copy.deepcopy(base), config)
    perturb(ours)
    ours.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftcore.save_adapter(ours, tmp)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        theirs_merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        theirs_merged.merge_adapter()
        theirs_unloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).merge_and_unload().eval()
        ours_merged = copy.deepcopy(ours)
        peftcore.merge(ours_merged)
        ours_unloaded = peftcore.unload(copy.deepcopy(ours), merge=True)
    return {
        "ours unmerged": ours,
        "ours merged": ours_merged,
        "ours unloaded": ours_unloaded,
        REFERENCE: theirs,
        "peft merged": theirs_merged,
        "peft unloaded": theirs_unloaded,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__)
    parser.add_argument("--shape", default="t5-small")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args, device = common.parse(parser, argv)
    g = torch.Generator().manual_seed(3)
    inputs = {
        "input_ids": torch.randint(2, 32000, (args.batch, args.src), generator=g).to(device),
        "attention_mask": torch.ones(args.batch, args.src, dtype=torch.long, device=device),
    }
    settings = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1
    )
    result = dict(
        benchmark="inference: generate, unmerged vs merged, ours vs peft",
        machine=machine(device),
        settings=vars(args),
        results=[],
    )
    for method in args.methods:
        models = forms(args.shape, METHODS[method], device)
        outputs = {}

        def generate(name: str, models=models, outputs=outputs):
            def run():
                with torch.no_grad():
                    outputs[name] = models[name].generate(**inputs, **settings)

            return run

        times = time_interleaved({name: generate(name) for name in models}, args.repeats, device, warmup=1)
        tokens = args.batch * args.new_tokens
        row = dict(shape=args.shape, method=method, tokens_per_call=tokens)
        for name, samples in times.items():
            row[name] = dict(
                ms=summary(samples),
                tokens_per_s=round(tokens / (sorted(samples)[len(samples) // 2] / 1e3), 1),
                ratio_to_peft_unmerged=ratio(samples, times[REFERENCE]),
                same_tokens_as_peft_unmerged=bool(torch.equal(outputs[name], outputs[REFERENCE])),
            )
            if name.startswith("ours"):  # against peft's same form: unmerged, merged, unloaded
                row[name]["ratio_to_peft_same_form"] = ratio(samples, times[name.replace("ours", "peft")])
        result["results"].append(row)
        write_result("bench_inference", device, result)
    print("\n".join(report.inference(result)))  # the table benchmarks/README.md shows
    return result


if __name__ == "__main__":
    main()
