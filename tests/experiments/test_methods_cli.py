"""Every method of peftcore.methods through the CLI: fit, a checkpoint that resumes, the peft-format
best adapter, and evaluate, with no change in experiments/ for any of them."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import peftcore
from experiments.__main__ import main
from experiments.cli import lightning_cli
from experiments.model import build_model
from peftcore import methods

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
SMALL = [
    "--data.limit_train=8",
    "--data.limit_val=4",
    "--data.limit_test=2",
    "--data.batch_size=4",
    "--data.max_source_length=64",
    "--model.generation.max_new_tokens=4",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
]
METHODS = {method.name: method for method in methods.METHODS}


def method_argument(method) -> str:
    config = method.config()
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return "--model.peft=" + json.dumps(
        {"class_path": f"{type(config).__module__}.{type(config).__name__}", "init_args": fields}
    )


@pytest.mark.parametrize("name", METHODS)
def test_fit_checkpoint_adapter_and_evaluate(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    method = METHODS[name]
    cli = lightning_cli(["fit", "--config", DEMO, *SMALL, method_argument(method)])
    assert type(cli.model.model.peftcore_config) is method.config
    run = tmp_path / "runs/demo/version_0"
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]  # safe globals suffice
    trainable = {f"model.{n}" for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable

    fresh = build_model("bundled:t5-tiny-dialogue", None, False, False, 0.0)
    peftcore.load_adapter(fresh, run / "best_adapter")
    assert type(fresh.peftcore_config) is method.config

    main(
        [
            "evaluate",
            "--train_config",
            DEMO,
            "--run_name",
            name,
            "--ckpt_path",
            "last",
            "--bertscore_model",
            "null",
            "--overrides",
            json.dumps([*SMALL, method_argument(method)]),
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    record = json.loads((tmp_path / "eval" / name / "eval_record.json").read_text())
    assert record["settings"]["method"] == type(method.config()).__name__
    assert record["metrics"]["trainable_params"] == peftcore.count_parameters(cli.model.model).trainable


def test_a_method_peft_files_cannot_hold_trains_without_the_adapter_export(tmp_path, monkeypatch, caplog):
    """A method with no translator (here LoRA's taken away) fits and checkpoints; best_adapter/,
    which only peft's format could hold, is not written, and the run says so."""
    from peftcore import peft_format

    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(peft_format.FORMATS, methods.LoRA)
    lightning_cli(["fit", "--config", DEMO, *SMALL])
    run = tmp_path / "runs/demo/version_0"
    assert (run / "checkpoints/best.ckpt").exists() and not (run / "best_adapter").exists()
    assert "best_adapter/ is not exported: peft's files cannot hold LoRAConfig" in caplog.text


LORA_GA = "--model.peft=" + json.dumps(
    {
        "class_path": "peftcore.LoRAConfig",
        "init_args": {"r": 4, "alpha": 8, "target_modules": ["q", "v", "wi"], "init": "lora_ga"},
    }
)


def test_lora_ga_starts_from_the_training_batches_and_its_checkpoint_rebuilds_the_start(
    tmp_path, monkeypatch
):
    """fit estimates the gradient on the data module's first batches; the checkpoint keeps A0, B0,
    so a resumed fit and evaluate rebuild the same base W - s B0 A0 without the data."""
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(["fit", "--config", DEMO, *SMALL, LORA_GA, "--model.lora_ga_batches=2"])
    trained = cli.model.model
    layers = list(peftcore.surgery.adapter_layers(trained))
    assert layers and all(layer.init == "lora_ga" for _, layer in layers)
    run = tmp_path / "runs/demo/version_0"
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    start = checkpoint["lora_ga_start"]
    assert sorted(start) == sorted(name for name, _ in layers)
    # The start is the data's: A0 spans the gradient's singular directions, not a random init.
    for name, layer in layers:
        assert torch.equal(start[name]["A"], layer.initial_A)

    # evaluate's way: a module built from the config, the checkpoint loaded: the same model.
    rebuilt = lightning_cli(["--config", DEMO, *SMALL, LORA_GA], run=False).model
    assert rebuilt.pending_lora_ga is not None
    rebuilt.on_load_checkpoint(checkpoint)
    rebuilt.load_state_dict(checkpoint["state_dict"], strict=False)
    for (key, ours), (_, theirs) in zip(trained.state_dict().items(), rebuilt.model.state_dict().items()):
        assert torch.equal(ours, theirs), key

    # A resumed fit takes the checkpoint's start (no second estimate: with one batch it would differ).
    resumed = lightning_cli(
        [
            "fit",
            "--config",
            DEMO,
            *SMALL,
            LORA_GA,
            "--model.lora_ga_batches=1",
            "--trainer.max_epochs=2",
            "--ckpt_path",
            str(run / "checkpoints/last.ckpt"),
        ]
    )
    assert resumed.trainer.current_epoch == 2
    base = next(layer for _, layer in peftcore.surgery.adapter_layers(resumed.model.model)).base.weight
    assert torch.equal(base, layers[0][1].base.weight)

    fresh = build_model("bundled:t5-tiny-dialogue", None, False, False, 0.0)
    peftcore.load_adapter(fresh, run / "best_adapter")  # saved converted: loads over the original base
    assert type(fresh.peftcore_config) is peftcore.LoRAConfig
    for source in (["--adapter", str(run / "best_adapter")], ["--base_model", "true"]):  # no data needed
        name = source[0].removeprefix("--")
        main(["evaluate", "--train_config", DEMO, "--run_name", name, "--bertscore_model", "null",
              "--overrides", json.dumps([*SMALL, LORA_GA]), "--output_dir", str(tmp_path / "eval"), *source])  # fmt: skip
        assert (tmp_path / "eval" / name / "eval_record.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.lora_ga_batches=0"], "lora_ga_batches must be a positive integer"),
        (['--model.quantization={"blocksize": 64}'], "full-precision gradient"),
    ],
)
def test_lora_ga_settings_it_cannot_take_are_named(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        lightning_cli(["--config", DEMO, *SMALL, LORA_GA, *extra], run=False)
    assert message in capsys.readouterr().err


def test_lora_ga_without_a_checkpoint_outside_fit_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="which test does not read: fit first"):
        lightning_cli(["test", "--config", DEMO, *SMALL, LORA_GA])


