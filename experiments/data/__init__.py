"""Dialogue-summarisation data for T5: read, preprocess, tokenize, batch.

The default source is the bundled copy of TweetSumm (``experiments/assets/tweetsumm``).
A dialogue becomes one line per turn, ``"user: ..."`` / ``"agent: ..."``, with @mentions
and links removed, prefixed with ``"summarize: "`` (the format of the Hugging Face copy
``Andyrasika/TweetSumm-tuned``). Every preprocessing step is a switch on the data module.

One module per step, in the order data flows:

- ``errors``: `DataError`, the one exception (it names the file, the line or row index and the field);
- ``reading``: local files (JSON Lines, JSON arrays, CSV, Parquet), split directories, hub data sets;
- ``tokenizer``: the ``tokenizer`` setting (``bundled``, a hub name or a path);
- ``preprocessing``: dialogues to ``"<speaker>: <text>"`` lines, reference summaries;
- ``batching``: `Example` and the padding `Collator`;
- ``sampling``: the per-epoch shuffle, length-grouped batches, resuming inside an epoch;
- ``options``: the data module's options, checked when it is made;
- ``module``: `DialogSummaryDataModule`, which ties them together.
"""

from experiments.data.batching import Collator, Example
from experiments.data.errors import DataError, describe
from experiments.data.module import DialogSummaryDataModule
from experiments.data.options import check_count, check_name, summary_fields_per_role
from experiments.data.preprocessing import clean_text, format_dialogue, references_in
from experiments.data.reading import (
    ASSETS,
    BUNDLED_TWEETSUMM,
    FILE_FORMATS,
    VALIDATION_ALIASES,
    Row,
    load_hub_dataset,
    read_located_rows,
    read_rows,
    resolve_split,
    split_files,
)
from experiments.data.sampling import (
    EpochShuffle,
    LengthGroupedBatchSampler,
    ResumableDataLoader,
    set_sampler_epoch,
    skip_batches,
)
from experiments.data.tokenizer import BUNDLED, BUNDLED_TOKENIZER, is_bundled, load_tokenizer, tokenizer_path

__all__ = [
    "ASSETS",
    "BUNDLED",
    "BUNDLED_TOKENIZER",
    "BUNDLED_TWEETSUMM",
    "FILE_FORMATS",
    "VALIDATION_ALIASES",
    "Collator",
    "DataError",
    "DialogSummaryDataModule",
    "EpochShuffle",
    "Example",
    "LengthGroupedBatchSampler",
    "ResumableDataLoader",
    "Row",
    "check_count",
    "check_name",
    "clean_text",
    "describe",
    "format_dialogue",
    "is_bundled",
    "load_hub_dataset",
    "load_tokenizer",
    "read_located_rows",
    "read_rows",
    "references_in",
    "resolve_split",
    "set_sampler_epoch",
    "skip_batches",
    "split_files",
    "summary_fields_per_role",
    "tokenizer_path",
]
