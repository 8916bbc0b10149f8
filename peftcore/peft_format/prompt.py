"""Prompt tuning in peft's files: PromptTuningConfig's fields (and PromptLearningConfig's,
unchanged from 0.17 to 0.21) and ``prompt_embeddings``.

peft stores ``prompt_embeddings`` of ``n * num_transformer_submodules`` rows; for encoder-decoder
models peft allocates 2n and only ever uses the first n (its prompt-tuning forward and generate
prepend ``prompts[:, :n]`` to the encoder input alone), so the decoder half trains nothing.
peftcore's SoftPrompt keeps the n rows that matter and the file gets zeros for the decoder half.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcore.peft_format.base import Format
from peftcore.prompt import PromptTuningConfig, SoftPrompt

PEFT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}
TENSOR = "prompt_embeddings"


class PromptTuningFormat(Format):
    peft_type = "PROMPT_TUNING"
    label = "prompt-tuning"
    names = {
        "prompt_tuning_init": "init",
        "prompt_tuning_init_text": "init_text",
        "tokenizer_name_or_path": "tokenizer",
    }
    implemented = (
        "num_virtual_tokens",
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "token_dim",  # must be the model's d_model
        "num_transformer_submodules",  # 1 or 2 copies of the rows; the encoder uses the first n
    )
    at_default = {"modules_to_save": (None, "modules trained in full next to a prompt")}
    inert = {
        "num_attention_heads": "describes the model; prompt tuning does not use it",
        "num_layers": "describes the model; prompt tuning does not use it",
        "tokenizer_kwargs": "used only by the text init, which the file's prompt replaces",
    }
    trainable_factor = 2  # peft's unused decoder half

    def config_from_peft(self, data: dict, model: nn.Module) -> PromptTuningConfig:
        self.check_fields(data)
        if not isinstance(data.get("num_virtual_tokens"), int):
            raise ValueError(
                f"this prompt-tuning adapter has num_virtual_tokens={data.get('num_virtual_tokens')!r}; peft writes its length"
            )
        if data.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
            raise ValueError(
                f"this prompt-tuning adapter has task_type={data['task_type']!r}; peftcore's prompt goes before a "
                "seq2seq encoder's input (task_type 'SEQ_2_SEQ_LM')"
            )
        d_model = model.get_input_embeddings().weight.shape[1]
        if data.get("token_dim") not in (None, d_model):
            raise ValueError(
                f"this prompt-tuning adapter has token_dim={data['token_dim']}; the model's d_model is {d_model}"
            )
        if data.get("num_transformer_submodules") not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules={data['num_transformer_submodules']!r}: peft writes 1 or 2"
            )
        init = data.get("prompt_tuning_init", "RANDOM")
        if init not in PEFT_INITS:
            raise ValueError(f"prompt_tuning_init={init!r}; peft's inits are {list(PEFT_INITS)}")
        return PromptTuningConfig(
            num_virtual_tokens=data["num_virtual_tokens"],
            init=PEFT_INITS[init],
            init_text=data.get("prompt_tuning_init_text") if init == "TEXT" else None,
            tokenizer=data.get("tokenizer_name_or_path") if init == "TEXT" else None,
        )

    def config_to_peft(self, config: PromptTuningConfig, model: nn.Module) -> dict:
        encoder = model.get_encoder()
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": config.num_virtual_tokens,
            "token_dim": model.get_input_embeddings().weight.shape[1],
            "num_transformer_submodules": 2,  # what peft uses for encoder-decoder models
            "num_attention_heads": getattr(model.config, "num_heads", None),
            "num_layers": len(getattr(encoder, "block", [])) or None,
            "prompt_tuning_init": {v: k for k, v in PEFT_INITS.items()}[config.init],
            "prompt_tuning_init_text": config.init_text,
            "tokenizer_name_or_path": config.tokenizer,
            "tokenizer_kwargs": None,
            "modules_to_save": None,
        }

    def peft_tensors(self, prompt: SoftPrompt) -> dict[str, torch.Tensor]:
        """The live prompt under peft's name (a file's extra decoder rows are dropped on reading)."""
        return {TENSOR: prompt.embedding}

    def saved_tensors(self, prompt: SoftPrompt) -> dict[str, torch.Tensor]:
        """peft's 2n rows: the prompt, then zeros for the decoder half peft never uses."""
        return {TENSOR: torch.cat([prompt.embedding, torch.zeros_like(prompt.embedding)])}

    def read_file_tensors(self, saved: dict[str, torch.Tensor], data: dict) -> dict[str, torch.Tensor]:
        """peft's ``prompt_embeddings`` holds n rows per transformer submodule; the encoder's are the first n."""
        if TENSOR not in saved:
            return saved
        rows, copies = saved[TENSOR].shape[0], data.get("num_transformer_submodules") or 1
        n = data["num_virtual_tokens"]
        if rows != n * copies:
            raise ValueError(
                f"{TENSOR} has {rows} rows; num_virtual_tokens={n} x num_transformer_submodules={copies} "
                f"makes {n * copies}"
            )
        return {**saved, TENSOR: saved[TENSOR][:n]}
