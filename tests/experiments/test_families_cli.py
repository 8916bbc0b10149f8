"""Models of other families through the CLI: a tiny BART and a tiny UMT5 (random weights, saved
with save_pretrained beside the bundled T5 tokenizer) are built in their own classes and go
through fit, test, evaluate and the adapter export, whose file peft opens to the same logits; a
causal or encoder-only model is refused by name."""

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import transformers

import peftcore
from experiments.__main__ import main
from experiments.cli import lightning_cli
from experiments.data import load_tokenizer

pytestmark = pytest.mark.e2e  # whole commands: `pytest -m "not e2e"` skips them

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/configs/demo.yaml")
SMALL = [
    "--data.limit_train=8",
    "--data.limit_val=4",
    "--data.limit_test=2",
    "--data.batch_size=4",
    "--data.max_source_length=64",
    "--data.max_target_length=16",
    "--model.generation.max_new_tokens=4",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
]
# T5's vocabulary and special ids, so the bundled tokenizer fits these random models
IDS = dict(vocab_size=32128, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def tiny_model(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    if kind == "bart":
        config = transformers.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            bos_token_id=0,
            forced_eos_token_id=1,
            **IDS,
        )
        model = transformers.BartForConditionalGeneration(config)
    elif kind == "umt5":
        config = transformers.UMT5Config(
            d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, **IDS
        )
        model = transformers.UMT5ForConditionalGeneration(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **IDS
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=32128
        )
        model = transformers.BertForMaskedLM(config)
    model.save_pretrained(directory)
    load_tokenizer("bundled").save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "kind, targets, cls",
    [
        ("bart", ["q_proj", "v_proj"], transformers.BartForConditionalGeneration),
        ("umt5", ["q", "v"], transformers.UMT5ForConditionalGeneration),
    ],
)
def test_a_model_of_another_family_goes_through_fit_test_evaluate_and_export(
    kind, targets, cls, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path = tiny_model(kind, tmp_path / kind)
    args = [
        "--config",
        DEMO,
        f"--model.pretrained={path}",
        f"--model.peft.init_args.target_modules={json.dumps(targets)}",
        *SMALL,
    ]
    cli = lightning_cli(["fit", *args])
    assert type(cli.model.model) is cls  # not a T5 holding this checkpoint's tensors
    assert cli.datamodule.prefix == ""  # T5's "summarize: " is T5's
    assert cli.datamodule.tokenizer_name == str(path)  # the model directory's own tokenizer
    if kind == "bart":
        assert (
            cli.model.model.config.dropout == cli.model.model.config.attention_dropout == 0.0
        )  # demo.yaml's
    run = tmp_path / "runs/demo/version_0"
    lightning_cli(["test", *args, "--ckpt_path", "last"])
    main(
        [
            "evaluate",
            "--train_config",
            DEMO,
            "--run_name",
            kind,
            "--ckpt_path",
            "last",
            "--bertscore_model",
            "null",
            "--overrides",
            json.dumps(args[2:]),
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    record = json.loads((tmp_path / "eval" / kind / "eval_record.json").read_text())
    assert record["settings"]["examples"] == 2 and "rougeL" in record["metrics"]

    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    ours = peftcore.load_adapter(copy.deepcopy(base), run / "best_adapter").eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), run / "best_adapter").eval()
    batch = {
        "input_ids": torch.randint(2, 32000, (2, 9), generator=torch.Generator().manual_seed(1)),
        "labels": torch.randint(2, 32000, (2, 5), generator=torch.Generator().manual_seed(2)),
    }
    with torch.no_grad():
        trained = ours(**batch).logits
        assert (trained - base(**batch).logits).abs().max() > 0  # the adapter trained: it changes outputs
        assert torch.equal(trained, theirs(**batch).logits)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("llama", r"is a 'llama' model \(LlamaForCausalLM\), a causal \(decoder-only\) language model"),
        ("bert", r"is a 'bert' model \(BertForMaskedLM\), no sequence-to-sequence language model"),
    ],
)
def test_a_causal_or_encoder_only_model_is_refused_by_name(kind, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tiny_model(kind, tmp_path / kind)
    with pytest.raises(SystemExit) as info:
        lightning_cli(["fit", "--config", DEMO, f"--model.pretrained={path}", *SMALL])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) < 10, err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()
