"""The cross-run report on three fabricated run records."""

import csv
import json
import struct
import zlib

import pytest

from experiments.report import METRICS, format_row, load_record, write_report

BASE = {
    "run": "t5-base",
    "metrics": {
        "rouge1": 0.30, "rouge2": 0.10, "rougeL": 0.25, "rougeLsum": 0.27,
        "precision": 0.85, "recall": 0.84, "f1": 0.845,
        "relevance": 3.1, "coherence": 3.0, "consistency": 3.6, "fluency": 2.1,
        "all_params": 222903552, "trainable_params": 0, "trainable_params_percent": 0.0,
        "epoch": 0, "train_runtime": None, "memory_footprint": 891614208,
    },
    "settings": {"method": "none"},
}  # fmt: skip
LORA = {
    "run": "lora",
    "metrics": {
        "rouge1": 0.42, "rouge2": 0.19, "rougeL": 0.35, "rougeLsum": 0.38,
        "precision": 0.88, "recall": 0.87, "f1": 0.875,
        "relevance": 3.9, "coherence": 3.5, "consistency": 4.1, "fluency": 2.6,
        "all_params": 223788288, "trainable_params": 884736, "trainable_params_percent": 0.3953,
        "epoch": 3, "train_runtime": 812.5, "memory_footprint": 895153152,
        "peak_accelerator_memory": 5.2e9,
    },
    "settings": {"method": "lora", "r": 8},
}  # fmt: skip
IA3 = {  # G-Eval and BERTScore not computed: absent or null
    "run": "ia3",
    "metrics": {
        "rouge1": 0.39, "rouge2": 0.16, "rougeL": 0.33, "rougeLsum": 0.35,
        "relevance": None, "all_params": 222968064, "trainable_params": 64512,
        "trainable_params_percent": 0.0289, "epoch": 3, "train_runtime": 640.0, "memory_footprint": 891872256,
    },
    "settings": {"method": "ia3"},
}  # fmt: skip
RECORDS = [BASE, LORA, IA3]


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def assert_valid_png(path) -> None:
    """Signature, then every chunk's CRC, ending with IEND: a complete, uncorrupted PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunk_types = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunk_types.append(kind)
        pos += 12 + length
    assert chunk_types[0] == b"IHDR" and chunk_types[-1] == b"IEND" and b"IDAT" in chunk_types
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    # one record passed as a dict, one as a file, one as a run directory holding eval_record.json
    (out / "lora.json").write_text(json.dumps(LORA))
    (out / "ia3").mkdir()
    (out / "ia3" / "eval_record.json").write_text(json.dumps(IA3))
    return write_report([BASE, out / "lora.json", out / "ia3"], out / "report", base_run="t5-base")


def test_metrics_csv_has_every_value_in_the_study_order(report):
    rows = read_csv(report["csv"])
    assert rows[0] == ["metric", "t5-base", "lora", "ia3"]
    names = [row[0] for row in rows[1:]]
    assert names == [*METRICS, "peak_accelerator_memory"]  # extra metrics after the study's, not dropped
    for row in rows[1:]:
        for cell, record in zip(row[1:], RECORDS):
            value = record["metrics"].get(row[0])
            if value is None:
                assert cell == ""  # missing or null: blank, never 0
            else:
                assert float(cell) == value


def test_change_table_is_percent_change_against_the_base(report):
    rows = read_csv(report["change_csv"])
    assert rows[0] == ["% change vs t5-base", "lora", "ia3"]
    by_metric = {row[0]: row[1:] for row in rows[1:]}
    for metric, cells in by_metric.items():
        base = BASE["metrics"].get(metric)
        for cell, record in zip(cells, (LORA, IA3)):
            value = record["metrics"].get(metric)
            if value is None or base is None or base == 0:
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(100 * (value - base) / base)
    assert float(by_metric["rougeL"][0]) == pytest.approx(40.0)  # 0.25 -> 0.35
    assert by_metric["trainable_params"] == ["", ""]  # base 0: blank, not a crash
    assert by_metric["train_runtime"] == ["", ""]  # base missing
    assert by_metric["f1"][1] == ""  # run missing


def markdown_rows(section: str) -> dict[str, list[str]]:
    """The rows of the table in a report section, keyed by metric: {metric: [cells after it]}."""
    rows = [
        [c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines() if line.startswith("| ")
    ]
    return {row[0]: row[1:] for row in rows[2:]}  # after the header and the alignment row


def test_markdown_shows_the_same_numbers(report):
    text = report["markdown"].read_text()
    metrics_part, change_part = text.split("## Change vs `t5-base` (%)")
    metrics = markdown_rows(metrics_part)
    assert list(metrics) == [*METRICS, "peak_accelerator_memory"]
    for metric, cells in metrics.items():
        assert cells == format_row([r["metrics"].get(metric) for r in RECORDS])
    assert metrics["f1"] == ["0.8450", "0.8750", ""]
    change = markdown_rows(change_part.split("## Plots")[0])
    expected = [f"{100 * (r['metrics']['rouge2'] - 0.10) / 0.10:+.2f}" for r in (LORA, IA3)]
    assert change["rouge2"] == expected == ["+90.00", "+60.00"]
    # the base trains 0 parameters: a % is undefined, so the absolute difference stands there, labelled
    assert change["trainable_params"] == ["+884,736 abs", "+64,512 abs"]
    assert change["f1"][1] == ""  # IA3 has no BERTScore: missing stays blank
    assert "![metrics.png](metrics.png)" in text and "![params_vs_rougeL.png](params_vs_rougeL.png)" in text


@pytest.mark.parametrize(
    "values, cells",
    [
        ([222903552, None, 64512], ["222,903,552", "", "64,512"]),  # whole numbers: thousands separators
        ([3.0, 3.5, None], ["3.0000", "3.5000", ""]),  # alike within a row
        ([0.41234, 0.0289], ["0.4123", "0.0289"]),
        ([812.5, 1234.56, 640], ["812.5", "1,234.6", "640.0"]),
        ([None, None], ["", ""]),
    ],
)
def test_format_row(values, cells):
    assert format_row(values) == cells


def test_plots_are_valid_pngs(report):
    for key in ("metrics_png", "params_png"):
        assert_valid_png(report[key])


def test_tensorboard_holds_the_scalars_and_figures(report):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lora = EventAccumulator(str(report["tensorboard"] / "runs" / "lora")).Reload()
    assert lora.Scalars("metrics/rougeL")[0].value == pytest.approx(0.35)
    ia3 = EventAccumulator(str(report["tensorboard"] / "runs" / "ia3")).Reload()
    assert "metrics/f1" not in ia3.Tags()["scalars"]  # missing stays missing
    summary = EventAccumulator(str(report["tensorboard"] / "summary")).Reload()
    assert set(summary.Tags()["images"]) == {"metrics", "params_vs_rougeL"}


def test_unknown_base_run_lists_the_runs(tmp_path):
    with pytest.raises(
        ValueError, match=r"base run 'bart' not found; the runs are \['t5-base', 'lora', 'ia3'\]"
    ):
        write_report(RECORDS, tmp_path, base_run="bart")
    assert not list(tmp_path.iterdir())  # checked before anything is written


def test_malformed_records_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="repeated: \\['lora'\\]"):
        write_report([LORA, LORA], tmp_path)
    with pytest.raises(ValueError, match="needs a 'run' name"):
        load_record({"metrics": {}})
    with pytest.raises(ValueError, match="metric 'rouge1' is 'high'"):
        load_record({"run": "x", "metrics": {"rouge1": "high"}})


def test_without_base_run_there_is_no_change_table(tmp_path):
    written = write_report([LORA, IA3], tmp_path)
    assert "change_csv" not in written and not (tmp_path / "change.csv").exists()
    assert "Change vs" not in written["markdown"].read_text()


def scored_on(record: dict, run: str, dataset: str, examples: int) -> dict:
    test_set = {
        "dataset": dataset,
        "data_files": None,
        "test_split": "test",
        "summary_field": "summaries",
        "limit_test": examples,
    }
    return {
        **record,
        "run": run,
        "settings": {**record["settings"], "examples": examples, "test_set": test_set},
    }


def test_records_of_different_test_sets_are_refused_naming_what_differs(tmp_path):
    tweetsumm, dialogsum = (
        scored_on(BASE, "base", "tweetsumm", 64),
        scored_on(LORA, "lora", "knkarthick/dialogsum", 32),
    )
    with pytest.raises(ValueError) as info:
        write_report([tweetsumm, dialogsum], tmp_path, base_run="base")
    message = str(info.value)
    assert "test set: base: " in message and '"dataset": "knkarthick/dialogsum"' in message
    assert "examples: base: 64; lora: 32" in message and "--allow_mixed true" in message
    assert not list(tmp_path.iterdir())
    written = write_report([tweetsumm, dialogsum], tmp_path, base_run="base", allow_mixed=True)
    text = written["markdown"].read_text()
    assert text.startswith("# Results\n\n**Mixed records**") and "- examples: base: 64; lora: 32" in text
    assert "## Change vs `base` (%) (mixed records)" in text
    assert read_csv(written["change_csv"])[0] == ["% change vs base (mixed records)", "lora"]
    same = write_report(
        [tweetsumm, scored_on(LORA, "lora", "tweetsumm", 64)], tmp_path / "same", base_run="base"
    )
    assert "Mixed" not in same["markdown"].read_text()


def test_a_record_with_stages_pending_is_named_under_the_table(tmp_path):
    cut_short = {**IA3, "pending": ["bertscore"]}
    text = write_report([BASE, cut_short], tmp_path)["markdown"].read_text()
    assert (
        "Evaluations not finished, their blank cells still to compute" in text and "`ia3` (bertscore)" in text
    )


def test_the_studys_counting_convention_is_named_where_its_figures_are(tmp_path):
    qlora = {
        "run": "qlora",
        "metrics": {
            "rougeL": 0.3, "all_params": 224673024, "trainable_params": 1769472,
            "trainable_params_percent": 0.787577, "memory_footprint": 0.377639,
            "all_params_stored": 153894144, "trainable_percent_stored": 1.149798, "memory_footprint_stored": 0.375546,
        },
    }  # fmt: skip
    text = write_report([qlora], tmp_path)["markdown"].read_text()
    rows = markdown_rows(text.split("## Plots")[0])
    assert rows["all_params_stored"] == ["153,894,144"] and rows["all_params"] == ["224,673,024"]
    assert "seed study's convention" in text and "stored elements (two per byte)" in text
    plain = write_report([BASE], tmp_path / "plain")["markdown"].read_text()
    assert "seed study's convention" not in plain  # no such figures, no such line
