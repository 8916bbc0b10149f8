"""Bad data: every problem is a DataError naming the file, the line (or row index) and the field."""

import json
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from experiments.data import DataError, DialogSummaryDataModule, read_rows

TURNS = [{"speaker": "Customer", "text": "my order is late"}, {"speaker": "Agent", "text": "Sorry!"}]


def row(**fields) -> dict:
    return {"id": "r", "turns": TURNS, "summaries": ["Order late."], **fields}


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def setup_error(directory: Path, train: str | bytes, name: str = "train.jsonl", **kwargs) -> str:
    """The DataError message of setup("fit") with ``train`` as the training file (valid is fine)."""
    for old in directory.glob("train.*"):
        old.unlink()
    (directory / name).write_bytes(train if isinstance(train, bytes) else train.encode("utf-8"))
    (directory / "valid.jsonl").write_text(jsonl(row()), encoding="utf-8")
    with pytest.raises(DataError) as err:
        DialogSummaryDataModule(dataset=str(directory), **kwargs).setup("fit")
    return str(err.value)


# ----------------------------------------------------------------------------- files


def test_a_non_utf8_byte_names_file_line_and_column(tmp_path):
    text = jsonl(row(), row(), row()).encode() + b'{"id": "x", "turns": "A: caf\xe9", "summaries": ["s"]}\n'
    msg = setup_error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}, line 4: byte 0xe9 at column 29 is not UTF-8")
    assert "save the file as UTF-8" in msg
    msg = setup_error(tmp_path, b"id,turns,summaries\na,b,c\nd,caf\xe9,f\n", name="train.csv")
    assert msg.startswith(f"{tmp_path / 'train.csv'}, line 3: byte 0xe9 at column 6 is not UTF-8")


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbfid,turns,summaries\na,A: hi,s\n")
    assert read_rows(path) == [{"id": "a", "turns": "A: hi", "summaries": "s"}]


def test_missing_files_are_data_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text(jsonl(row()))
    files = {"train": str(tmp_path / "train.jsonl"), "valid": str(tmp_path / "v.jsonl")}
    dm = DialogSummaryDataModule(data_files=files)
    with pytest.raises(DataError, match=f"{tmp_path / 'v.jsonl'}: no such file"):
        dm.setup("fit")
    # a name that looks like a file or a path is not sent to the hub
    for name in ("data/dialogues.jsonl", "./data", "/no/such/dir"):
        with pytest.raises(DataError, match=f"dataset '{name}': no such file or directory"):
            DialogSummaryDataModule(dataset=name).setup("fit")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=f"{tmp_path / 'other'} holds no <split>"):
        DialogSummaryDataModule(dataset=str(tmp_path / "other")).setup("fit")


def test_jsonl_lines_count_blank_lines(tmp_path):
    text = (
        "\n"
        + jsonl(row())
        + "\n\n"
        + jsonl(row(id="a"), row(id="b"))
        + "\n\n"
        + jsonl(row(id="bad", summaries=5))
    )
    assert text.split("\n")[8].startswith('{"id": "bad"')  # the bad row is on line 9, the 4th row
    msg = setup_error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}, line 9 (id bad): field 'summaries' is int 5")


def test_json_array_names_the_line_each_row_starts_on(tmp_path):
    rows = [row(id="a"), row(id="b"), row(id="c", summaries=["ok", 7])]
    text = json.dumps(rows, indent=2)
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if '"id": "c"' in line)  # 1-based: the "{" line above it
    assert lines[start - 1] == "  {" and start > 30
    msg = setup_error(tmp_path, text, name="train.json")
    assert msg.startswith(
        f"{tmp_path / 'train.json'}, line {start} (id c): item 1 of field 'summaries' is int 7"
    )


def test_csv_names_the_physical_line_a_record_starts_on(tmp_path):
    text = 'id,turns,summaries\r\na,"A: hi\r\nB: hello",greeting\r\n\r\nb,"A: one\nB: two",\r\n'
    msg = setup_error(
        tmp_path, text, name="train.csv"
    )  # b starts on line 5, after a two-line cell and a blank line
    assert msg.startswith(f"{tmp_path / 'train.csv'}, line 5 (id b): field 'summaries' is an empty summary")
    msg = setup_error(tmp_path, "id,turns,summaries\na,b,c\n\nd,e\n", name="train.csv")
    assert msg.startswith(f"{tmp_path / 'train.csv'}, line 4: 2 cells, but the header has 3")
    msg = setup_error(tmp_path, "id,turns,id\na,b,c\n", name="train.csv")
    assert "header names ['id'] more than once" in msg


