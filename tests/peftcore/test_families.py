"""peftcore/families.py: what depends on the model family follows the model in hand."""

import copy
import json

import peft
import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftcore
from peftcore import families, peft_format
from peftcore.nf4 import NF4Linear
from peftcore.surgery import wrapped_layers
from peftcore.testing import move_off_init, random_t5, t5_batch


def tiny_encoder_decoder(config_class: type, model_class: type) -> transformers.PreTrainedModel:
    """A one-layer BART-shaped model (BART, Pegasus) with random weights."""
    sizes = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32)
    heads = dict(encoder_attention_heads=2, decoder_attention_heads=2)
    return model_class(config_class(vocab_size=128, max_position_embeddings=32, **sizes, **heads))


def tiny_bart() -> transformers.BartForConditionalGeneration:
    return tiny_encoder_decoder(transformers.BartConfig, transformers.BartForConditionalGeneration)


def tiny_pegasus() -> transformers.PegasusForConditionalGeneration:
    return tiny_encoder_decoder(transformers.PegasusConfig, transformers.PegasusForConditionalGeneration)


def test_quantize_keeps_the_familys_full_precision_modules():
    """T5 keeps wo and lm_head in full precision (as transformers does in 4 bit); BART only lm_head:
    its fc2 is quantized, and no module is skipped for a name only T5 has."""
    bart = peftcore.quantize(tiny_bart(), peftcore.NF4Config())
    kept = sorted(n for n, m in bart.named_modules() if type(m) is nn.Linear)
    assert kept == ["lm_head"]
    assert isinstance(bart.get_submodule("model.encoder.layers.0.fc2"), NF4Linear)
    t5 = peftcore.quantize(random_t5(), peftcore.NF4Config())
    kept = {n.rpartition(".")[2] for n, m in t5.named_modules() if type(m) is nn.Linear}
    assert kept == {"wo", "lm_head"}


@pytest.mark.parametrize(
    "method, peft_type, expected",
    [
        ("lora", "LORA", ("q_proj", "v_proj")),
        ("ia3", "IA3", ("q_proj", "v_proj", "fc2")),
    ],
)
def test_a_peft_file_naming_no_targets_takes_peft_default_for_the_family(method, peft_type, expected):
    data = {"peft_type": peft_type, "target_modules": None, "task_type": "SEQ_2_SEQ_LM"}
    config = peft_format.config_from_peft(data, tiny_bart())
    assert config.target_modules == expected
    assert families.of(random_t5()).lora_targets == ("q", "v")


def test_a_peft_file_naming_no_targets_is_refused_for_a_family_peft_has_no_default_for():
    data = {"peft_type": "LORA", "target_modules": None, "task_type": "SEQ_2_SEQ_LM"}
    with pytest.raises(ValueError, match=r"peft has no default for model type 'pegasus': add target_modules"):
        peft_format.config_from_peft(data, tiny_pegasus())


