"""evaluate and report through the real entry point, offline, on the demo config."""

import json
import time
from pathlib import Path

import pytest

import peftcore
from experiments.__main__ import main
from experiments.model import build_model

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
SMALL = '["--data.limit_test=4", "--model.generation.max_new_tokens=6"]'


def test_evaluate_base_and_adapter_then_report(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = build_model("bundled:t5-tiny-dialogue", None, False, False, 0.0)
    peftcore.inject(
        model,
        peftcore.LoRAConfig(
            r=16,
            alpha=32,
            target_modules=("q", "k", "v", "o", "wi", "wo"),
        ),
    )
    peftcore.save_adapter(model, tmp_path / "adapter")
    out = str(tmp_path / "eval")
    main(
        [
            "evaluate",
            "--train_config",
            DEMO,
            "--run_name",
            "base",
            "--base_model",
            "true",
            "--output_dir",
            out,
            "--bertscore_model",
            "null",
            "--overrides",
            SMALL,
        ]
    )
    main(
        [
            "evaluate",
            "--train_config",
            DEMO,
            "--run_name",
            "lora",
            "--adapter",
            str(tmp_path / "adapter"),
            "--output_dir",
            out,
            "--bertscore_model",
            "null",
            "--overrides",
            SMALL,
        ]
    )
    base = json.loads((tmp_path / "eval/base/eval_record.json").read_text())
    lora = json.loads((tmp_path / "eval/lora/eval_record.json").read_text())
    assert base["metrics"]["trainable_params"] == 0 and lora["metrics"]["trainable_params"] > 0
    assert (
        base["metrics"]["epoch"] == 0 and lora["metrics"]["epoch"] is None
    )  # an adapter directory does not say
    assert lora["metrics"]["train_runtime"] is None
    assert lora["metrics"]["all_params"] > base["metrics"]["all_params"]
    for record in (base, lora):  # no 4-bit base: the study's convention counts the same
        metrics = record["metrics"]
        assert metrics["all_params_stored"] == metrics["all_params"]
        assert metrics["memory_footprint_stored"] == metrics["memory_footprint"]
    assert set(base["metrics"]) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "memory_footprint"}
    assert "OPENAI_API_KEY is not set" in lora["settings"]["geval"]
    assert len(Path(lora["predictions"]).read_text().splitlines()) == 4
    main(
        [
            "report",
            "--records",
            f"[{out}/base, {out}/lora]",
            "--base_run",
            "base",
            "--out_dir",
            str(tmp_path / "rep"),
        ]
    )
    assert "| trainable_params | 0 |" in capsys.readouterr().out
    assert (tmp_path / "rep/metrics.png").stat().st_size > 0


def test_evaluate_needs_exactly_one_source():
    with pytest.raises(SystemExit, match="exactly one of ckpt_path, adapter, adapters or base_model"):
        main(["evaluate", "--train_config", DEMO, "--run_name", "x"])


def test_an_unreachable_g_eval_server_keeps_the_other_metrics(tmp_path, capsys):
    out = str(tmp_path / "eval")
    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(
            [
                "evaluate",
                "--train_config",
                DEMO,
                "--run_name",
                "base",
                "--base_model",
                "true",
                "--output_dir",
                out,
                "--bertscore_model",
                "null",
                "--overrides",
                SMALL,
                "--geval.base_url",
                "http://127.0.0.1:9/v1",
                "--geval.model",
                "judge",
                "--geval.cache_path",
                str(tmp_path / "cache.sqlite"),
            ]
        )
    message = str(info.value.code)
    assert "G-Eval failed at http://127.0.0.1:9/v1 with model 'judge' (APIConnectionError" in message
    assert "a server is listening" in message and time.monotonic() - started < 60  # no minute of retries
    record = json.loads((tmp_path / "eval/base/eval_record.json").read_text())
    assert "rougeL" in record["metrics"] and "trainable_params" in record["metrics"]
    assert "APIConnectionError" in record["settings"]["geval"]["error"]


