"""DialogSummaryDataModule: sources, preprocessing, batches, samplers, errors."""

import json
import re
import statistics
from pathlib import Path

import datasets
import lightning as L
import pyarrow
import pyarrow.parquet
import pytest
import torch
from torch.utils.data import DistributedSampler

import experiments
from experiments import data as data_mod
from experiments.data import (
    BUNDLED_TOKENIZER,
    BUNDLED_TWEETSUMM,
    Collator,
    DataError,
    DialogSummaryDataModule,
    EpochShuffle,
    Example,
    LengthGroupedBatchSampler,
    clean_text,
    format_dialogue,
    load_tokenizer,
    set_sampler_epoch,
)


def bundled_rows(split: str) -> list[dict]:
    with open(BUNDLED_TWEETSUMM / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tweetsumm() -> DialogSummaryDataModule:
    dm = DialogSummaryDataModule(prefix="summarize: ")  # what the CLI sets for a T5 model
    dm.setup()
    return dm


SAMSUM_LIKE = [
    {"id": "s1", "dialogue": "Amanda: I baked cookies.\r\nJerry: Sure!", "summary": "Amanda baked cookies."},
    {"id": "s2", "dialogue": "Tom: Are you coming?\r\nAnn: Yes.", "summary": "Ann is coming."},
]
SAMSUM_FIELDS = dict(dialogue_field="dialogue", summary_field="summary")


# ----------------------------------------------------------------------------- assets and tokenizer


def test_bundled_assets_live_inside_the_package():
    package = Path(experiments.__file__).parent
    for path in (BUNDLED_TWEETSUMM, BUNDLED_TOKENIZER):
        assert package in path.parents
    assert {p.name for p in BUNDLED_TWEETSUMM.iterdir()} >= {"train.jsonl", "valid.jsonl", "test.jsonl"}
    assert (BUNDLED_TOKENIZER / "spiece.model").is_file()
    assert [len(bundled_rows(s)) for s in ("train", "valid", "test")] == [879, 110, 110]


def test_load_tokenizer_bundled_is_t5():
    tok = load_tokenizer()
    assert len(tok) == 32100 and tok.pad_token_id == 0 and tok.eos_token_id == 1
    ids = tok("summarize: hello there")["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "summarize: hello there"
    # a local path goes through AutoTokenizer and gives the same ids
    assert load_tokenizer(str(BUNDLED_TOKENIZER))("summarize: hello there")["input_ids"] == ids


# ----------------------------------------------------------------------------- preprocessing


def test_clean_text_removes_mentions_and_links_only():
    text = "@AppleSupport  hi,\tmail me at a.b@example.com https://t.co/xyz or http://x.org/a?b=1 @12345"
    assert clean_text(text) == "hi, mail me at a.b@example.com or"


def test_tweetsumm_dialogue_is_formatted_like_the_hf_copy(tweetsumm):
    first = tweetsumm.examples["train"][0]
    lines = first.source.split("\n")
    assert lines[:3] == [
        "user: So neither my iPhone nor my Apple Watch are recording my steps/activity, and Health doesn’t "
        "recognise either source anymore for some reason. Any ideas?",
        "user: please read the above.",
        "agent: Let’s investigate this together. To start, can you tell us the software versions your "
        "iPhone and Apple Watch are running currently?",
    ]
    assert first.id == bundled_rows("train")[0]["id"]
    assert tweetsumm.tokenizer.decode(first.input_ids).startswith("summarize: user: So neither my iPhone")
    for e in tweetsumm.examples["train"]:
        assert not re.search(r"(?<!\w)@\w|http", e.source)  # a lone "@" ("Plane is @ gate") stays
        assert all(line.startswith(("user: ", "agent: ")) for line in e.source.split("\n"))


def test_preprocessing_switches_off():
    dm = DialogSummaryDataModule(rename_speakers={}, strip_mentions_and_links=False, prefix="", limit_train=1)
    dm.setup("fit")
    first = dm.examples["train"][0]
    lines = first.source.split("\n")
    assert lines[0].startswith("Customer: So neither") and lines[0].endswith(
        "Any ideas? https://t.co/m9DPQbkftD"
    )
    assert lines[1] == "Customer: @AppleSupport please read the above."
    assert dm.tokenizer.decode(first.input_ids).startswith("Customer: So neither")


def test_dialogue_as_string_or_list_of_strings():
    text = "A: hi @bob  there\r\nB: see https://t.co/x"
    assert format_dialogue(text, strip_mentions_and_links=False) == text
    assert format_dialogue(text) == "A: hi there\nB: see"
    assert format_dialogue(["a: one", "@x", "b:  two"]) == "a: one\nb: two"
    turns = [{"who": "Customer", "msg": "hi"}, {"who": "Bot", "msg": "hello"}]
    assert format_dialogue(turns, "who", "msg", {"Customer": "user"}) == "user: hi\nBot: hello"


def test_truncation_keeps_eos():
    dm = DialogSummaryDataModule(max_source_length=32, max_target_length=8, limit_train=50)
    dm.setup("fit")
    train = dm.examples["train"]
    assert max(len(e.input_ids) for e in train) == 32 and max(len(e.labels) for e in train) == 8
    assert all(e.input_ids[-1] == 1 and e.labels[-1] == 1 for e in train)


def test_target_summaries_first_or_all():
    rows = bundled_rows("train")[:20]
    first = DialogSummaryDataModule(limit_train=20, limit_val=5)
    every = DialogSummaryDataModule(limit_train=20, limit_val=5, target_summaries="all")
    first.setup("fit"), every.setup("fit")
    assert len(first.examples["train"]) == 20
    assert len(every.examples["train"]) == sum(len(r["summaries"]) for r in rows)
    decoded = [every.tokenizer.decode(e.labels, skip_special_tokens=True) for e in every.examples["train"]]
    assert decoded[: len(rows[0]["summaries"])] == [s.strip() for s in rows[0]["summaries"]]
    # validation keeps every reference in either mode, with the first as the label
    for dm in (first, every):
        assert len(dm.examples["val"]) == 5
        assert [e.references for e in dm.examples["val"]] == [
            r["summaries"] for r in bundled_rows("valid")[:5]
        ]


# ----------------------------------------------------------------------------- batches


def test_collate_pads_dynamically_and_reports_padding(tweetsumm):
    examples = tweetsumm.examples["val"][:5]
    batch = Collator(pad_token_id=0)(examples)
    longest_in, longest_out = max(len(e.input_ids) for e in examples), max(len(e.labels) for e in examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, longest_in)
    assert batch["labels"].shape == (5, longest_out)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    for i, e in enumerate(examples):
        n, m = len(e.input_ids), len(e.labels)
        assert batch["input_ids"][i, :n].tolist() == e.input_ids and (batch["input_ids"][i, n:] == 0).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest_in - n)
        assert batch["labels"][i, :m].tolist() == e.labels and (batch["labels"][i, m:] == -100).all()
    pads = (batch["attention_mask"] == 0).sum().item() + (batch["labels"] == -100).sum().item()
    assert batch["padding_fraction"] == pytest.approx(pads / (5 * (longest_in + longest_out)))
    assert batch["ids"] == [e.id for e in examples]
    assert batch["sources"] == [e.source for e in examples]
    assert batch["references"] == [e.references for e in examples]


def test_loaders_serve_the_right_splits(tweetsumm):
    assert tweetsumm.eval_batch_size == 8
    test_ids = [r["id"] for r in bundled_rows("test")]
    predicted = [i for b in tweetsumm.predict_dataloader() for i in b["ids"]]
    assert predicted == test_ids  # predict keeps file order
    tested = [b for b in tweetsumm.test_dataloader()]
    assert sorted(i for b in tested for i in b["ids"]) == sorted(test_ids)
    widths = [b["input_ids"].shape[1] for b in tested]
    assert widths == sorted(widths, reverse=True)  # longest first
    dm = DialogSummaryDataModule(batch_size=4, eval_batch_size=16, limit_val=40, limit_train=8)
    dm.setup("fit")
    assert [len(b["ids"]) for b in dm.val_dataloader()] == [16, 16, 8]
    assert {len(b["ids"]) for b in dm.train_dataloader()} == {4}


# ----------------------------------------------------------------------------- samplers


def test_epoch_shuffle_is_a_seeded_permutation_per_epoch():
    s = EpochShuffle(100, seed=3)
    a, b = list(s), list(s)
    s.set_epoch(1)
    c = list(s)
    assert sorted(a) == list(range(100)) and a == b and a != c
    assert list(EpochShuffle(100, seed=4)) != a


def test_length_grouped_batches_partition_and_group():
    lengths = [int(x) for x in torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0))]
    order = EpochShuffle(1000, seed=0)
    sampler = LengthGroupedBatchSampler(
        order, batch_size=8, drop_last=False, lengths=lengths, bucket_batches=5
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) == 125
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == list(sampler)  # deterministic within an epoch
    # within a bucket of 40 random indices sorted by length, a batch spans a small length range
    spread = statistics.mean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread < 100
    sampler.set_epoch(1)  # forwards to the index sampler, which the batch order follows too
    assert order.epoch == 1 and list(sampler) != batches
    short = LengthGroupedBatchSampler(EpochShuffle(21), batch_size=8, drop_last=True, lengths=[1] * 21)
    assert len(short) == 2 and [len(b) for b in short] == [8, 8]
    assert sorted(len(b) for b in LengthGroupedBatchSampler(EpochShuffle(21), 8, False, [1] * 21)) == [
        5,
        8,
        8,
    ]


