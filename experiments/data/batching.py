"""Examples and the collator that pads them into batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    ``source`` is the preprocessed dialogue without the task prefix; ``labels`` tokenize one
    reference (for training) while ``references`` keeps every reference (for ROUGE).
    """

    id: str
    source: str
    references: list[str]
    input_ids: list[int]
    labels: list[int]


class Collator:
    """Pads a list of `Example` to the longest in the batch: inputs with pad, labels with -100.

    Args:
        pad_token_id: The tokenizer's pad id (0 for T5).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        n = len(examples)
        source_len = max(len(e.input_ids) for e in examples)
        target_len = max(len(e.labels) for e in examples)
        input_ids = torch.full((n, source_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, source_len), dtype=torch.long)
        labels = torch.full((n, target_len), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention_mask[i, : len(e.input_ids)] = 1
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        real_tokens = sum(len(e.input_ids) + len(e.labels) for e in examples)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "ids": [e.id for e in examples],
            "sources": [e.source for e in examples],
            "references": [list(e.references) for e in examples],
            "padding_fraction": 1.0 - real_tokens / (n * (source_len + target_len)),
        }
