"""peft's ``adapter_config.json``, field by field: what every method's translation shares.

A method's translator (``Format``: ``lora.py``, ``ia3.py`` here) accounts for every field of peft's
config class of releases 0.17 to 0.21 in one of three ways, and ``check_fields`` enforces it:

    implemented   the translation reads the field and honours its value (or refuses the value)
    at default    accepted only at peft's default or an empty value; any other value is refused
                  by name, since peftcore does not implement what it turns on
    inert         accepted at any value because it has no effect on the saved model (e.g. the
                  settings of an init that only runs while training starts)

A field of a later peft release is accepted only while empty (None, false, "", [] or {}); a
value is refused by name, never dropped (peft drops unknown fields with a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from torch import nn

from peftcore import families
from peftcore.matching import select_targets
from peftcore.surgery import wrapped_layers
from peftcore.weights import is_transposed

# The peft release whose file format and matching rules peftcore follows when it writes.
PEFT_FORMAT_VERSION = "0.21.2"

# PeftConfig's fields: they describe the file, not what the adapter computes.
METADATA = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
)
# Never written by peft (LoraConfig.to_dict drops it); on load peft ignores it with a warning.
RUNTIME_ONLY = ("runtime_config",)


def is_empty(value: object) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def check_fields(
    data: Mapping[str, object],
    method: str,
    implemented: tuple[str, ...],
    at_default: Mapping[str, tuple[object, str]],
    inert: Mapping[str, str],
) -> None:
    """Refuse, by name and value, every field of ``data`` peftcore cannot honour.

    ``at_default`` maps a field to (peft's default, what a other value would turn on).
    """
    refused = []
    for key, value in data.items():
        if key in METADATA or key in RUNTIME_ONLY or key in implemented or key in inert:
            continue
        if key in at_default:
            default, feature = at_default[key]
            if value != default and not is_empty(value):
                refused.append(f"{key}={value!r} ({feature})")
        elif not is_empty(value):
            refused.append(f"{key}={value!r} (a field peftcore does not know: from a later peft release?)")
    if refused:
        raise ValueError(
            f"this {method} adapter sets {'; '.join(refused)}, which peftcore does not implement, so it cannot "
            "load the adapter exactly. Use peft for this adapter, or train one without these settings"
        )


def peft_version(data: Mapping[str, object]) -> tuple[int, int]:
    """(major, minor) of the peft release that wrote ``data``; (0, 17) when unrecorded (peft
    writes ``peft_version`` since 0.18)."""
    text = str(data.get("peft_version") or "0.17").partition("@")[0]
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:2]] + [0, 0]
    return parts[0], parts[1]


def default_targets(model: nn.Module, field: str, method: str) -> tuple[str, ...]:
    """peft's default modules (``field`` of the model family's entry in ``peftcore.families``) for
    a file that names none; refused by name for a family peft has no default for, as peft does."""
    targets = getattr(families.of(model), field)
    if targets is None:
        raise ValueError(
            f"the {method} adapter_config.json names no target_modules, and peft has no default for model type "
            f"{families.model_type(model)!r}: add target_modules to the file"
        )
    return targets


def modules_to_save_of(data: dict, model: nn.Module) -> tuple[str, ...]:
    """The file's ``modules_to_save``. peft lists both classification heads (``classifier`` and
    ``score``) in every SEQ_CLS file, whichever the model has: the one the model lacks is dropped,
    as peft passes it by."""
    names = tuple(data.get("modules_to_save") or ())
    if data.get("task_type") != "SEQ_CLS":
        return names
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    return tuple(name for name in names if name not in families.CLASSIFICATION_HEADS or name in leaves)


# --- fan_in_fan_out: peft's flag for a weight stored (in, out), set by the target's type ------------


def _target_kinds(model: nn.Module, config: object) -> tuple[int, int]:
    """(how many, how many not) of the layers ``config`` adapts on ``model`` are transformers'
    Conv1D: the adapted layers' bases when the model holds the adapter, else the layers it selects."""
    bases = [layer.base for _, layer in wrapped_layers(model)]
    if not bases:
        modules = dict(model.named_modules())
        with warnings.catch_warnings():  # what select_targets warns about, inject says once
            warnings.simplefilter("ignore")
            bases = [modules[name] for name in select_targets(model, config)]
    transposed = sum(is_transposed(base) for base in bases)
    return transposed, len(bases) - transposed


def fan_in_fan_out_to_peft(model: nn.Module, config: object) -> bool:
    """What peft writes as ``fan_in_fan_out``: true when the targets are transformers' Conv1D (GPT-2's),
    false for nn.Linear (and NF4Linear: a quantized Conv1D is stored (out, in), as bitsandbytes'
    Linear4bit). peft sets the flag target by target; with both kinds this writes true, and peft,
    reading the file, sets it back to false for the nn.Linear targets (with a warning)."""
    return _target_kinds(model, config)[0] > 0


def check_fan_in_fan_out(data: Mapping[str, object], model: nn.Module, config: object) -> None:
    """peft sets ``fan_in_fan_out`` by each target's type whatever the file says, warning when it
    differs; peftcore reads each base weight's layout from the layer (peftcore.weights), so the
    field changes nothing either, and it warns as peft does."""
    value = bool(data.get("fan_in_fan_out", False))
    transposed, plain = _target_kinds(model, config)
    if value and plain:
        what = "the targets are" if not transposed else f"{plain} targets are"
        warnings.warn(
            f"fan_in_fan_out is true but {what} nn.Linear: it is set to false, as peft does", stacklevel=4
        )
    if not value and transposed:
        what = "the targets are" if not plain else f"{transposed} targets are"
        warnings.warn(
            f"fan_in_fan_out is false but {what} transformers' Conv1D: it is set to true, as peft does",
            stacklevel=4,
        )