def test_length_grouping_cuts_padding_on_tweetsumm(tweetsumm):
    def mean_padding(dm):
        return statistics.mean(b["padding_fraction"] for b in dm.train_dataloader())

    grouped = mean_padding(tweetsumm)
    tweetsumm.group_by_length = False
    try:
        random_batches = mean_padding(tweetsumm)
    finally:
        tweetsumm.group_by_length = True
    assert grouped < 0.5 * random_batches, (grouped, random_batches)


def test_train_loader_shards_itself_when_distributed(monkeypatch):
    """Trainer(use_distributed_sampler=False) under DDP: the data module shards by rank itself."""
    dm = DialogSummaryDataModule(limit_train=100, batch_size=4)
    dm.setup("fit")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        loader = dm.train_dataloader()
        assert isinstance(loader.batch_sampler.sampler, DistributedSampler)
        shards.append({i for b in loader.batch_sampler for i in b})
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 100


class _RecordIds(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[str]] = []

    def on_train_epoch_start(self):
        self.seen.append([])

    def training_step(self, batch, batch_idx):
        assert set(batch) == {
            "input_ids",
            "attention_mask",
            "labels",
            "ids",
            "sources",
            "references",
            "padding_fraction",
        }
        self.seen[-1] += batch["ids"]
        return self.weight * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_trainer_reshuffles_each_epoch_and_repeats_across_runs():
    def run() -> list[list[str]]:
        model = _RecordIds()
        dm = DialogSummaryDataModule(limit_train=24, batch_size=4, seed=7)
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=dm)
        return model.seen

    first, second = run(), run()
    ids = [r["id"] for r in bundled_rows("train")[:24]]
    assert len(first) == 2 and all(sorted(epoch) == sorted(ids) for epoch in first)
    assert first[0] != first[1]
    assert first == second