def test_parquet_names_the_row_index(tmp_path):
    table = pyarrow.Table.from_pylist([row(id="a"), row(id="b", turns=[]), row(id="c")])
    pyarrow.parquet.write_table(table, tmp_path / "train.parquet")
    (tmp_path / "valid.jsonl").write_text(jsonl(row()))
    with pytest.raises(DataError) as err:
        DialogSummaryDataModule(dataset=str(tmp_path)).setup("fit")
    assert str(err.value).startswith(
        f"{tmp_path / 'train.parquet'}, row index 1 (id b): the dialogue in field 'turns' is empty"
    )


def test_hub_rows_are_named_by_split_and_row_index(monkeypatch):
    rows = [{"dialogue": "A: hi", "summary": "hi"}, {"dialogue": "A: yo", "summary": None}]
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name: datasets.DatasetDict(
            {s: datasets.Dataset.from_list(rows) for s in ("train", "validation")}
        ),
    )
    dm = DialogSummaryDataModule(
        dataset="someone/dialogues", dialogue_field="dialogue", summary_field="summary"
    )
    with pytest.raises(
        DataError,
        match=r"^row index 1 of split 'train' of hub data set 'someone/dialogues' "
        r"\(id train-1\): field 'summary' is null",
    ):
        dm.setup("fit")


# ----------------------------------------------------------------------------- rows and fields


@pytest.mark.parametrize(
    "bad, message",
    [
        (row(summaries=5), "field 'summaries' is int 5; expected a summary (a string) or a non-empty list"),
        (row(summaries=None), "field 'summaries' is null"),
        (row(summaries={"a": "b"}), "field 'summaries' is dict {'a': 'b'}"),
        (row(summaries=[]), "field 'summaries' is list []"),
        (row(summaries=["fine", 3]), "item 1 of field 'summaries' is int 3; expected a summary"),
        (
            row(summaries=["fine", "  "]),
            "item 1 of field 'summaries' is an empty summary; fill it in or remove the row",
        ),
        (row(summaries=""), "field 'summaries' is an empty summary"),
        (
            row(turns=""),
            "the dialogue in field 'turns' is empty (it is str ''); fill it in or remove the row",
        ),
        (row(turns=[]), "the dialogue in field 'turns' is empty (it is list [])"),
        (
            row(
                turns=[
                    {"speaker": "Customer", "text": "@Acme"},
                    {"speaker": "Agent", "text": " https://t.co/x "},
                ]
            ),
            "the dialogue in field 'turns' is empty once @mentions and links are removed",
        ),
        (
            row(turns=12),
            "field 'turns': the dialogue is int 12; expected a string, a list of strings, or a list of turns",
        ),
        (
            row(turns=[{"speaker": "Agent", "text": 4}]),
            "field 'turns': turn 1's 'text' is int 4; expected a string",
        ),
        (row(turns=["A: hi", 3]), "field 'turns': turn 2 is int 3; expected a string or a dict"),
        (row(turns=[{"speaker": None, "text": "hi"}]), "field 'turns': turn 1's 'speaker' is null"),
        (
            row(turns=[{"text": "hi"}]),
            "field 'turns': turn 1 has no key 'speaker'; the keys it has are ['text']",
        ),
    ],
)
def test_a_bad_field_names_file_line_id_and_field(tmp_path, bad, message):
    msg = setup_error(tmp_path, jsonl(row(), bad))
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}, line 2 (id r)"), msg
    assert message in msg, msg


def test_a_row_that_is_not_an_object_names_its_line(tmp_path):
    msg = setup_error(tmp_path, jsonl(row()) + "[1, 2]\n")
    assert msg == f"{tmp_path / 'train.jsonl'}, line 2: a list, expected an object with named fields"


def test_a_blank_dialogue_is_refused_without_cleaning_too(tmp_path):
    msg = setup_error(tmp_path, jsonl(row(turns="   \n ")), strip_mentions_and_links=False)
    assert "line 1 (id r): the dialogue in field 'turns' is empty (it is str '   \\n ')" in msg


def test_a_speaker_number_is_kept_as_its_name(tmp_path):
    turns = [{"speaker": 0, "text": "hi"}, {"speaker": 1, "text": "yo"}]
    (tmp_path / "train.jsonl").write_text(jsonl(row(turns=turns)))
    dm = DialogSummaryDataModule(dataset=str(tmp_path / "train.jsonl"))
    dm.setup("fit")
    assert dm.examples["train"][0].source == "0: hi\n1: yo"


def test_every_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)
