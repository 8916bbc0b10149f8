"""Soft-prompt tuning (Lester et al., 2021): learned embeddings prepended to the encoder's input.

    encoder input:  [p_1 ... p_n ; E(x_1) ... E(x_L)]        P = (p_1 ... p_n): (n, d_model), trained
    attention mask: [1 ... 1 ; mask(x)]                        (the decoder's cross-attention too)

Only ``P`` trains; the model, the labels and the decoder's inputs are unchanged. Inits of ``P``:
``random`` (N(0, 1), nn.Embedding's), ``vocab`` (the embeddings of n tokens drawn uniformly from
the vocabulary) or ``text`` (the embeddings of ``init_text``'s tokens, repeated or cut to n).

The prompt is an input transform, not a layer wrapper: ``install`` adds ``SoftPrompt`` to the
model (as ``model.peftcore_prompt``) and two forward pre-hooks. The encoder's hook prepends
``P`` to whatever the encoder embeds and widens its attention mask; the model's hook widens the
mask its decoder cross-attends with. So ``model(...)`` and ``model.generate(...)`` (greedy or beam
search: generate runs the encoder once, then the model step by step) work unchanged.

``P`` has the n rows the encoder uses; peft allocates 2n for encoder-decoder models (see
peftcore/peft_format/prompt.py), so peftcore's parameter count is half of peft's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftcore.config import fail, positive_int
from peftcore.contract import InputMethod, bound_arguments

__all__ = ["PromptTuning", "PromptTuningConfig", "SoftPrompt"]

PROMPT_INITS = ("random", "vocab", "text")
ATTRIBUTE = "peftcore_prompt"  # where install() puts the SoftPrompt on the model


@dataclass(frozen=True)
class PromptTuningConfig:
    """Soft-prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` learned embeddings
    prepended to the encoder input.

    Args:
        num_virtual_tokens: how many embeddings to learn.
        init: ``random`` | ``vocab`` (copies of random vocabulary embeddings) | ``text``
            (the embeddings of ``init_text``'s tokens, repeated or cut to length).
        init_text: the text for ``init="text"``.
        tokenizer: the tokenizer (hub name or local path) that turns ``init_text`` into tokens.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        positive_int(name, "num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in PROMPT_INITS:
            fail(name, "init", self.init, "one of " + " | ".join(PROMPT_INITS))
        if (self.init == "text") != bool(self.init_text):
            fail(name, "init_text", self.init_text, "a non-empty string exactly when init='text'")
        if (self.init == "text") != bool(self.tokenizer):  # only the text init tokenizes: never ignored
            fail(name, "tokenizer", self.tokenizer, "a tokenizer name or path exactly when init='text'")


class SoftPrompt(nn.Module):
    """The learned prompt ``embedding`` (n, d_model) and the hooks that put it before the input."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.config = config
        weight = word_embeddings.weight
        dtype = (
            torch.float64 if weight.dtype == torch.float64 else torch.float32
        )  # trains in float32, as peft
        self.embedding = nn.Parameter(
            torch.empty(config.num_virtual_tokens, weight.shape[1], device=weight.device, dtype=dtype)
        )
        self.word_embeddings = [word_embeddings]  # a list: the model owns it, not this module
        self.disabled = False
        self.handles: list = []

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"embedding": self.embedding}

    @torch.no_grad()
    def initialise(self) -> None:
        n, embeddings = self.num_virtual_tokens, self.word_embeddings[0]
        if self.config.init == "random":
            nn.init.normal_(self.embedding)
            return
        if self.config.init == "vocab":
            ids = torch.randint(0, embeddings.num_embeddings, (n,), device=self.embedding.device)
        else:
            ids = torch.tensor(_text_ids(self.config, n), device=self.embedding.device)
        self.embedding.copy_(embeddings(ids).detach())

    # --- the hooks --------------------------------------------------------------------------

    def before_encoder(self, encoder: nn.Module, args: tuple, kwargs: dict):
        """Prepend the prompt to the encoder's input embeddings and widen its mask."""
        if self.disabled:
            return None
        kwargs = bound_arguments(encoder, args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = encoder.embed_tokens(kwargs["input_ids"])
        batch, length = embeds.shape[:2]
        prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs.update(input_ids=None, inputs_embeds=torch.cat([prompt, embeds], dim=1))
        kwargs["attention_mask"] = self._widened(kwargs.get("attention_mask"), length, batch, embeds.device)
        return (), kwargs

    def before_model(self, model: nn.Module, args: tuple, kwargs: dict):
        """Widen the mask the model passes to its encoder and its decoder's cross-attention."""
        if self.disabled or (args == () and kwargs.get("attention_mask") is None):
            return None
        kwargs = bound_arguments(model, args, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is None:
            return (), kwargs
        encoded = kwargs.get("encoder_outputs")
        if encoded is not None:  # generation: the encoder ran (with the prompt) before this step
            length = encoded[0].shape[1] - self.num_virtual_tokens
        else:
            inputs = (
                kwargs.get("input_ids")
                if kwargs.get("input_ids") is not None
                else kwargs.get("inputs_embeds")
            )
            length = inputs.shape[1]
        kwargs["attention_mask"] = self._widened(mask, length, mask.shape[0], mask.device)
        return (), kwargs

    def _widened(
        self, mask: torch.Tensor | None, length: int, batch: int, device: torch.device
    ) -> torch.Tensor:
        """A mask over prompt + input: ones for the prompt; a mask already that wide stays."""
        n = self.num_virtual_tokens
        if mask is None:
            return torch.ones(batch, n + length, dtype=torch.long, device=device)
        if mask.shape[1] == n + length:
            return mask
        if mask.shape[1] != length:
            raise ValueError(f"attention_mask has {mask.shape[1]} positions for an input of {length}")
        return torch.cat([torch.ones(batch, n, dtype=mask.dtype, device=mask.device), mask], dim=1)


def _text_ids(config: PromptTuningConfig, n: int) -> list[int]:
    """``init_text``'s token ids (special tokens included, as peft takes them), repeated or cut to n."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(config.tokenizer)(config.init_text)["input_ids"]
    return (ids * math.ceil(n / len(ids)))[:n]


class PromptTuning(InputMethod):
    """Prompt tuning as a method: one SoftPrompt for the model, put before the encoder's input by hooks."""

    config = PromptTuningConfig
    layer = SoftPrompt
    attribute = ATTRIBUTE
    identity_at_init = False  # a prompt changes the input from the start
    not_a_weight = "a soft prompt is an input, not a weight"

    def install(self, model: nn.Module, config: PromptTuningConfig, initialise: bool = True) -> SoftPrompt:
        """Add the soft prompt to an encoder-decoder ``model``; only the prompt trains."""
        encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
        if encoder is None or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(
                f"prompt tuning here prepends to an encoder's input; {type(model).__name__} has no encoder"
            )
        prompt = SoftPrompt(config, model.get_input_embeddings())
        if initialise:
            prompt.initialise()
        setattr(model, self.attribute, prompt)
        prompt.handles = [
            encoder.register_forward_pre_hook(prompt.before_encoder, with_kwargs=True),
            model.register_forward_pre_hook(prompt.before_model, with_kwargs=True),
        ]
        return prompt

    def differs(self, prompt: SoftPrompt, name: str, config: PromptTuningConfig) -> str | None:
        if prompt.num_virtual_tokens != config.num_virtual_tokens:
            return f"the model's prompt has {prompt.num_virtual_tokens} tokens, the file's {config.num_virtual_tokens}"
        return None