# ----------------------------------------------------------------------------- other sources


def test_directory_of_mixed_formats_and_validation_alias(tmp_path):
    turns = [
        {"speaker": "Customer", "text": "@Acme my order is late"},
        {"speaker": "Agent", "text": "Sorry!"},
    ]
    write_jsonl(
        tmp_path / "train.jsonl", [{"id": "t1", "turns": turns, "summaries": ["Order late.", "Late."]}]
    )
    (tmp_path / "validation.csv").write_text('id,turns,summaries\nv1,"Customer: hi, @x","Greeting."\n')
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([{"turns": turns, "summaries": ["Test sum."]}]), tmp_path / "test.parquet"
    )
    dm = DialogSummaryDataModule(dataset=str(tmp_path))
    dm.setup()
    assert dm.examples["train"][0].source == "user: my order is late\nagent: Sorry!"
    assert dm.examples["val"][0].source == "Customer: hi," and dm.examples["val"][0].references == [
        "Greeting."
    ]
    assert dm.examples["test"][0].id == "test-0"  # no id column: made up
    assert dm.examples["test"][0].source == "user: my order is late\nagent: Sorry!"


def test_data_files_and_single_file(tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", SAMSUM_LIKE)
    (tmp_path / "b.json").write_text(json.dumps(SAMSUM_LIKE[:1], indent=2))
    dm = DialogSummaryDataModule(
        data_files={"train": str(train), "dev": str(tmp_path / "b.json")}, val_split="dev", **SAMSUM_FIELDS
    )
    dm.setup("fit")
    assert [e.id for e in dm.examples["train"]] == ["s1", "s2"] and [e.id for e in dm.examples["val"]] == [
        "s1"
    ]
    assert dm.examples["train"][0].source == "Amanda: I baked cookies.\nJerry: Sure!"
    one = DialogSummaryDataModule(dataset=str(train), **SAMSUM_FIELDS)
    one.setup()
    assert [len(one.examples[r]) for r in ("train", "val", "test")] == [2, 2, 2]


def test_hub_name_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name):
        calls.append(name)
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_list(SAMSUM_LIKE) for s in ("train", "validation", "test")}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = DialogSummaryDataModule(dataset="samsum", **SAMSUM_FIELDS)  # val_split "valid" finds "validation"
    dm.prepare_data()
    dm.setup("fit")
    assert calls == ["samsum", "samsum"]
    assert [e.id for e in dm.examples["val"]] == ["s1", "s2"]
    assert dm.examples["train"][1].references == ["Ann is coming."]


