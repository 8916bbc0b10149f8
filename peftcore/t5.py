"""T5's shapes, for building models with random weights offline; T5's defaults (peft's targets,
the modules kept in full precision, the task prefix) are its entry in ``peftcore.families``.

Module names inside a T5 block (transformers):
  attention  ``SelfAttention`` / ``EncDecAttention`` with ``q k v o``
  feed-forward ``DenseReluDense`` with ``wi wo`` (T5) or ``wi_0 wi_1 wo`` (gated, T5 v1.1 / flan-t5)
"""

from __future__ import annotations

from transformers import T5Config

# Shapes of the public checkpoints, for building models with random weights offline.
SHAPES: dict[str, dict[str, int]] = {
    "t5-tiny": dict(d_model=64, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16),
    "t5-small": dict(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64),
    "t5-base": dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64),
}


def t5_config(shape: str = "t5-small", gated: bool = False, vocab_size: int = 32128) -> T5Config:
    """A T5Config of one of the public shapes (``t5-tiny`` | ``t5-small`` | ``t5-base``).

    ``gated=True`` gives the T5 v1.1 / flan-t5 feed-forward (``wi_0``, ``wi_1``, gelu).
    transformers 5's ``T5Config()`` sets no ``decoder_start_token_id``; T5 uses the pad id 0.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown T5 shape {shape!r}; known shapes: {sorted(SHAPES)}")
    return T5Config(
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **SHAPES[shape],
    )