def test_quantizing_t5s_feed_forward_output_computes_with_the_dequantized_weights():
    """T5's feed-forward reads wo.weight.dtype; with wo quantized too (skip only lm_head) the model
    runs, and equals the model holding the dequantized weights in plain Linear layers."""
    model = random_t5()
    quantized = peftcore.quantize(
        copy.deepcopy(model), peftcore.NF4Config(skip_modules=("lm_head",), compute_dtype=torch.float32)
    )
    assert isinstance(quantized.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo"), NF4Linear)
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, NF4Linear):
                model.get_submodule(name).weight.copy_(layer.dequantize(torch.float32))
    batch = t5_batch()
    with torch.no_grad():
        assert torch.equal(quantized(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("build", [random_t5, tiny_bart], ids=["t5", "bart"])
def test_a_copy_of_the_shared_embedding_is_refused_in_every_encoder_decoder(build):
    """T5's shared embedding and BART's model.shared are never called by that name in forward (the
    stacks call their own embed_tokens), so a trained copy of it would change nothing."""
    model = build()
    with pytest.raises(
        ValueError, match=r"selects '(model\.)?shared'.*never used in forward.*'embed_tokens'"
    ):
        peftcore.inject(model, peftcore.LoRAConfig(target_modules=("lm_head",), modules_to_save=("shared",)))
    injected = peftcore.inject(
        build(), peftcore.LoRAConfig(target_modules=("lm_head",), modules_to_save=("embed_tokens",))
    )
    assert sum(p.numel() for p in injected.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize(
    "targets, adapted", [("all-linear", {"c_attn", "c_proj", "c_fc"}), (("c_attn",), {"c_attn"})]
)
def test_gpt2s_conv1d_layers_are_adapted_by_name_and_by_all_linear(targets, adapted):
    """GPT-2's Conv1D layers are linear layers to inject (tests/peftcore/test_conv1d.py checks them
    against peft); all-linear leaves out the output head, an nn.Linear."""
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=16, n_layer=1, n_head=2, vocab_size=100, eos_token_id=0, bos_token_id=0
        )
    )
    peftcore.inject(gpt2, peftcore.LoRAConfig(target_modules=targets))
    layers = dict(wrapped_layers(gpt2))
    assert {name.rsplit(".", 1)[-1] for name in layers} == adapted
    assert all(type(layer.base) is Conv1D for layer in layers.values())


def test_all_linear_on_a_model_with_no_linear_layer_but_its_head_is_refused_by_name():
    class OnlyAHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10)

        def get_output_embeddings(self) -> nn.Module:
            return self.head

    with pytest.raises(ValueError, match=r"'all-linear' selects nothing.*\['Embedding', 'Linear'\]"):
        peftcore.inject(OnlyAHead(), peftcore.LoRAConfig(target_modules="all-linear"))


def tiny_bert_classifier() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64
    )
    return transformers.BertForSequenceClassification(config).eval()


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_the_file_says_the_task_the_model_has_and_peft_opens_it_in_that_class(tmp_path):
    """A Llama adapter is CAUSAL_LM, a BERT classifier's SEQ_CLS (its head trained in full): peft
    opens each in its task's class, to our logits."""
    cases = [
        (
            tiny_llama,
            peftcore.LoRAConfig(r=2, target_modules=("q_proj", "v_proj")),
            "CAUSAL_LM",
            "PeftModelForCausalLM",
        ),
        (
            tiny_bert_classifier,
            peftcore.LoRAConfig(r=2, target_modules=("query", "value"), modules_to_save=("classifier",)),
            "SEQ_CLS",
            "PeftModelForSequenceClassification",
        ),
    ]
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    for build, config, task, peft_class in cases:
        ours = move_off_init(peftcore.inject(build(), config), seed=3)
        peftcore.save_adapter(ours, tmp_path / task)
        saved = json.loads((tmp_path / task / "adapter_config.json").read_text())
        assert saved["task_type"] == task
        theirs = peft.PeftModel.from_pretrained(build(), tmp_path / task).eval()
        assert type(theirs).__name__ == peft_class
        with torch.no_grad():
            assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_peft_seq_cls_file_loads_with_the_head_it_names_for_every_model(tmp_path):
    """peft writes modules_to_save ['classifier', 'score'] into every SEQ_CLS file; a BERT has only
    the classifier: we load the file, with the trained head, to peft's logits."""
    theirs = peft.get_peft_model(
        tiny_bert_classifier(), peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    move_off_init(theirs, seed=4)
    theirs.save_pretrained(tmp_path)
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]) == {
        "classifier",
        "score",
    }
    ours = peftcore.load_adapter(tiny_bert_classifier(), tmp_path).eval()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits)


def test_a_frozen_classification_head_is_said():
    with pytest.warns(UserWarning, match=r"classification head 'classifier' stays frozen.*modules_to_save"):
        peftcore.inject(tiny_bert_classifier(), peftcore.LoRAConfig(r=2, target_modules=("query", "value")))
