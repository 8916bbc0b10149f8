"""Reference summaries per split: DialogSum's train/valid carry `summary`, its test `summary1..3`."""

import json
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from experiments.data import DataError, DialogSummaryDataModule
from experiments.metrics import Rouge, rouge_scores

PER_SPLIT = {"train": "summary", "validation": "summary", "test": ["summary1", "summary2", "summary3"]}
DIALOGSUM = dict(dialogue_field="dialogue", rename_speakers={}, summary_field=PER_SPLIT)


def dialogue(k: int) -> str:
    return f"#Person1#: Hello, is table {k} free?\n#Person2#: Yes, table {k} is free, sit down."


def write_dialogsum(directory: Path) -> Path:
    """Files shaped like knkarthick/dialogsum: one `summary` in train/valid, three in test."""

    def write(name: str, rows: list[dict]) -> None:
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    write(
        "train.jsonl",
        [
            {
                "id": f"train_{k}",
                "dialogue": dialogue(k),
                "summary": f"Table {k} is free.",
                "topic": "restaurant",
            }
            for k in range(3)
        ],
    )
    write(
        "valid.jsonl",
        [
            {
                "id": "dev_0",
                "dialogue": dialogue(9),
                "summary": "Person2 offers table 9.",
                "topic": "restaurant",
            }
        ],
    )
    write(
        "test.jsonl",
        [
            {
                "id": f"test_{k}",
                "dialogue": dialogue(k),
                "summary1": f"Table {k} is free.",
                "summary2": f"Person1 asks about table {k}.",
                "summary3": f"Person2 gives table {k} away.",
                "topic1": "restaurant",
                "topic2": "table",
                "topic3": "seat",
            }
            for k in range(2)
        ],
    )
    return directory


@pytest.fixture
def dialogsum(tmp_path) -> str:
    return str(write_dialogsum(tmp_path))


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict", None])
def test_every_stage_reads_each_splits_own_summary_fields(dialogsum, stage):
    dm = DialogSummaryDataModule(dataset=dialogsum, **DIALOGSUM)
    dm.setup(stage)
    roles = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}.get(stage)
    assert sorted(dm.examples) == sorted(roles or ["train", "val", "test"])
    if "train" in dm.examples:
        assert [e.references for e in dm.examples["train"]] == [[f"Table {k} is free."] for k in range(3)]
    if "val" in dm.examples:
        assert [e.references for e in dm.examples["val"]] == [["Person2 offers table 9."]]
    if "test" in dm.examples:
        assert [len(e.references) for e in dm.examples["test"]] == [3, 3]
        loader = dm.predict_dataloader() if stage == "predict" else dm.test_dataloader()
        assert sorted(len(refs) for batch in loader for refs in batch["references"]) == [3, 3]


def test_multi_reference_rouge_gets_all_three_test_references(dialogsum):
    dm = DialogSummaryDataModule(dataset=dialogsum, **DIALOGSUM)
    dm.setup("test")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["references"][0] == [
        "Table 0 is free.",
        "Person1 asks about table 0.",
        "Person2 gives table 0 away.",
    ]
    # a prediction equal to the third reference scores 1: the best over all three references counts
    predictions = [refs[2] for refs in batch["references"]]
    assert rouge_scores(predictions, batch["references"])["rougeL"] == pytest.approx(1.0)
    assert rouge_scores(predictions, [refs[:1] for refs in batch["references"]])["rougeL"] < 0.7
    rouge = Rouge()  # the metric test_step updates with batch["references"]
    rouge.update(predictions, batch["references"])
    assert float(rouge.compute()["rougeL"]) == pytest.approx(1.0)
    # the first reference is the label
    assert dm.tokenizer.decode(dm.examples["test"][0].labels, skip_special_tokens=True) == "Table 0 is free."


def test_one_list_for_every_split_names_the_field_the_training_split_lacks(dialogsum):
    dm = DialogSummaryDataModule(
        dataset=dialogsum, dialogue_field="dialogue", summary_field=["summary1", "summary2", "summary3"]
    )
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert f"{Path(dialogsum) / 'train.jsonl'}, line 1: field 'summary1' not found" in msg
    assert "['dialogue', 'id', 'summary', 'topic']" in msg and "one entry per split" in msg


def test_a_listed_column_missing_from_a_test_row_is_an_error_naming_it(dialogsum):
    path = Path(dialogsum) / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[1]["summary3"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{path}, line 2: field 'summary3' not found \(in split 'test'"):
        DialogSummaryDataModule(dataset=dialogsum, **DIALOGSUM).setup("test")


def test_split_keys_follow_the_split_names(dialogsum):
    # the configured split names work as keys too
    (Path(dialogsum) / "valid.jsonl").rename(Path(dialogsum) / "dev2.jsonl")
    dm = DialogSummaryDataModule(
        dataset=dialogsum,
        dialogue_field="dialogue",
        val_split="dev2",
        summary_field={"train": "summary", "dev2": "summary", "test": ["summary1", "summary2", "summary3"]},
    )
    dm.setup("validate")
    assert dm.examples["val"][0].references == ["Person2 offers table 9."]


@pytest.mark.parametrize(
    "summary_field, message",
    [
        ({"train": "summary", "valid": "summary"}, r"no entry for the split\(s\) \['test'\]"),
        (
            {"train": "summary", "valid": "summary", "validation": "summary", "test": "summary1"},
            "names the 'valid' split twice, as 'valid' and 'validation'",
        ),
        (
            {"train": "summary", "valid": "summary", "tset": "summary1"},
            "the key 'tset', which names no split",
        ),
        (
            {"train": "summary", "valid": [], "test": "summary1"},
            r"summary_field\['valid'\] must be a field name",
        ),
        (
            {"train": "summary", "valid": 3, "test": "summary1"},
            r"summary_field\['valid'\] must be a field name",
        ),
        ([], "summary_field must be a field name or a non-empty list of them, got \\[\\]"),
    ],
)
def test_bad_summary_field_fails_at_construction(summary_field, message):
    with pytest.raises(ValueError, match=message):
        DialogSummaryDataModule(summary_field=summary_field)


def test_a_per_split_summary_field_parses_from_a_data_section(dialogsum):
    """fit, test, evaluate and study build the data module from the config's data: section like this."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DialogSummaryDataModule, "data")
    config = parser.parse_string(
        f"data:\n  dataset: {dialogsum}\n  dialogue_field: dialogue\n  rename_speakers: {{}}\n"
        "  summary_field: {train: summary, validation: summary, test: [summary1, summary2, summary3]}\n"
    )
    assert config.data.summary_field == PER_SPLIT
    dm = DialogSummaryDataModule(**vars(config.data))
    dm.setup("test")
    assert [len(e.references) for e in dm.examples["test"]] == [3, 3]
