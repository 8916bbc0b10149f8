"""The data module's options, checked when it is made (nothing read): a bad one is a ValueError
naming it. ``summary_field`` may name fields per split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.data.reading import VALIDATION_ALIASES
from experiments.data.tokenizer import tokenizer_path

ROLES = ("train", "val", "test")
# The keys of a per-split summary_field (besides the split names train_split/val_split/test_split set).
_ROLE_KEYS = {"train": "train", "test": "test", **{alias: "val" for alias in VALIDATION_ALIASES}}


def check_count(name: str, value: Any, minimum: int = 1, none_means: str | None = None) -> None:
    """Refuse anything but an integer >= ``minimum`` (or None, when ``none_means`` says what it means)."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        allowed += f" (or null for {none_means})" if none_means is not None else ""
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_name(name: str, value: Any, none_means: str | None = None) -> None:
    """Refuse anything but a non-empty string (or None, when ``none_means`` says what it means)."""
    if value is None and none_means is not None:
        return
    if not isinstance(value, str) or not value:
        allowed = "a non-empty string" + (f" (or null for {none_means})" if none_means is not None else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _field_names(value: Any, option: str) -> tuple[str, ...]:
    fields = (value,) if isinstance(value, str) else value
    if (
        not isinstance(fields, (list, tuple))
        or not fields
        or not all(isinstance(f, str) and f for f in fields)
    ):
        raise ValueError(f"{option} must be a field name or a non-empty list of them, got {value!r}")
    return tuple(fields)


def summary_fields_per_role(summary_field: Any, splits: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """``{"train" | "val" | "test": fields}``: the same field(s) for every split, or one entry per split.

    A mapping's key is ``train``, ``test``, a name of the validation split (``valid``,
    ``validation``, ``val``, ``dev``) or a split's configured name (``splits``: role -> name);
    it must give all three splits, each once.
    """
    if not isinstance(summary_field, dict):
        fields = _field_names(summary_field, "summary_field")
        return {role: fields for role in ROLES}
    keys: dict[str, str] = {}  # role -> the key that gave it
    per_role: dict[str, tuple[str, ...]] = {}
    for key, value in summary_field.items():
        role = _ROLE_KEYS.get(key) or next((r for r, name in splits.items() if name == key), None)
        if role is None:
            raise ValueError(
                f"summary_field has the key {key!r}, which names no split; the keys are train, valid "
                f"(or validation, val, dev), test, or the split names set ({sorted(splits.values())})"
            )
        if role in keys:
            raise ValueError(
                f"summary_field names the {splits[role]!r} split twice, as {keys[role]!r} and {key!r}"
            )
        keys[role], per_role[role] = key, _field_names(value, f"summary_field[{key!r}]")
    missing = [splits[role] for role in ROLES if role not in per_role]
    if missing:
        raise ValueError(
            f"summary_field has no entry for the split(s) {missing}; a per-split summary_field names "
            "the field(s) of every split, e.g. {train: summary, valid: summary, "
            "test: [summary1, summary2, summary3]}"
        )
    return per_role


def check_options(options: dict[str, Any]) -> None:
    """The data module's options as given to ``__init__``: a bad one is a ValueError naming it."""
    for name in ("batch_size", "max_source_length", "max_target_length"):
        check_count(name, options[name])
    check_count("eval_batch_size", options["eval_batch_size"], none_means="batch_size")
    for name in ("limit_train", "limit_val", "limit_test"):
        check_count(name, options[name], none_means="every dialogue")
    check_count("num_workers", options["num_workers"], minimum=0)
    if isinstance(options["seed"], bool) or not isinstance(options["seed"], int):
        raise ValueError(f"seed must be an integer, got {options['seed']!r}")
    for name in (
        "dataset",
        "train_split",
        "val_split",
        "test_split",
        "dialogue_field",
        "speaker_key",
        "text_key",
    ):
        check_name(name, options[name])
    check_name("tokenizer", options["tokenizer"], none_means="the model's")
    check_name("id_field", options["id_field"], none_means="made-up ids")
    for name in ("strip_mentions_and_links", "group_by_length"):
        if not isinstance(options[name], bool):
            raise ValueError(f"{name} must be true or false, got {options[name]!r}")
    if options["prefix"] is not None and not isinstance(options["prefix"], str):
        raise ValueError(
            f'prefix must be a string ("" for none), or null for the model\'s, got {options["prefix"]!r}'
        )
    if options["target_summaries"] not in ("first", "all"):
        raise ValueError(f"target_summaries must be 'first' or 'all', got {options['target_summaries']!r}")
    renames = options["rename_speakers"]
    if renames is not None and not (
        isinstance(renames, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in renames.items())
    ):
        raise ValueError(
            f"rename_speakers must map speaker names to names ({{}} keeps them), got {renames!r}"
        )
    files = options["data_files"]
    if files is not None and not (
        isinstance(files, dict)
        and all(isinstance(k, str) and k and isinstance(v, (str, Path)) and str(v) for k, v in files.items())
    ):
        raise ValueError(
            f"data_files must map split names to file paths, e.g. {{train: a.jsonl, valid: b.jsonl}}, "
            f"got {files!r}"
        )
    if options["tokenizer"] is not None:
        tokenizer_path(options["tokenizer"])  # an unknown bundled name fails now; nothing is loaded
