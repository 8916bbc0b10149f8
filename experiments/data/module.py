"""``DialogSummaryDataModule``: the Lightning data module that ties reading, preprocessing,
tokenizing, batching and sampling together."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import PreTrainedTokenizerBase

from experiments.data.batching import Collator, Example
from experiments.data.errors import DataError, describe
from experiments.data.options import ROLES, check_options, summary_fields_per_role
from experiments.data.preprocessing import format_dialogue, references_in
from experiments.data.reading import (
    BUNDLED_TWEETSUMM,
    FILE_FORMATS,
    Row,
    load_hub_dataset,
    read_located_rows,
    resolve_split,
    split_files,
)
from experiments.data.sampling import EpochShuffle, LengthGroupedBatchSampler, ResumableDataLoader
from experiments.data.tokenizer import BUNDLED, load_tokenizer

_STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def _hub_rows(split: Any, name: str, dataset: str) -> list[Row]:
    """A hub split's rows, placed by row index (``dataset[split][i]``)."""
    return [
        Row(fields, f"row index {i} of split {name!r} of hub data set {dataset!r}")
        for i, fields in enumerate(split.to_list())
    ]


class DialogSummaryDataModule(L.LightningDataModule):
    """Dialogue -> summary batches for T5 from TweetSumm, a local file/directory, or the HF hub.

    Batches are dicts: ``input_ids``, ``attention_mask``, ``labels`` (LongTensors, padded to
    the longest in the batch; labels with -100), ``ids`` (list[str]), ``sources`` (the
    preprocessed dialogues, without the prefix), ``references`` (list[list[str]], every
    reference summary of each example) and ``padding_fraction`` (float: pad tokens / all
    tokens over inputs and labels). ``predict_dataloader`` serves the test split.

    The options are checked here, without reading anything (a bad one is a ValueError
    naming it); the data are read and checked by ``setup``: a missing file, split or field,
    a row that cannot be parsed, an empty dialogue, and a summary that is missing, empty or
    not text are a `DataError` naming the file, the line (the row index for Parquet and hub
    data sets) and the field.

    Args:
        dataset: "tweetsumm" for the bundled copy; a local .jsonl/.json/.csv/.parquet file
            (used for every split) or a directory of ``<split>.<ext>`` files; anything else
            is a Hugging Face hub name for ``datasets.load_dataset`` (e.g. "samsum").
        data_files: Explicit ``{split: path}``; takes precedence over ``dataset``.
        train_split: Name of the training split.
        val_split: Name of the validation split ("valid" and "validation" find each other).
        test_split: Name of the test split (also used by predict).
        dialogue_field: Field holding the dialogue: one string, a list of strings, or a list
            of turn dicts.
        summary_field: Field holding the reference summaries (a string, or a non-empty list of
            strings), or a list of fields each holding some (``[summary1, summary2]``): every
            reference counts for multi-reference ROUGE; the first is the label. Every field
            named must be in every row of the split. Or one entry per split, when the splits
            differ (DialogSum: ``{train: summary, valid: summary, test: [summary1, summary2,
            summary3]}``); the keys are train, valid (or validation, val, dev), test, or the
            names set by train_split/val_split/test_split, and every split needs one.
        id_field: Field holding the example id; ids "<split>-<row>" are made up when it is
            missing or None.
        speaker_key: Key of the speaker in a turn dict.
        text_key: Key of the text in a turn dict.
        rename_speakers: Speaker names to replace, e.g. Customer -> user; {} keeps them.
        strip_mentions_and_links: Remove @mentions and http(s) links, collapse whitespace.
        prefix: Text put before every dialogue (T5's task prefix "summarize: "); "" for none;
            None (the default): the model's, which the CLI sets from the model (its checkpoint's
            summarization prefix, else its family's: T5's "summarize: ", none for BART, Pegasus,
            mT5...); a data module made alone then uses none.
        max_source_length: Truncate prefix + dialogue to this many tokens.
        max_target_length: Truncate summaries to this many tokens.
        target_summaries: Training targets: "first" reference only, or "all" (one example
            per reference). Validation/test always keep all references for ROUGE, and use the
            first as the label for the loss.
        tokenizer: "bundled" (the T5 SentencePiece tokenizer shipped here, found from any
            working directory; also "bundled:t5-tokenizer"), a hub name or a path; None (the
            default): the model's, which the CLI sets (the model directory's own tokenizer, else
            the bundled one for T5, else the model's hub name); a data module made alone then
            uses the bundled one.
        batch_size: Training batch size.
        eval_batch_size: Validation/test/predict batch size; None means batch_size.
        num_workers: DataLoader worker processes (0: load in the main process).
        group_by_length: Training batches of similar source length (shuffled buckets);
            validation/test batches in decreasing length order (predict keeps file order).
        limit_train: Use only the first N training dialogues (None: all).
        limit_val: Use only the first N validation dialogues (None: all).
        limit_test: Use only the first N test dialogues (None: all).
        seed: Seed of the training order (the same per epoch on every run).
    """

    def __init__(
        self,
        dataset: str = "tweetsumm",
        data_files: dict[str, str] | None = None,
        train_split: str = "train",
        val_split: str = "valid",
        test_split: str = "test",
        dialogue_field: str = "turns",
        summary_field: str | list[str] | dict[str, str | list[str]] = "summaries",
        id_field: str | None = "id",
        speaker_key: str = "speaker",
        text_key: str = "text",
        rename_speakers: dict[str, str] = {"Customer": "user", "Agent": "agent"},  # noqa: B006 - copied below
        strip_mentions_and_links: bool = True,
        prefix: str | None = None,
        max_source_length: int = 512,
        max_target_length: int = 128,
        target_summaries: Literal["first", "all"] = "first",
        tokenizer: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        group_by_length: bool = True,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_options(locals())
        self.save_hyperparameters(logger=False)  # the fine-tuning module logs them with its own
        self.dataset, self.data_files = dataset, dict(data_files) if data_files else None
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.dialogue_field, self.id_field = dialogue_field, id_field
        self.summary_fields = summary_fields_per_role(summary_field, self.splits)
        self.speaker_key, self.text_key = speaker_key, text_key
        self.rename_speakers = dict(rename_speakers or {})
        self.strip_mentions_and_links, self.prefix = strip_mentions_and_links, prefix or ""
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.target_summaries = target_summaries
        self.tokenizer_name = tokenizer or BUNDLED
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.group_by_length, self.seed = num_workers, group_by_length, seed
        self.examples: dict[str, list[Example]] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._saved_place: dict[str, int] | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer named by the ``tokenizer`` argument, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    # -- sources

    def _is_hub(self) -> bool:
        """Whether ``dataset`` is a hub name: not tweetsumm, no existing path, and no name of a file or a path."""
        looks_local = self.dataset.lower().endswith(FILE_FORMATS) or self.dataset.startswith(("/", ".", "~"))
        return not (
            self.data_files
            or self.dataset == "tweetsumm"
            or looks_local
            or Path(self.dataset).expanduser().exists()
        )

    def _open_source(self) -> tuple[str, dict[str, Callable[[], list[Row]]]]:
        """A description of the source and, per split name, a function that reads its rows."""
        if self.data_files:
            return "data_files", {
                s: partial(read_located_rows, Path(p).expanduser()) for s, p in self.data_files.items()
            }
        if self._is_hub():
            data = load_hub_dataset(self.dataset)
            return f"hub data set {self.dataset!r}", {
                s: partial(_hub_rows, data[s], s, self.dataset) for s in data
            }
        path = BUNDLED_TWEETSUMM if self.dataset == "tweetsumm" else Path(self.dataset).expanduser()
        if not path.exists():
            raise DataError(
                f"dataset {self.dataset!r}: no such file or directory (under {Path.cwd()}); give an "
                "existing file or directory, 'tweetsumm', or a hub name"
            )
        if path.is_file():
            return str(path), {s: partial(read_located_rows, path) for s in self.splits.values()}
        files = split_files(path)
        if not files:
            raise DataError(
                f"{path} holds no <split>{{{','.join(FILE_FORMATS)}}} files, e.g. train.jsonl, "
                "valid.jsonl and test.jsonl"
            )
        return str(path), {s: partial(read_located_rows, f) for s, f in files.items()}

    def prepare_data(self) -> None:
        """Download a hub data set once (rank 0); setup() then reads it from the cache."""
        if self._is_hub():
            load_hub_dataset(self.dataset)

    def setup(self, stage: str | None = None) -> None:
        """Read, check, preprocess and tokenize the splits ``stage`` needs (all when None)."""
        roles = [r for r in _STAGE_ROLES.get(stage, ROLES) if r not in self.examples]
        if not roles:
            return
        source, splits = self._open_source()
        # Resolve every name before reading anything: a typo fails at once.
        names = {role: resolve_split(self.splits[role], list(splits), source) for role in roles}
        for role in roles:
            rows = splits[names[role]]()[: self.limits[role]]
            self.examples[role] = self._make_examples(rows, role, f"split {names[role]!r} of {source}")

    def _make_examples(self, rows: list[Row], role: str, where: str) -> list[Example]:
        """Check and preprocess the rows of one split (``role``) and tokenize them."""
        if not rows:
            raise DataError(f"{where} is empty")
        split = self.splits[role]
        ids, sources, references = [], [], []
        for i, row in enumerate(rows):
            self._check_fields(row, role, where)
            has_id = self.id_field is not None and row.fields.get(self.id_field) is not None
            ids.append(str(row.fields[self.id_field]) if has_id else f"{split}-{i}")
            place = f"{row.where} (id {ids[-1]})"
            sources.append(self._source(row.fields, place))
            references.append(self._references(row.fields, role, place))

        # Which reference each example learns from: the first, or one example per reference.
        every = role == "train" and self.target_summaries == "all"
        pairs = [(i, ref) for i, refs in enumerate(references) for ref in (refs if every else refs[:1])]
        tok = self.tokenizer
        input_ids = tok(
            [self.prefix + s for s in sources], max_length=self.max_source_length, truncation=True
        )
        labels = tok(
            text_target=[ref for _, ref in pairs], max_length=self.max_target_length, truncation=True
        )
        input_ids, labels = input_ids["input_ids"], labels["input_ids"]
        return [
            Example(ids[i], sources[i], references[i], input_ids[i], lab)
            for (i, _), lab in zip(pairs, labels)
        ]

    def _check_fields(self, row: Row, role: str, where: str) -> None:
        """Every field the split needs is in the row, or a DataError names the first missing one."""
        for field in (self.dialogue_field, *self.summary_fields[role]):
            if field not in row.fields:
                hint = (
                    "; dialogue_field names the dialogue's field"
                    if field == self.dialogue_field
                    else "; summary_field names the summaries' field(s), one entry per split if they differ: "
                    "{train: summary, valid: summary, test: [summary1, summary2]}"
                )
                raise DataError(
                    f"{row.where}: field {field!r} not found (in {where}); the fields that exist are "
                    f"{sorted(row.fields)}{hint}"
                )

    def _source(self, fields: dict[str, Any], place: str) -> str:
        """The row's dialogue, formatted; an empty one (or one that cleaning empties) is refused."""
        dialogue = fields[self.dialogue_field]
        try:
            source = format_dialogue(
                dialogue, self.speaker_key, self.text_key, self.rename_speakers, self.strip_mentions_and_links
            )
        except DataError as err:
            raise DataError(f"{place}, field {self.dialogue_field!r}: {err}") from None
        if not source.strip():
            had_text = (
                self.strip_mentions_and_links
                and format_dialogue(
                    dialogue, self.speaker_key, self.text_key, strip_mentions_and_links=False
                ).strip()
            )
            cleaned = " once @mentions and links are removed" if had_text else ""
            raise DataError(
                f"{place}: the dialogue in field {self.dialogue_field!r} is empty{cleaned} "
                f"(it is {describe(dialogue)}); fill it in or remove the row"
            )
        return source

    def _references(self, fields: dict[str, Any], role: str, place: str) -> list[str]:
        """Every reference summary of the row, from each of the split's summary fields in order."""
        try:
            return [ref for field in self.summary_fields[role] for ref in references_in(fields[field], field)]
        except DataError as err:
            raise DataError(f"{place}: {err}") from None

    # -- loaders

    def _loader(self, examples: list[Example], resumable: bool = False, **kwargs: Any) -> DataLoader:
        return (ResumableDataLoader if resumable else DataLoader)(
            examples,
            collate_fn=Collator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        examples = self.examples["train"]
        place = self.take_saved_place() or {"epoch": 0, "batches_done": 0}
        epoch, done = place["epoch"], place["batches_done"]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Shard ourselves so this is right under Trainer(use_distributed_sampler=False) too;
            # with the default True, Lightning swaps in its own equivalent DistributedSampler.
            order: Sampler[int] = DistributedSampler(examples, shuffle=True, seed=self.seed)
            order.set_epoch(epoch)
        else:
            order = EpochShuffle(len(examples), seed=self.seed, epoch=epoch)
        if done >= -(-len(order) // self.batch_size):  # this process's batches: an epoch's end skips nothing
            done = 0
        if not self.group_by_length:
            if done and not isinstance(order, EpochShuffle):
                raise ValueError(
                    f"cannot resume inside an epoch with a {type(order).__name__}: it cannot start after the "
                    f"{done} batches already done. Resume from an epoch-end checkpoint, or use group_by_length: true"
                )
            if done:
                order.skip = done * self.batch_size
            return self._loader(examples, resumable=True, batch_size=self.batch_size, sampler=order)
        lengths = [len(e.input_ids) for e in examples]
        batches = LengthGroupedBatchSampler(
            order, self.batch_size, drop_last=False, lengths=lengths, seed=self.seed, skip=done
        )
        return self._loader(examples, resumable=True, batch_sampler=batches)

    # -- the place inside an epoch, saved with checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Saved with each checkpoint: how far training got in the current epoch."""
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        return {"train_place": loader.state_dict()} if isinstance(loader, ResumableDataLoader) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run's saved place: its training loader starts after the batches done."""
        self._saved_place = state.get("train_place")

    def take_saved_place(self) -> dict[str, int] | None:
        """A resumed run's saved place (``epoch``, ``batches_done``) not yet applied to a training
        loader, once; else None. Strategies that restore after setup (ModelParallelStrategy)
        restore it after the loader is made: the TrainingPlace callback applies it then."""
        place, self._saved_place = self._saved_place, None
        return place

    def _eval_loader(self, role: str, sort: bool) -> DataLoader:
        examples = self.examples[role]
        order = None
        if sort and self.group_by_length:
            # Longest first: similar lengths per batch (faster generation), and any OOM shows at once.
            order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
        return self._loader(examples, batch_size=self.eval_batch_size, sampler=order)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", sort=True)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", sort=True)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test", sort=False)