def test_an_unreachable_bertscore_model_fails_before_generating(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as info:
        main(
            [
                "evaluate",
                "--train_config",
                DEMO,
                "--run_name",
                "base",
                "--base_model",
                "true",
                "--output_dir",
                str(out),
                "--bertscore_model",
                "an-uncached/model",
                "--overrides",
                SMALL,
            ]
        )
    message = str(info.value.code)
    assert "'an-uncached/model' is not in the local Hugging Face cache" in message
    assert "offline:all-MiniLM-L6-v2" in message and "null to skip" in message
    assert not out.exists()  # decided before any summary was generated


def test_a_record_cut_short_is_resumed_with_only_its_missing_metrics(tmp_path, monkeypatch, capsys):
    import experiments.evaluate as evaluation

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(evaluation, "check_bertscore_model", lambda model: None)
    options = dict(
        train_config=DEMO,
        run_name="base",
        base_model=True,
        output_dir=str(tmp_path / "eval"),
        bertscore_model="a-bertscore-model",
        overrides=["--data.limit_test=2", "--model.generation.max_new_tokens=4"],
    )

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process killed during BERTScore

    monkeypatch.setattr(evaluation, "bert_scores", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(**options)
    path = tmp_path / "eval/base/eval_record.json"
    record = json.loads(path.read_text())
    assert set(record["completed"]) == {"predictions", "rouge"} and record["pending"] == ["bertscore"]
    assert "rougeL" in record["metrics"] and "f1" not in record["metrics"]
    predictions = Path(record["predictions"]).stat().st_mtime_ns

    monkeypatch.setattr(
        evaluation, "bert_scores", lambda *args, **kwargs: {"precision": 0.5, "recall": 0.25, "f1": 0.3}
    )
    evaluation.evaluate(**options, resume=True)
    record = json.loads(path.read_text())
    assert (
        record["pending"] == [] and record["metrics"]["f1"] == 0.3 and record["metrics"]["rougeL"] is not None
    )
    assert Path(record["predictions"]).stat().st_mtime_ns == predictions  # not generated again
    assert "bertscore still to do" in capsys.readouterr().out
    stamp = path.stat().st_mtime_ns
    evaluation.evaluate(**options, resume=True)
    assert path.stat().st_mtime_ns == stamp and "evaluated already" in capsys.readouterr().out
    evaluation.evaluate(
        **{**options, "overrides": ["--data.limit_test=1", "--model.generation.max_new_tokens=4"]},
        resume=True,
    )
    assert json.loads(path.read_text())["settings"]["examples"] == 1  # other settings: evaluated afresh


def test_an_adapter_of_another_shape_than_the_config_says_gives_the_command_line_remedy(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = build_model("bundled:t5-tiny-dialogue", None, False, False, 0.0)
    peftcore.inject(model, peftcore.LoRAConfig(r=4, alpha=8, target_modules=("q", "v")))
    peftcore.save_adapter(model, tmp_path / "adapter")
    command = [
        "evaluate",
        "--train_config",
        DEMO,
        "--run_name",
        "r4",
        "--adapter",
        str(tmp_path / "adapter"),
        "--output_dir",
        str(tmp_path / "eval"),
        "--bertscore_model",
        "null",
    ]
    with pytest.raises(SystemExit) as info:  # demo.yaml builds LoRA r=16 on q, k, v, o, wi, wo
        main([*command, "--overrides", SMALL])
    message = str(info.value.code)
    assert "does not compute what the model's adapter does" in message and "peftcore.unload" not in message
    assert (
        "builds the model with a LoRAConfig already" in message
        and """--overrides '["--model.peft=null"]'""" in message
    )
    main(
        [
            *command,
            "--overrides",
            '["--data.limit_test=2", "--model.generation.max_new_tokens=4", "--model.peft=null"]',
        ]
    )
    record = json.loads((tmp_path / "eval/r4/eval_record.json").read_text())
    assert record["metrics"]["trainable_params"] == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n
    )
