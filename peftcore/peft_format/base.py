"""One method's translation to and from peft's files: the base a method's translator subclasses.

A translator accounts for every field of peft's config class for the method (``implemented``,
``at_default``, ``inert``: see fields.py), reads and writes the method's fields of
``adapter_config.json``, and names the layer's tensors as peft's files name them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from peftcore.peft_format.fields import check_fields


class Format(ABC):
    """peft's format for one method; the defaults fit a method whose tensors peft names as we do."""

    peft_type: ClassVar[str]  # adapter_config.json's peft_type
    label: ClassVar[str]  # the method as error messages name it ("this LoRA adapter sets ...")
    # peft's names of the config's fields where they differ from ours (the CLI points peft users to ours).
    names: ClassVar[dict[str, str]] = {}
    implemented: ClassVar[tuple[str, ...]] = ()  # honoured exactly (or the value refused)
    at_default: ClassVar[
        dict[str, tuple[object, str]]
    ] = {}  # field -> (peft's default, what another value turns on)
    inert: ClassVar[dict[str, str]] = {}  # field -> why it has no effect on a saved adapter
    # peft's trainable parameter count over ours (peft may allocate tensors it never uses).
    trainable_factor: ClassVar[int] = 1

    def claims(self, data: dict) -> bool:
        """Whether ``adapter_config.json`` ``data`` is this method's."""
        return data.get("peft_type") == self.peft_type

    def check_fields(self, data: dict) -> None:
        check_fields(data, self.label, self.implemented, self.at_default, self.inert)

    @abstractmethod
    def config_from_peft(self, data: dict, model: nn.Module) -> object:
        """The config that computes what peft computes with ``data`` on ``model``, every field
        accounted for, or a ValueError naming the one that cannot be honoured."""
        ...

    @abstractmethod
    def config_to_peft(self, config: object, model: nn.Module) -> dict:
        """The method's own fields of adapter_config.json (the shared ones are written in __init__.py)."""
        ...

    def peft_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The layer's live tensors under peft's names (to load into)."""
        return dict(layer.adapter_params())

    def saved_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """What the file holds for the layer: usually the live tensors."""
        return self.peft_tensors(layer)

    def read_file_tensors(self, saved: dict[str, torch.Tensor], data: dict) -> dict[str, torch.Tensor]:
        """The file's tensors as the layers hold them: usually the file's as they are."""
        return saved