def test_hub_offline_failure_is_explained(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the real code path, without a network
    dm = DialogSummaryDataModule(dataset="peftcore-tests/no-such-dataset")
    with pytest.raises(
        DataError,
        match="could not load the Hugging Face data set 'peftcore-tests/no-such-dataset'"
        r"(.|\n)*dataset='tweetsumm' for the bundled copy",
    ):
        dm.setup("fit")


# ----------------------------------------------------------------------------- bad input, found at setup()


def setup_error(tmp_path, files: dict[str, str], **kwargs) -> str:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    dm = DialogSummaryDataModule(dataset=str(tmp_path), **kwargs)
    with pytest.raises(ValueError) as err:
        dm.setup()
    return str(err.value)


GOOD = json.dumps({"id": "x", "turns": [{"speaker": "Agent", "text": "hi"}], "summaries": ["s"]}) + "\n"


def test_missing_field_lists_the_fields_that_exist(tmp_path):
    msg = setup_error(
        tmp_path, {"train.jsonl": GOOD, "valid.jsonl": GOOD, "test.jsonl": GOOD}, summary_field="summary"
    )
    assert "field 'summary' not found" in msg and "['id', 'summaries', 'turns']" in msg


def test_missing_turn_key_names_the_key(tmp_path):
    msg = setup_error(
        tmp_path, {"train.jsonl": GOOD, "valid.jsonl": GOOD, "test.jsonl": GOOD}, text_key="body"
    )
    assert "no key 'body'" in msg and "['speaker', 'text']" in msg and "id x" in msg


def test_empty_split(tmp_path):
    msg = setup_error(tmp_path, {"train.jsonl": GOOD, "valid.jsonl": "\n", "test.jsonl": GOOD})
    assert "split 'valid'" in msg and "is empty" in msg


def test_unknown_split_lists_the_splits(tmp_path):
    msg = setup_error(
        tmp_path, {"train.jsonl": GOOD, "valid.jsonl": GOOD, "test.jsonl": GOOD}, test_split="eval"
    )
    assert "split 'eval' not found" in msg and "['test', 'train', 'valid']" in msg
    with pytest.raises(ValueError, match=r"split 'tets' not found.*\['test', 'train', 'valid'\]"):
        DialogSummaryDataModule(test_split="tets").setup("test")


def test_unparsable_jsonl_names_file_and_line(tmp_path):
    msg = setup_error(
        tmp_path,
        {"train.jsonl": GOOD + GOOD + '{"id": "y", "turns": [\n', "valid.jsonl": GOOD, "test.jsonl": GOOD},
    )
    assert f"{tmp_path / 'train.jsonl'}, line 3: not valid JSON" in msg


def test_unparsable_json_array_and_csv_name_file_and_line(tmp_path):
    msg = setup_error(
        tmp_path, {"train.json": '[\n{"id": 1},\n{"id": }\n]', "valid.jsonl": GOOD, "test.jsonl": GOOD}
    )
    assert f"{tmp_path / 'train.json'}, line 3: not valid JSON" in msg
    (tmp_path / "train.json").unlink()
    msg = setup_error(tmp_path, {"train.csv": "id,turns,summaries\na,b,c\nd,e\n"})
    assert f"{tmp_path / 'train.csv'}, line 3" in msg and "cells" in msg
    (tmp_path / "train.csv").unlink()
    msg = setup_error(tmp_path, {"train.parquet": "not parquet"})
    assert f"{tmp_path / 'train.parquet'}: not a valid Parquet file" in msg


def test_row_without_summary(tmp_path):
    row = json.dumps({"id": "z", "turns": "A: hi", "summaries": []}) + "\n"
    msg = setup_error(tmp_path, {"train.jsonl": GOOD + row, "valid.jsonl": GOOD, "test.jsonl": GOOD})
    assert f"{tmp_path / 'train.jsonl'}, line 2 (id z): field 'summaries' is list []" in msg


def test_bad_arguments_fail_at_construction():
    with pytest.raises(
        ValueError, match=r"limit_train must be a positive integer \(or null for every dialogue\), got 0"
    ):
        DialogSummaryDataModule(limit_train=0)
    with pytest.raises(ValueError, match="target_summaries"):
        DialogSummaryDataModule(target_summaries="best")


def test_example_is_what_batches_are_made_of():
    e = Example("a", "user: hi", ["r1", "r2"], [5, 1], [7, 1])
    batch = Collator(0)([e, Example("b", "x", ["r"], [9, 9, 1], [1])])
    assert batch["labels"].tolist() == [[7, 1], [1, -100]]
    assert batch["padding_fraction"] == pytest.approx(2 / 10)
    assert data_mod.resolve_split("valid", ["train", "validation"], "src") == "validation"
    assert data_mod.resolve_split("validation", ["valid"], "src") == "valid"


def test_references_from_several_columns_score_multi_reference(tmp_path):
    """DialogSum's test split keeps its three references in summary1, summary2, summary3."""
    from experiments.metrics import rouge_scores

    rows = [
        {
            "id": "d1",
            "dialogue": "#Person1#: hi\n#Person2#: hello",
            "summary1": "they greet each other",
            "summary2": "person one says hi to person two",
            "summary3": ["a greeting", "two people greet"],
        }
    ]
    path = tmp_path / "dialogsum.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dm = DialogSummaryDataModule(
        dataset=str(path),
        dialogue_field="dialogue",
        rename_speakers={},
        summary_field=["summary1", "summary2", "summary3"],
    )
    dm.setup("test")
    (example,) = dm.examples["test"]
    assert example.references == [
        "they greet each other",
        "person one says hi to person two",
        "a greeting",
        "two people greet",
    ]
    # a prediction equal to the second reference is a perfect score: the best over all references counts
    assert rouge_scores(["person one says hi to person two"], [example.references])[
        "rougeL"
    ] == pytest.approx(1.0)
    assert rouge_scores(["person one says hi to person two"], [example.references[:1]])["rougeL"] < 0.5
    with pytest.raises(ValueError, match=r"field 'summary4' not found"):
        DialogSummaryDataModule(
            dataset=str(path), dialogue_field="dialogue", summary_field=["summary1", "summary4"]
        ).setup("test")