LOFTQ = "--model.peft=" + json.dumps(
    {
        "class_path": "peftcore.LoRAConfig",
        "init_args": {"r": 4, "alpha": 4, "target_modules": ["q", "v"], "init": "loftq", "loftq_iter": 2},
    }
)
LOFTQ_NF4 = '--model.quantization={"blocksize": 64, "double_quant": false, "compute_dtype": "torch.float32"}'


def test_loftq_quantizes_its_targets_and_model_quantization_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(["fit", "--config", DEMO, *SMALL, LOFTQ, LOFTQ_NF4])
    model = cli.model.model
    layers = dict(peftcore.surgery.adapter_layers(model))
    assert layers and all(isinstance(layer.base, peftcore.NF4Linear) for layer in layers.values())
    others = [m for n, m in model.named_modules() if n.endswith((".k", ".o", ".wi"))]
    assert others and all(isinstance(m, peftcore.NF4Linear) for m in others)
    # The start is LoftQ's: rebuilt from the original weights, the checkpoint's A and B on top.
    fresh = build_model("bundled:t5-tiny-dialogue", None, False, False, 0.0)
    run = tmp_path / "runs/demo/version_0"
    peftcore.load_adapter(fresh, run / "best_adapter")  # re-runs LoftQ; refused if Q came out different
    assert fresh.peftcore_config.init == "loftq" and fresh.peftcore_config.loftq_iter == 2

    rebuilt = lightning_cli(["--config", DEMO, *SMALL, LOFTQ, LOFTQ_NF4], run=False).model
    checkpoint = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    rebuilt.on_load_checkpoint(checkpoint)
    rebuilt.load_state_dict(checkpoint["state_dict"], strict=False)
    for (key, ours), (_, theirs) in zip(model.state_dict().items(), rebuilt.model.state_dict().items()):
        assert torch.equal(ours, theirs), key


