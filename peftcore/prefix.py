"""Prefix tuning (Li & Liang, 2021): learned keys and values that attention layers attend to
before the input's own, placed in an encoder-decoder model as peft places them.

The prefix is a table ``E`` of ``P = num_virtual_tokens`` rows of ``2 L D`` numbers (``L`` the
encoder's layer count, ``D = d_model``), learned directly or, with ``prefix_projection``, through
a two-layer MLP of width ``h = encoder_hidden_size``::

    E = e                                        e: (P, 2 L D)
    E = W2 tanh(W1 e + b1) + b2                  e: (P, D), W1: (h, D), W2: (2 L D, h)

Each row is cut into ``2L`` chunks of ``H`` heads x ``D / H`` (chunk ``c`` is columns ``cD`` to
``(c + 1)D``). Decoder self-attention layer ``j`` prepends chunk ``4j mod 2L`` to its keys and
chunk ``4j + 1 mod 2L`` to its values::

    attention_j(x) = softmax(q [K_j ; k(x)]^T + bias) [V_j ; v(x)]

T5's relative position bias counts the prefix as positions 0 .. P-1 and the decoder's tokens from
P on. That is peft's placement (releases 0.17 to 0.21): it builds a cache of four chunks per layer
from the table repeated twice, hands T5 the self-attention half and discards the cross-attention
half, so the encoder and the cross-attention get no prefix. peftcore computes exactly that, so
peft's files load with peft's logits. It has consequences peft does not say: with an even ``L``
(t5-base's 12), chunks ``4j + 2`` and ``4j + 3`` are never read (half of the table trains
nothing) and decoder layers ``j`` and ``j + L/2`` share one prefix. (The paper gives every layer
of both stacks its own.)

The prefix is an input transform: ``install`` adds ``PrefixEncoder`` to the model (as
``model.peftcore_prefix``) and a forward pre-hook on the model that gives each forward a fresh
cache holding the prefix (T5 grows the cache it is given) and widens a decoder attention mask by
P ones. ``generate`` needs nothing else: at its first step the hook writes the prefix into the
generation's own (empty) cache, which then carries it through every step and through beam
search's reordering. (peft 0.21's ``generate`` with transformers 5 passes its prefix under the
deprecated ``past_key_values`` name next to the generation's ``cache``, and transformers keeps
the latter: its generated tokens are the base model's.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from peftcore.config import fail, positive_int
from peftcore.contract import InputMethod, bound_arguments

__all__ = ["PrefixEncoder", "PrefixTuning", "PrefixTuningConfig"]

PREFIX_INITS = ("random", "zero")
ATTRIBUTE = "peftcore_prefix"  # where install() puts the PrefixEncoder on the model


@dataclass(frozen=True)
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang, 2021) as peft places it in an encoder-decoder model.

    Args:
        num_virtual_tokens: the prefix length P.
        prefix_projection: learn the prefix through an MLP (D -> encoder_hidden_size -> 2 L D, tanh)
            instead of directly.
        encoder_hidden_size: the MLP's width; None means d_model (peft's default).
        init: ``random`` (nn.Embedding's N(0, 1) and nn.Linear's defaults) | ``zero`` (the table,
            or the MLP's last layer, zero: peft's ``init_weights="zero"``; not the identity in
            T5, whose attention still gives zero keys weight).
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "random"

    def __post_init__(self) -> None:
        name = type(self).__name__
        positive_int(name, "num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.prefix_projection, bool):
            fail(name, "prefix_projection", self.prefix_projection, "true or false")
        if self.encoder_hidden_size is not None:
            positive_int(name, "encoder_hidden_size", self.encoder_hidden_size)
            if not self.prefix_projection:
                fail(
                    name,
                    "encoder_hidden_size",
                    self.encoder_hidden_size,
                    "None unless prefix_projection is true",
                )
        if self.init not in PREFIX_INITS:
            fail(name, "init", self.init, "one of " + " | ".join(PREFIX_INITS))


@dataclass(frozen=True)
class Shape:
    """What the prefix's size depends on: the encoder's layers (peft's ``num_layers``), the
    decoder's, d_model and the attention heads."""

    encoder_layers: int
    decoder_layers: int
    d_model: int
    heads: int

    @classmethod
    def of(cls, model: nn.Module) -> Shape:
        config = getattr(model, "config", None)
        if (
            not getattr(config, "is_encoder_decoder", False)
            or getattr(config, "model_type", None) not in FAMILIES
        ):
            raise ValueError(
                f"prefix tuning here follows peft's placement in T5-family encoder-decoders ({sorted(FAMILIES)}); "
                f"{type(model).__name__} ({getattr(config, 'model_type', None)!r}) is not one"
            )
        shape = cls(config.num_layers, config.num_decoder_layers, config.d_model, config.num_heads)
        if shape.decoder_layers > shape.encoder_layers:
            raise ValueError(
                f"the decoder has {shape.decoder_layers} layers, the encoder {shape.encoder_layers}: peft sizes the "
                "prefix by the encoder's layers and has none for the decoder's extra ones"
            )
        if config.num_heads * config.d_kv != config.d_model:
            raise ValueError(
                f"num_heads x d_kv = {config.num_heads} x {config.d_kv} is not d_model = {config.d_model}: peft cuts "
                "the prefix into heads of d_model / num_heads, which this model's attention cannot take"
            )
        return shape

    @property
    def width(self) -> int:
        return 2 * self.encoder_layers * self.d_model


FAMILIES = ("t5", "mt5")  # T5's attention and cache layout (num_layers, num_heads, d_kv)


class PrefixEncoder(nn.Module):
    """The learned prefix (the table, or its MLP) and the hook that hands it to the decoder."""

    def __init__(self, config: PrefixTuningConfig, shape: Shape, device: torch.device | None = None) -> None:
        super().__init__()
        self.config, self.shape = config, shape
        rows = config.num_virtual_tokens
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or shape.d_model
            self.embedding = nn.Parameter(torch.empty(rows, shape.d_model, device=device))
            self.transform = nn.Sequential(
                nn.Linear(shape.d_model, hidden, device=device),
                nn.Tanh(),
                nn.Linear(hidden, shape.width, device=device),
            )
        else:
            self.embedding = nn.Parameter(torch.empty(rows, shape.width, device=device))
            self.transform = None
        self.disabled = False
        self.handles: list = []

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def adapter_params(self) -> dict[str, nn.Parameter]:
        params = {"embedding": self.embedding}
        if self.transform is not None:
            params.update({f"transform.{k}": p for k, p in self.transform.named_parameters()})
        return params

    @torch.no_grad()
    def initialise(self) -> None:
        nn.init.normal_(self.embedding)
        if self.transform is not None:
            for layer in (self.transform[0], self.transform[2]):
                layer.reset_parameters()
        if self.config.init == "zero":
            nn.init.zeros_(self.embedding if self.transform is None else self.transform[2].weight)
            if self.transform is not None:
                nn.init.zeros_(self.transform[2].bias)

    def table(self) -> torch.Tensor:
        """The (P, 2 L D) prefix: the learned table, or the MLP's output."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def key_values(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's (keys, values), (1, H, P, D / H), by peft's chunk rule."""
        s = self.shape
        chunks = self.table().to(dtype).view(self.num_virtual_tokens, 2 * s.encoder_layers, s.heads, -1)
        chunks = chunks.permute(1, 2, 0, 3)  # (2L, H, P, D / H)
        n = 2 * s.encoder_layers
        return [(chunks[4 * j % n][None], chunks[(4 * j + 1) % n][None]) for j in range(s.decoder_layers)]

    def fresh_cache(self, batch: int, dtype: torch.dtype) -> EncoderDecoderCache:
        own = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.key_values(dtype)]
        return EncoderDecoderCache(DynamicCache(own), DynamicCache())

    def fill(self, cache: EncoderDecoderCache, batch: int, dtype: torch.dtype) -> None:
        """Write the prefix into an empty cache (generation's, at its first step)."""
        for layer, (k, v) in enumerate(self.key_values(dtype)):
            cache.self_attention_cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)

    # --- the hook -----------------------------------------------------------------------------

    def before_model(self, model: nn.Module, args: tuple, kwargs: dict):
        """Give the decoder the prefix: a fresh cache, or generation's empty one filled."""
        if self.disabled:
            return None
        kwargs = bound_arguments(model, args, kwargs)
        if kwargs.get("past_key_values") is not None:  # transformers' deprecated name for cache
            kwargs["cache"] = kwargs.pop("past_key_values")
        checkpointing = getattr(
            model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False)
        )
        if model.training and checkpointing:
            raise ValueError(
                "prefix tuning with gradient checkpointing: transformers drops the cache (which holds the prefix) "
                "inside checkpointed T5 blocks, as peft refuses it too; turn gradient checkpointing off"
            )
        batch = _decoder_batch(kwargs)
        dtype = model.get_input_embeddings().weight.dtype
        cache = kwargs.get("cache")
        if kwargs.get("use_cache") is False:  # no cache kept between steps: the prefix afresh every time
            cache = None
        if cache is None:
            kwargs["cache"] = self.fresh_cache(batch, dtype)
        elif isinstance(cache, EncoderDecoderCache) and cache.get_seq_length() == 0:
            self.fill(cache, batch, dtype)
        elif not isinstance(cache, EncoderDecoderCache):
            raise TypeError(f"prefix tuning needs an EncoderDecoderCache, got {type(cache).__name__}")
        mask = kwargs.get("decoder_attention_mask")
        if mask is not None:
            ones = torch.ones(mask.shape[0], self.num_virtual_tokens, dtype=mask.dtype, device=mask.device)
            kwargs["decoder_attention_mask"] = torch.cat([ones, mask], dim=1)
        return (), kwargs


