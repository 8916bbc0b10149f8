"""evaluate and report through the real entry point, offline, on the demo config."""

import json
from pathlib import Path

import lightning as L
import pytest

import peftcore
from experiments.__main__ import main
from experiments.module import build_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
SMALL = '["--data.limit_test=4", "--model.max_new_tokens=6"]'


def test_evaluate_base_and_adapter_then_report(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    L.seed_everything(0)  # evaluate's CLI seeds 0 too: the same random base
    model = build_model(None, "t5-tiny", True, False, 0.0)
    peftcore.inject(model, peftcore.LoRAConfig(r=16, alpha=32, target_modules=("q", "k", "v", "o", "wi", "wo"),
                                               modules_to_save=("embed_tokens", "lm_head")))
    peftcore.save_adapter(model, tmp_path / "adapter")
    out = str(tmp_path / "eval")
    main(["evaluate", "--train_config", DEMO, "--run_name", "base", "--base_model", "true", "--output_dir", out,
          "--bertscore_model", "null", "--overrides", SMALL])
    main(["evaluate", "--train_config", DEMO, "--run_name", "lora", "--adapter", str(tmp_path / "adapter"),
          "--output_dir", out, "--bertscore_model", "null", "--overrides", SMALL])
    base = json.loads((tmp_path / "eval/base/eval_record.json").read_text())
    lora = json.loads((tmp_path / "eval/lora/eval_record.json").read_text())
    assert base["metrics"]["trainable_params"] == 0 and lora["metrics"]["trainable_params"] > 0
    assert lora["metrics"]["all_params"] > base["metrics"]["all_params"]
    assert set(base["metrics"]) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "memory_footprint"}
    assert "OPENAI_API_KEY is not set" in lora["settings"]["geval"]
    assert len(Path(lora["predictions"]).read_text().splitlines()) == 4
    main(["report", "--records", f"[{out}/base, {out}/lora]", "--base_run", "base", "--out_dir", str(tmp_path / "rep")])
    assert "| trainable_params | 0 |" in capsys.readouterr().out
    assert (tmp_path / "rep/metrics.png").stat().st_size > 0


def test_evaluate_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of ckpt_path, adapter or base_model"):
        main(["evaluate", "--train_config", DEMO, "--run_name", "x"])
