"""``modules_to_save``: a module trained in full next to the adapter, as peft does it.

The named module is kept frozen as ``original`` and forward runs a trainable deep copy,
``trained``. The copy is what the adapter file carries. Because it is a copy, training it changes
no other module, even when the original shares its weight: transformers ties T5's ``lm_head``,
``shared`` and both ``embed_tokens`` to one Parameter, and a trained ``lm_head`` copy leaves the
input embeddings as they were (peft's ``ModulesToSaveWrapper`` has the same semantics).
"""

from __future__ import annotations

import copy

from torch import Tensor, nn


class TrainedCopy(nn.Module):
    """Runs ``trained`` (a trainable copy of ``original``), or ``original`` while ``disabled``."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.trained = copy.deepcopy(original)
        self.original.requires_grad_(False)
        self.trained.requires_grad_(True)
        self.disabled = False
        # what the copy's state dict holds, taken now: under FSDP2 a state_dict() call reshards
        # the unit it runs in, so the adapter's save reads the copy by these names instead
        self.state_names = tuple(self.trained.state_dict().keys())

    def trained_state(self) -> dict[str, Tensor]:
        """The copy's state (``trained.state_dict(keep_vars=True)``'s tensors), read without
        ``state_dict()``: the live parameters and buffers, whole inside sharding.full_parameters."""
        trained = self.trained
        live = {
            **dict(trained.named_parameters(remove_duplicate=False)),
            **dict(trained.named_buffers(remove_duplicate=False)),
        }
        return {name: live[name] for name in self.state_names}

    def forward(self, *args, **kwargs):
        return (self.original if self.disabled else self.trained)(*args, **kwargs)

    def __getattr__(self, name: str):
        # Model code reads attributes of the module it called (embedding_dim, weight, ...): they
        # come from the copy that runs.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original", "trained"):
                raise
            return getattr(super().__getattr__("trained"), name)
