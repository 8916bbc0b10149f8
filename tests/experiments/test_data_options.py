"""The data module's options, refused at construction; bundled tokenizers found from any directory."""

import pytest
from transformers import AutoTokenizer

import experiments.data.module as data_module
from experiments.data import (
    BUNDLED_TOKENIZER,
    DataError,
    DialogSummaryDataModule,
    load_tokenizer,
    tokenizer_path,
)


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("batch_size", 0, "a positive integer"),
        ("batch_size", -4, "a positive integer"),
        ("batch_size", 2.5, "a positive integer"),
        ("batch_size", True, "a positive integer"),
        ("batch_size", "8", "a positive integer"),
        ("eval_batch_size", 0, "a positive integer (or null for batch_size)"),
        ("max_source_length", -1, "a positive integer"),
        ("max_source_length", 0, "a positive integer"),
        ("max_target_length", 0, "a positive integer"),
        ("limit_train", 0, "a positive integer (or null for every dialogue)"),
        ("limit_train", -2, "a positive integer (or null for every dialogue)"),
        ("limit_val", 0, "a positive integer (or null for every dialogue)"),
        ("limit_test", 1.5, "a positive integer (or null for every dialogue)"),
        ("num_workers", -1, "an integer >= 0"),
        ("num_workers", 1.0, "an integer >= 0"),
        ("seed", 1.5, "an integer"),
        ("group_by_length", "yes", "true or false"),
        ("strip_mentions_and_links", 1, "true or false"),
        ("dialogue_field", "", "a non-empty string"),
        ("id_field", 3, "a non-empty string (or null for made-up ids)"),
        ("prefix", 5, 'a string ("" for none), or null for the model\'s'),
        ("target_summaries", "best", "'first' or 'all'"),
    ],
)
def test_a_bad_option_is_refused_at_construction_naming_it(name, value, allowed):
    with pytest.raises(ValueError) as err:
        DialogSummaryDataModule(**{name: value})
    assert str(err.value) == f"{name} must be {allowed}, got {value!r}"


def test_bad_mappings_are_refused_at_construction():
    with pytest.raises(
        ValueError,
        match=r"rename_speakers must map speaker names to names \(\{\} keeps them\), "
        r"got \{'Customer': 1\}",
    ):
        DialogSummaryDataModule(rename_speakers={"Customer": 1})
    with pytest.raises(
        ValueError, match=r"data_files must map split names to file paths.*got \{'train': 3\}"
    ):
        DialogSummaryDataModule(data_files={"train": 3})


def test_good_limits_and_sizes_are_kept():
    dm = DialogSummaryDataModule(
        batch_size=1,
        eval_batch_size=None,
        limit_train=1,
        limit_val=None,
        num_workers=0,
        max_source_length=1,
        max_target_length=1,
        seed=-3,
    )
    assert (dm.batch_size, dm.eval_batch_size, dm.limits["train"], dm.limits["val"]) == (1, 1, 1, None)


def test_construction_reads_nothing(monkeypatch, tmp_path):
    """A sweep checks each candidate value by constructing the data module: that must stay cheap."""

    def refuse(*args, **kwargs):
        raise AssertionError("constructing the data module read data or loaded a tokenizer")

    for name in ("load_tokenizer", "read_located_rows", "load_hub_dataset"):
        monkeypatch.setattr(data_module, name, refuse)  # where the data module looks them up
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    DialogSummaryDataModule(batch_size=3)
    DialogSummaryDataModule(
        data_files={"train": str(tmp_path / "missing.jsonl")}, tokenizer="some/hub-tokenizer"
    )
    DialogSummaryDataModule(dataset="samsum", tokenizer="bundled:t5-tokenizer")


# ----------------------------------------------------------------------------- bundled tokenizers


def test_bundled_tokenizer_names_resolve_from_any_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert tokenizer_path("bundled") == tokenizer_path("bundled:t5-tokenizer") == str(BUNDLED_TOKENIZER)
    assert tokenizer_path("google-t5/t5-base") == "google-t5/t5-base"  # anything else is as given
    ids = load_tokenizer("bundled:t5-tokenizer")("summarize: hi")["input_ids"]
    assert ids == load_tokenizer("bundled")("summarize: hi")["input_ids"]
    with pytest.raises(DataError, match=r"no bundled tokenizer 't5-tiny-dialogue'.*\['t5-tokenizer'\]"):
        DialogSummaryDataModule(tokenizer="bundled:t5-tiny-dialogue")  # a bundled model holds no tokenizer


def test_a_tokenizer_path_that_is_not_there_is_explained(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DataError,
        match=rf"could not load the tokenizer 'experiments/assets/t5-tokenizer': it is no "
        rf"directory under {tmp_path}.*Use tokenizer: bundled",
    ):
        load_tokenizer("experiments/assets/t5-tokenizer")
