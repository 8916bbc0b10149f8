"""``python -m experiments pretrain``: a small T5 pretrained with T5's own objective, offline.

Span corruption (Raffel et al., 2020, section 3.1.4): 15% of a chunk's tokens (the noise
density), in spans of mean length 3, are dropped; each span is replaced in the input by one
sentinel, and the target lists each sentinel followed by the tokens it hid, then a last sentinel:

    input:  Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
    target: <extra_id_0> for inviting <extra_id_1> last <extra_id_2> </s>

The span lengths follow T5's ``random_spans_noise_mask``: ``round(0.15 L)`` noise tokens in
``round(noise / 3)`` spans; the noise and the kept tokens are each cut into that many non-empty
pieces uniformly at random, and the pieces alternate, kept first.

The text is unlabelled dialogue: the bundled TweetSumm dialogues of the train and valid splits,
formatted as the fine-tuning data module formats them (``user: ...`` / ``agent: ...``, mentions
and links removed). Never their summaries, never the test split. The token stream is cut into
chunks of ``chunk_length``; the last ``heldout_fraction`` of the chunks is kept out of training
and scores the model (its span-corruption loss, fixed masks) before and after.

The result is a transformers ``save_pretrained`` directory (weights stored in bfloat16 to keep it
a few MB; ``Seq2SeqFineTuner`` loads them in float32), with ``pretrain.json`` recording the
settings and the losses. ``experiments/assets/t5-tiny-dialogue`` is this command's output.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers

from experiments.data import BUNDLED_TWEETSUMM, format_dialogue, load_tokenizer, read_rows
from peftcore.files import write_atomically
from peftcore.t5 import t5_config

SHIPPED = Path(__file__).parent / "assets" / "t5-tiny-dialogue"


def span_lengths(num_items: int, num_segments: int, generator: torch.Generator) -> list[int]:
    """``num_items`` cut into ``num_segments`` non-empty pieces, every cut equally likely."""
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1].sort().values + 1
    edges = [0, *cuts.tolist(), num_items]
    return [b - a for a, b in zip(edges, edges[1:])]


def noise_mask(
    length: int, generator: torch.Generator, density: float = 0.15, mean_span: float = 3.0
) -> list[bool]:
    """Which of ``length`` tokens are noise, in spans, as T5's random_spans_noise_mask chooses them."""
    num_noise = min(max(round(length * density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span), 1)
    noise, kept = (
        span_lengths(num_noise, num_spans, generator),
        span_lengths(length - num_noise, num_spans, generator),
    )
    mask: list[bool] = []
    for keep, drop in zip(kept, noise):
        mask += [False] * keep + [True] * drop
    return mask


def corrupt(
    tokens: list[int], mask: list[bool], sentinels: list[int], eos: int
) -> tuple[list[int], list[int]]:
    """(input ids, target ids): each noise span becomes the next sentinel in the input, and the
    target is each sentinel with the tokens it stands for, closed by one more sentinel."""
    inputs, targets, span = [], [], -1
    for i, (token, is_noise) in enumerate(zip(tokens, mask)):
        if is_noise:
            if i == 0 or not mask[i - 1]:
                span += 1
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(token)
        else:
            inputs.append(token)
    return inputs + [eos], targets + [sentinels[span + 1], eos]


def dialogue_chunks(
    tokenizer, chunk_length: int, splits: tuple[str, ...] = ("train", "valid")
) -> list[list[int]]:
    """The bundled dialogues (never summaries, never the test split) as one token stream, in chunks."""
    stream: list[int] = []
    for split in splits:
        for row in read_rows(BUNDLED_TWEETSUMM / f"{split}.jsonl"):
            text = format_dialogue(
                row["turns"], "speaker", "text", {"Customer": "user", "Agent": "agent"}, True
            )
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    return [stream[i : i + chunk_length] for i in range(0, len(stream) - chunk_length + 1, chunk_length)]


def batch_of(chunks: list[list[int]], generator: torch.Generator, sentinels: list[int], eos: int) -> dict:
    pairs = [corrupt(c, noise_mask(len(c), generator), sentinels, eos) for c in chunks]
    width_in, width_out = max(len(i) for i, _ in pairs), max(len(t) for _, t in pairs)
    return {
        "input_ids": torch.tensor([i + [0] * (width_in - len(i)) for i, _ in pairs]),
        "attention_mask": torch.tensor([[1] * len(i) + [0] * (width_in - len(i)) for i, _ in pairs]),
        "labels": torch.tensor([t + [-100] * (width_out - len(t)) for _, t in pairs]),
    }


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> float:
    model.eval()
    losses = [model(**b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def pretrain(
    output_dir: str = "runs/pretrain/t5-tiny-dialogue",
    shape: str = "t5-tiny",
    steps: int = 2500,
    batch_size: int = 32,
    chunk_length: int = 128,
    lr: float = 3e-3,
    warmup_steps: int = 200,
    weight_decay: float = 0.01,
    heldout_fraction: float = 0.05,
    log_every: int = 100,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Pretrain a T5 of ``shape`` with span corruption on the bundled dialogues; write a
    ``save_pretrained`` directory to ``output_dir`` (replaced whole when complete).

    Args:
        output_dir: where the model goes (``experiments/assets/t5-tiny-dialogue`` ships one).
        shape: ``t5-tiny`` | ``t5-small`` | ``t5-base`` (random init, then this training).
        steps: optimizer steps.
        batch_size: chunks per step.
        chunk_length: tokens per chunk before corruption.
        lr: peak AdamW learning rate (linear warm-up, then linear decay to 0).
        warmup_steps: steps of warm-up.
        weight_decay: AdamW weight decay.
        heldout_fraction: the share of chunks never trained on, for the held-out loss.
        log_every: print the running training loss every this many steps.
        seed: seeds the initialisation, the masks and the order.
        threads: torch CPU threads (None: torch's default).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = load_tokenizer("bundled")
    sentinels = [tokenizer.convert_tokens_to_ids(f"<extra_id_{k}>") for k in range(100)]
    chunks = dialogue_chunks(tokenizer, chunk_length)
    cut = max(1, int(len(chunks) * heldout_fraction))
    train, heldout = chunks[:-cut], chunks[-cut:]
    fixed = torch.Generator().manual_seed(seed + 1)  # the held-out masks are the same before and after
    heldout_batches = [
        batch_of(heldout[i : i + batch_size], fixed, sentinels, tokenizer.eos_token_id)
        for i in range(0, len(heldout), batch_size)
    ]

    config = t5_config(shape)
    config.dropout_rate = 0.0
    model = transformers.T5ForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup_steps, max(0.0, (steps - s) / max(1, steps - warmup_steps)))
    )
    losses = {"heldout_before": heldout_loss(model, heldout_batches), "train": []}
    print(
        f"{len(train)} training chunks of {chunk_length} tokens, {len(heldout)} held out; "
        f"held-out loss before: {losses['heldout_before']:.3f}"
    )
    started, running, order = (
        time.perf_counter(),
        [],
        torch.randperm(len(train), generator=generator).tolist(),
    )
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        loss = model(
            **batch_of([train[i] for i in picked], generator, sentinels, tokenizer.eos_token_id)
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses["train"].append([step + 1, round(sum(running) / len(running), 4)])
            print(f"step {step + 1}/{steps}: training loss {losses['train'][-1][1]:.3f}")
            running = []
    losses["heldout_after"] = heldout_loss(model, heldout_batches)
    print(f"held-out loss after: {losses['heldout_after']:.3f} ({time.perf_counter() - started:.0f} s)")
    record = {
        "command": "python -m experiments pretrain",
        "settings": dict(
            shape=shape,
            steps=steps,
            batch_size=batch_size,
            chunk_length=chunk_length,
            lr=lr,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            heldout_fraction=heldout_fraction,
            seed=seed,
            noise_density=0.15,
            mean_noise_span_length=3.0,
            text="TweetSumm train+valid dialogues",
        ),
        "losses": {k: round(v, 4) if isinstance(v, float) else v for k, v in losses.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    _save(model.to(torch.bfloat16), record, Path(output_dir))
    return record


def _save(model, record: dict, output: Path) -> None:
    """Write into a temporary directory beside ``output``, then swap it in: never half a model."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        staging.chmod(0o755)
        model.save_pretrained(staging)
        write_atomically(staging / "pretrain.json", json.dumps(record, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {output}")