def test_loftq_on_every_linear_the_quantization_would_take_leaves_it_nothing_to_do(tmp_path, monkeypatch):
    """The demo's targets (q, k, v, o, wi, wo): LoftQ quantizes them all; wo and lm_head stay as
    model.quantization's skip list keeps them, and no error says there was nothing left."""
    monkeypatch.chdir(tmp_path)
    loftq = ["--model.peft.init_args.init=loftq", LOFTQ_NF4]
    model = lightning_cli(["--config", DEMO, *SMALL, *loftq], run=False).model.model
    layers = dict(peftcore.surgery.adapter_layers(model))
    assert len(layers) == 2 * 6 + 2 * 10 and all(
        isinstance(x.base, peftcore.NF4Linear) for x in layers.values()
    )
    assert not isinstance(model.lm_head, peftcore.NF4Linear)


def test_loftq_with_other_nf4_settings_for_the_rest_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        lightning_cli(
            ["--config", DEMO, *SMALL, LOFTQ, '--model.quantization={"double_quant": true}'], run=False
        )
    assert "no double quantization" in capsys.readouterr().err


def test_evaluate_and_predict_take_several_adapters_over_one_loaded_base(tmp_path, monkeypatch):
    import transformers

    from peftcore.testing import move_off_init

    monkeypatch.chdir(tmp_path)
    directories = {}
    for seed, (name, config) in enumerate(
        {
            "lora": peftcore.LoRAConfig(r=4, alpha=8, target_modules=("q", "v")),
            "ia3": peftcore.IA3Config(target_modules=("k", "v", "wo"), feedforward_modules=("wo",)),
        }.items()
    ):
        model = peftcore.inject(build_model("bundled:t5-tiny-dialogue", None, False, False, 0.0), config)
        move_off_init(model, seed + 1, scale=0.5)
        peftcore.save_adapter(model, tmp_path / name)
        directories[name] = str(tmp_path / name)

    loads = []
    load = transformers.AutoModelForSeq2SeqLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForSeq2SeqLM,
        "from_pretrained",
        lambda *a, **k: loads.append(a) or load(*a, **k),
    )
    common = ["--train_config", DEMO, "--bertscore_model", "null", "--overrides", json.dumps(SMALL)]
    main(["evaluate", *common, "--adapters", json.dumps(directories), "--output_dir", "together"])
    assert len(loads) == 1  # one base for both adapters
    for name in directories:  # each as evaluate of that adapter alone computes it
        main(
            ["evaluate", "--train_config", DEMO, "--bertscore_model", "null", "--adapter", directories[name],
             "--overrides", json.dumps([*SMALL, "--model.peft=null"]), "--output_dir", "alone", "--run_name", name]
        )  # fmt: skip
        together = json.loads((tmp_path / "together" / name / "eval_record.json").read_text())
        alone = json.loads((tmp_path / "alone" / name / "eval_record.json").read_text())
        assert together["run"] == name and together["settings"]["adapter"] == directories[name]
        assert together["metrics"]["trainable_params"] == alone["metrics"]["trainable_params"]
        assert Path(together["predictions"]).read_text() == Path(alone["predictions"]).read_text()

    cli = lightning_cli(
        [
            "predict",
            "--config",
            DEMO,
            *SMALL,
            "--model.peft=null",
            "--model.adapters",
            json.dumps(directories),
        ]
    )
    assert peftcore.adapter_names(cli.model.model) == list(directories)
    (written,) = (tmp_path / "runs").rglob("predictions.jsonl")
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    record = json.loads((tmp_path / "alone/ia3/eval_record.json").read_text())
    alone = [json.loads(line) for line in Path(record["predictions"]).read_text().splitlines()]
    assert rows and all(row["predictions"].keys() == directories.keys() for row in rows)
    assert any(row["predictions"]["lora"] != row["predictions"]["ia3"] for row in rows)  # two adapters
    assert [row["predictions"]["ia3"] for row in rows] == [row["prediction"] for row in alone]