def _decoder_batch(kwargs: dict) -> int:
    for key in ("decoder_input_ids", "decoder_inputs_embeds", "labels", "input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    encoded = kwargs.get("encoder_outputs")
    if encoded is not None:
        return encoded[0].shape[0]
    raise ValueError("prefix tuning could not tell the batch size: no decoder inputs, labels or inputs given")


class PrefixTuning(InputMethod):
    """Prefix tuning as a method: one PrefixEncoder for the model, handed to the decoder by a hook."""

    config = PrefixTuningConfig
    layer = PrefixEncoder
    attribute = ATTRIBUTE
    identity_at_init = False  # a prefix changes attention from the start (a zero one too, in T5)
    not_a_weight = "a prefix is attention's extra keys and values, not a weight"
    supports_gradient_checkpointing = False  # transformers drops the cache inside checkpointed blocks

    def install(self, model: nn.Module, config: PrefixTuningConfig, initialise: bool = True) -> PrefixEncoder:
        """Add the prefix to a T5-family ``model``; only the prefix trains."""
        shape = Shape.of(model)
        prefix = PrefixEncoder(config, shape, device=model.get_input_embeddings().weight.device)
        if initialise:
            prefix.initialise()
        setattr(model, self.attribute, prefix)
        prefix.handles = [model.register_forward_pre_hook(prefix.before_model, with_kwargs=True)]
        return prefix

    def differs(self, prefix: PrefixEncoder, name: str, config: PrefixTuningConfig) -> str | None:
        if prefix.num_virtual_tokens != config.num_virtual_tokens:
            return f"the model's prefix has {prefix.num_virtual_tokens} tokens, the file's {config.num_virtual_tokens}"
        if prefix.transform is not None and not config.prefix_projection:
            return "the model's prefix is learned through an MLP; the file holds the table it computes"
        return None