@pytest.mark.parametrize("grouped", [True, False], ids=["length-grouped", "shuffled"])
def test_a_saved_place_inside_an_epoch_resumes_after_the_batches_done(grouped):
    """The place a checkpoint saves (epoch 1, 3 batches done) gives a resumed run's loader the
    rest of that epoch, in that epoch's order, then whole epochs again."""
    options = dict(limit_train=40, batch_size=4, group_by_length=grouped)
    dm = DialogSummaryDataModule(**options)
    dm.setup("fit")
    loader = dm.train_dataloader()
    set_sampler_epoch(loader, 1)
    epoch_1 = [batch["ids"] for batch in loader]
    set_sampler_epoch(loader, 2)
    epoch_2 = [batch["ids"] for batch in loader]
    loader.batch_done(1, 3)
    saved = {"train_place": loader.state_dict()}  # what the data module saves with a checkpoint

    resumed = DialogSummaryDataModule(**options)
    resumed.setup("fit")
    resumed.load_state_dict(saved)
    again = resumed.train_dataloader()
    assert [batch["ids"] for batch in again] == epoch_1[3:]
    set_sampler_epoch(again, 2)
    assert [batch["ids"] for batch in again] == epoch_2
    # an epoch's end skips nothing
    resumed.load_state_dict({"train_place": {"epoch": 1, "batches_done": len(epoch_1)}})
    whole = resumed.train_dataloader()
    set_sampler_epoch(whole, 1)
    assert [batch["ids"] for batch in whole] == epoch_1


def test_left_to_the_model_a_data_module_alone_uses_no_prefix_and_the_bundled_tokenizer():
    dm = DialogSummaryDataModule(limit_train=1, limit_val=1, limit_test=1)
    assert (dm.prefix, dm.tokenizer_name) == ("", "bundled")
    dm.setup("fit")
    assert not dm.tokenizer.decode(dm.examples["train"][0].input_ids).startswith("summarize:")


def test_a_place_saved_at_an_epochs_end_skips_nothing_under_ddp(monkeypatch):
    """Each of 2 ranks has 5 batches of its 20 dialogues: a place saved after all 5 is an epoch's
    end for that rank (not half of the 10 batches of all 40), so the next epoch runs whole."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    dm = DialogSummaryDataModule(limit_train=40, batch_size=4)
    dm.setup("fit")
    dm.load_state_dict({"train_place": {"epoch": 1, "batches_done": 5}})
    assert len(list(dm.train_dataloader().batch_sampler)) == 5
    dm.load_state_dict(
        {"train_place": {"epoch": 1, "batches_done": 2}}
    )  # inside the epoch: the 3 still to do
    assert len(list(dm.train_dataloader().batch_sampler)) == 3
