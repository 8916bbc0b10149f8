"""evaluate and report through the real entry point, offline, on the demo config."""

import json
import time
from pathlib import Path

import pytest

import peftcore
from experiments.__main__ import main
from experiments.module import build_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
SMALL = '["--data.limit_test=4", "--model.max_new_tokens=6"]'


def test_evaluate_base_and_adapter_then_report(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = build_model("bundled:t5-tiny-dialogue", None, False, False, 0.0)
    peftcore.inject(model, peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "k", "v", "o", "wi", "wo"),
                                               ))
    peftcore.save_adapter(model, tmp_path / "adapter")
    out = str(tmp_path / "eval")
    main(["evaluate", "--train_config", DEMO, "--run_name", "base", "--base_model", "true", "--output_dir", out,
          "--bertscore_model", "null", "--overrides", SMALL])
    main(["evaluate", "--train_config", DEMO, "--run_name", "lora", "--adapter", str(tmp_path / "adapter"),
          "--output_dir", out, "--bertscore_model", "null", "--overrides", SMALL])
    base = json.loads((tmp_path / "eval/base/eval_record.json").read_text())
    lora = json.loads((tmp_path / "eval/lora/eval_record.json").read_text())
    assert base["metrics"]["trainable_params"] == 0 and lora["metrics"]["trainable_params"] > 0
    assert base["metrics"]["epoch"] == 0 and lora["metrics"]["epoch"] is None  # an adapter directory does not say
    assert lora["metrics"]["train_runtime"] is None
    assert lora["metrics"]["all_params"] > base["metrics"]["all_params"]
    assert set(base["metrics"]) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "memory_footprint"}
    assert "OPENAI_API_KEY is not set" in lora["settings"]["geval"]
    assert len(Path(lora["predictions"]).read_text().splitlines()) == 4
    main(["report", "--records", f"[{out}/base, {out}/lora]", "--base_run", "base", "--out_dir", str(tmp_path / "rep")])
    assert "| trainable_params | 0 |" in capsys.readouterr().out
    assert (tmp_path / "rep/metrics.png").stat().st_size > 0


def test_evaluate_needs_exactly_one_source():
    with pytest.raises(SystemExit, match="exactly one of ckpt_path, adapter or base_model"):
        main(["evaluate", "--train_config", DEMO, "--run_name", "x"])


def test_an_unreachable_g_eval_server_keeps_the_other_metrics(tmp_path, capsys):
    out = str(tmp_path / "eval")
    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--train_config", DEMO, "--run_name", "base", "--base_model", "true", "--output_dir", out,
              "--bertscore_model", "null", "--overrides", SMALL, "--geval.base_url", "http://127.0.0.1:9/v1",
              "--geval.model", "judge", "--geval.cache_path", str(tmp_path / "cache.sqlite")])
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
        main(["evaluate", "--train_config", DEMO, "--run_name", "base", "--base_model", "true", "--output_dir",
              str(out), "--bertscore_model", "an-uncached/model", "--overrides", SMALL])
    message = str(info.value.code)
    assert "'an-uncached/model' is not in the local Hugging Face cache" in message
    assert "offline:all-MiniLM-L6-v2" in message and "null to skip" in message
    assert not out.exists()  # decided before any summary was generated
