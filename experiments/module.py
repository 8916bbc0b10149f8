"""Seq2SeqFineTuner: one LightningModule for every method (full, LoRA, QLoRA, IA3, ...).

The model is built (experiments/model.py), optionally quantized, then given an adapter, all in
``__init__``:

    from_pretrained(name | path)  or  T5 config of a named shape with random weights (explicit)
    -> peftcore.quantize(model, NF4Config)      (QLoRA)
    -> peftcore.inject(model, the method's config)   (any of peftcore.methods.METHODS)

The module holds the steps, generation and the optimizer; what is not a step comes with it as
callbacks (experiments/callbacks.py: the place inside an epoch for resuming, step timing, the
best adapter's export, the predictions file). Checkpoints hold only what trains (plus optimizer,
scheduler, loop and callback state), so a t5-base LoRA checkpoint is megabytes; the frozen base
is rebuilt from the same settings on resume.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.tensor import DTensor

import peftcore
from experiments.callbacks import BestAdapterExport, PredictionWriter, StepTimer, TrainingPlace
from experiments.data import set_sampler_epoch
from experiments.metrics import ROUGE_KEYS, Rouge
from experiments.model import (
    MethodConfig,
    build_model,
    check_model_source,
    method_fields,
    with_tokenizer_path,
)
from experiments.settings import GenerationSettings, OptimizerSettings, settings_of
from peftcore import methods, peft_format
from peftcore.config import NF4Config
from peftcore.loftq import LOFTQ_BLOCKSIZE
from peftcore.lora_ga import estimate_gradients, starting_factors, use_starting_factors
from peftcore.loraplus import param_groups
from peftcore.matching import select_targets
from peftcore.sharding import gathered_for_generate, is_sharded, shard
from peftcore.surgery import adapter_layers

LORA_GA_START = "lora_ga_start"  # a checkpoint's key for LoRA-GA's starting factors


class Seq2SeqFineTuner(L.LightningModule):
    """Fine-tunes a T5 model for summarisation with full fine-tuning or any peftcore method.

    Args:
        pretrained: hub name (``google-t5/t5-base``) or local directory of real weights.
        shape: build from a config instead: ``t5-tiny`` | ``t5-small`` | ``t5-base``.
        random_init: must be true with ``shape``: random weights are only ever asked for.
        gated: with ``shape``, the gated feed-forward of T5 v1.1 / flan-t5.
        dropout_rate: override the model's dropout (None keeps the model's own).
        peft: the method's config, e.g. ``{class_path: peftcore.LoRAConfig, init_args: {r: 8}}``;
            None trains every weight (full fine-tuning). The methods and their fields:
            {method_fields}. ``--model.peft.help <config>`` describes each field.
        quantization: an NF4Config to quantize the frozen base first (QLoRA); None keeps it as loaded.
        optimizer: the optimizer and its schedule (``OptimizerSettings``: name, lr, weight_decay,
            betas, warmup_ratio, loraplus_lr_ratio, gpu_budget_bytes).
        gradient_checkpointing: recompute activations in backward to save memory.
        compile: ``torch.compile`` the loss (forward and backward; generation stays eager), with
            dynamic shapes so that batches of new lengths do not recompile. The first training
            step includes the compilation: its seconds are logged as ``train/first_step_s``.
        generation: how summaries are generated in validation, test and predict
            (``GenerationSettings``: num_beams, max_new_tokens).
        generate_in_validation: score ROUGE on generated summaries in validation (slower).
        export_best_adapter: after each validation with a new best loss, save the adapter in
            peft's format to ``<log_dir>/best_adapter``.
        predictions_path: where ``predict`` writes JSONL ``{id, dialogue, reference, prediction}``
            (a file given here is replaced); default ``<log_dir>/predictions.jsonl``, then
            ``predictions-2.jsonl`` and so on for later predicts on the run (none replaced).
        lora_ga_batches: with LoRA's ``init: lora_ga``, how many training batches (the first of the
            seeded order) estimate the weights' gradient when ``fit`` starts; the starting factors
            are kept in every checkpoint, so a resumed run or an evaluated checkpoint rebuilds the
            same start without the data.
        adapters: several adapters over one base, ``{name: directory}`` (peft's format), each
            loaded by name into the bare base (``peft`` must be null): ``predict`` writes each
            dialogue's summary by every adapter (``predictions: {name: summary}``). ``evaluate
            --adapters`` scores each as a run.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        shape: str | None = None,
        random_init: bool = False,
        gated: bool = False,
        dropout_rate: float | None = None,
        peft: MethodConfig | None = None,
        quantization: NF4Config | None = None,
        optimizer: OptimizerSettings = OptimizerSettings(),  # noqa: B008 (frozen: one shared default is safe)
        gradient_checkpointing: bool = False,
        compile: bool = False,
        generation: GenerationSettings = GenerationSettings(),  # noqa: B008 (frozen)
        generate_in_validation: bool = True,
        export_best_adapter: bool = True,
        predictions_path: str | None = None,
        lora_ga_batches: int = 8,
        adapters: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        # Logged once, by on_fit_start, with the efficiency figures (not also by the Trainer).
        self.save_hyperparameters(logger=False)
        self.optimizer_settings = settings_of(OptimizerSettings, optimizer, "optimizer")
        self.generation = settings_of(GenerationSettings, generation, "generation")
        self.check_settings(
            pretrained=pretrained,
            shape=shape,
            random_init=random_init,
            dropout_rate=dropout_rate,
            peft=peft,
            quantization=quantization,
            lora_ga_batches=lora_ga_batches,
            adapters=adapters,
            gradient_checkpointing=gradient_checkpointing,
        )
        # from_pretrained returns a model in eval mode, and Lightning keeps modules' modes: in train
        # mode, dropout is on while training (Lightning switches to eval for validation and back).
        self.model = build_model(pretrained, shape, random_init, gated, dropout_rate).train()
        if quantization is not None:
            # LoftQ quantizes its targets itself (from their full-precision weights), in inject.
            loftq_targets = select_targets(self.model, peft) if getattr(peft, "init", None) == "loftq" else ()
            peftcore.quantize(self.model, quantization, keep=loftq_targets)
        # LoRA-GA starts from the data's gradient: injected in setup (fit) or from a checkpoint's
        # starting factors (on_load_checkpoint), whichever comes first.
        self.pending_lora_ga = peft if getattr(peft, "init", None) == "lora_ga" else None
        if peft is not None and self.pending_lora_ga is None:
            peftcore.inject(self.model, with_tokenizer_path(peft))
        for name, directory in (adapters or {}).items():
            peftcore.load_adapter(self.model, directory, name=name)
            peftcore.set_adapter(self.model, next(iter(adapters)))
        if quantization is not None and getattr(peft, "init", None) == "loftq":
            for _, layer in adapter_layers(self.model):
                layer.base.compute_dtype = quantization.compute_dtype  # as the rest of the 4-bit base
        if gradient_checkpointing:
            # Non-reentrant checkpointing lets gradients reach the adapter even when the
            # checkpointed block's inputs (frozen embeddings) do not require grad.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._loss = torch.compile(self._model_loss, dynamic=True) if compile else self._model_loss
        self.strict_loading = False  # checkpoints hold only the trainable part
        self.val_rouge, self.test_rouge = Rouge(), Rouge()
        self._efficiency: dict[str, float] | None = None

    @classmethod
    def check_settings(cls, **settings: Any) -> None:
        """Every check the constructor makes before it builds anything, for ``settings`` (any of
        its arguments; the rest at their defaults): a sweep checks each value of its space so."""
        given = inspect.signature(cls.__init__).bind(None, **settings)
        given.apply_defaults()
        a = given.arguments
        check_model_source(a["pretrained"], a["shape"], a["random_init"])
        if a["adapters"] is not None and (a["peft"] is not None or not a["adapters"]):
            raise ValueError(
                "model.adapters loads several adapters into the bare base: set model.peft to null (each adapter's "
                f"adapter_config.json says what it is), and name at least one; got adapters={a['adapters']!r}"
            )
        method = methods.for_config(a["peft"]) if type(a["peft"]) in methods.config_classes() else None
        if a["gradient_checkpointing"] and method is not None and not method.supports_gradient_checkpointing:
            raise ValueError(
                f"model.gradient_checkpointing with {method.name}: the method does not work with recomputed "
                "activations (prefix tuning's cache is dropped inside checkpointed blocks); set it to false"
            )
        if getattr(a["peft"], "init", None) == "lora_ga":
            check_lora_ga(a["peft"], a["quantization"], a["lora_ga_batches"])
        if getattr(a["peft"], "init", None) == "loftq":
            check_loftq(a["quantization"])
        if a["dropout_rate"] is not None and not 0.0 <= a["dropout_rate"] < 1.0:
            raise ValueError(
                f"model.dropout_rate must be in [0, 1), or null to keep the model's own, got {a['dropout_rate']!r}"
            )
        settings_of(OptimizerSettings, a["optimizer"], "optimizer")  # a group checks itself when made
        settings_of(GenerationSettings, a["generation"], "generation")

    # --- reports ------------------------------------------------------------------------------

    def reset_efficiency(self) -> None:
        """Count again at the next ``efficiency()`` (another adapter was made active)."""
        self._efficiency = None

    def efficiency(self) -> dict[str, float]:
        """Parameter counts and footprint of the whole model; under FSDP those taken before it was
        sharded (FSDP1 leaves each rank's parameters as slices of its shard, some empty)."""
        if self._efficiency is not None:
            return self._efficiency
        counts = peftcore.count_parameters(self.model)
        stored = peftcore.count_parameters(self.model, stored=True)
        return {
            "all_params": counts.total,
            "trainable_params": counts.trainable,
            "trainable_params_percent": counts.trainable_percent,
            "memory_footprint": peftcore.memory_footprint(self.model) / 2**30,
            # The study's convention (transformers' num_parameters / get_memory_footprint over
            # bitsandbytes): a 4-bit weight as its stored elements, no quantization state.
            "all_params_stored": stored.total,
            "trainable_percent_stored": stored.trainable_percent,
            "memory_footprint_stored": peftcore.memory_footprint(self.model, quantization_state=False)
            / 2**30,
        }

    # --- sharded training (FSDP2 through ModelParallelStrategy; FSDP1) --------------------------

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``--trainer.strategy fsdp2``): shard the model across
        the data-parallel ranks with FSDP2 (peftcore.sharding: each block a unit, the 4-bit base
        included). Other strategies: nothing to do here."""
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.model):
            return
        tensor_parallel = (
            mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
        )
        if tensor_parallel != 1:
            raise ValueError(
                f"ModelParallelStrategy with tensor_parallel_size={tensor_parallel}: peftcore shards data-parallel "
                "only (FSDP2). Use --trainer.strategy fsdp2, or tensor_parallel_size=1 and data_parallel_size=<devices>"
            )
        self._efficiency = self.efficiency()
        shard(self.model, mesh["data_parallel"])

    def setup(self, stage: str) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy) and self.hparams.quantization is not None:
            raise ValueError(
                "--trainer.strategy fsdp (FSDP1) cannot shard a 4-bit base: it flattens each unit's parameters into "
                "one tensor of one dtype, and the packed weights are uint8. Use --trainer.strategy fsdp2, which "
                "shards the 4-bit base across the ranks, or ddp"
            )
        if isinstance(self.trainer.strategy, FSDPStrategy):
            self._efficiency = self.efficiency()  # before FSDP1 wraps the model into flat shards

    def configure_callbacks(self) -> list[L.Callback]:
        """What comes with this module, whatever the Trainer is given: the resumable place inside
        an epoch, step timing, the best adapter's export (for a method) and the predictions file."""
        callbacks: list[L.Callback] = [TrainingPlace(), StepTimer(compiled=self.hparams.compile)]
        method = getattr(self.model, "peftcore_config", None) or self.pending_lora_ga
        if self.hparams.export_best_adapter and method is not None:
            if peft_format.holds(method):
                callbacks.append(BestAdapterExport())
            elif self.trainer is not None and self.trainer.state.fn == "fit":
                rank_zero_info(
                    f"best_adapter/ is not exported: peft's files cannot hold {type(method).__name__} "
                    "(no translator in peftcore.peft_format); best.ckpt holds the best state"
                )
        return [*callbacks, PredictionWriter(self.hparams.predictions_path)]

    def on_fit_start(self) -> None:
        stats = self.efficiency()
        counts = peftcore.ParamCount(int(stats["all_params"]), int(stats["trainable_params"]))
        rank_zero_info(f"{counts} || memory footprint: {stats['memory_footprint']:.4f} GiB")
        # A sweep's trial logs its own HParams session (its swept values: experiments.sweep_views).
        sweep_trial = any(
            getattr(callback, "logs_hyperparameters", False) for callback in self.trainer.callbacks
        )
        if not sweep_trial:
            data = getattr(self.trainer, "datamodule", None)
            hparams = {**(data.hparams if data is not None else {}), **self.hparams}
            figures = {f"params/{k}": v for k, v in stats.items()}
            for logger in self.loggers:  # TensorBoard, and W&B where the config lists it
                if isinstance(logger, TensorBoardLogger):  # its HParams view: settings and metrics
                    logger.log_hyperparams(hparams, figures)
                else:
                    logger.log_hyperparams({**hparams, **figures})

    # --- LoRA-GA: a start from the training data's gradient -----------------------------------

    # A LoRA-GA start comes from a checkpoint (on_load_checkpoint, which Lightning calls before the
    # optimizer is made) or, in a fresh fit, from the data when the optimizer is made; a command
    # that reaches its loop with the start still pending has neither.
    def on_validation_start(self) -> None:
        self._refuse_pending_start("validate")

    def on_test_start(self) -> None:
        self._refuse_pending_start("test")

    def on_predict_start(self) -> None:
        self._refuse_pending_start("predict")

    def _refuse_pending_start(self, command: str) -> None:
        if self.pending_lora_ga is not None:
            raise ValueError(
                f"init='lora_ga' starts from the training data's gradient, which {command} does not read: fit first, "
                "then give the run's checkpoint (--ckpt_path), or load its exported best_adapter"
            )

    def forget_pending_start(self) -> None:
        """Build no LoRA-GA start (evaluate loads an exported adapter, or scores the bare base)."""
        self.pending_lora_ga = None

    def _start_lora_ga(self) -> None:
        """Estimate the targets' gradient on the first ``lora_ga_batches`` training batches, then
        inject LoRA-GA (peftcore.lora_ga) on the device the run trains on."""
        config, batches = self.pending_lora_ga, self.hparams.lora_ga_batches
        if self.trainer.world_size > 1:
            raise ValueError(
                f"init='lora_ga' estimates its start in one process; this run has {self.trainer.world_size}. "
                "Fit on one device, or use another init"
            )
        strategy = self.trainer.strategy
        self.model.to(strategy.root_device)
        loader = self.trainer.datamodule.train_dataloader()

        def train_step() -> None:
            for batch in itertools.islice(loader, batches):
                batch = strategy.batch_to_device(batch)
                with self.trainer.precision_plugin.forward_context():
                    loss = self._model_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
                loss.backward()

        estimate_gradients(self.model, config, train_step)
        self._inject_pending()
        rank_zero_info(f"LoRA-GA: started from the gradient of {batches} training batches")

    def _inject_pending(self) -> None:
        peftcore.inject(self.model, self.pending_lora_ga)
        self.pending_lora_ga = None

    # --- steps --------------------------------------------------------------------------------

    def forward(self, batch: dict) -> torch.Tensor:
        return self._loss(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def _model_loss(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    def on_train_epoch_start(self) -> None:
        # Lightning seeds the sampler with its count of finished epochs, which is one short when a
        # run resumes from a checkpoint written at an epoch's end: the resumed epoch would replay
        # the previous one's order. current_epoch is right in both cases. (A run resumed inside an
        # epoch continues it without this hook: its loader's load_state_dict places it.)
        set_sampler_epoch(self.trainer.train_dataloader, self.current_epoch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        size = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/padding_fraction", batch["padding_fraction"], batch_size=size)
        return loss

    def _evaluate(self, batch: dict, stage: str, rouge: Rouge, generate: bool) -> None:
        size = len(batch["ids"])
        self.log(f"{stage}/loss", self(batch), prog_bar=True, batch_size=size, sync_dist=True)
        if generate:
            rouge.update(self.generate_summaries(batch), batch["references"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_rouge, self.hparams.generate_in_validation)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_rouge, True)

    def _log_rouge(self, stage: str, rouge: Rouge) -> None:
        if rouge.update_count == 0:
            return
        scores = rouge.compute()
        for key in ROUGE_KEYS:
            self.log(f"{stage}/{key}", scores[key].float(), prog_bar=key == "rougeL", sync_dist=False)
        rouge.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_rouge("val", self.val_rouge)

    def on_test_epoch_end(self) -> None:
        self._log_rouge("test", self.test_rouge)

    @torch.no_grad()
    def generate_summaries(self, batch: dict) -> list[str]:
        with gathered_for_generate(self.trainer.strategy.model):
            tokens = self.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                num_beams=self.generation.num_beams,
                max_new_tokens=self.generation.max_new_tokens,
            )
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer(self):
        return self.trainer.datamodule.tokenizer

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One row per dialogue (written to a JSONL file by ``PredictionWriter``); with
        ``adapters``, each dialogue's summary by each adapter."""
        if self.hparams.adapters:
            by_adapter = {}
            for name in self.hparams.adapters:
                peftcore.set_adapter(self.model, name)
                by_adapter[name] = self.generate_summaries(batch)
            peftcore.set_adapter(self.model, next(iter(self.hparams.adapters)))
            return [
                {
                    "id": i,
                    "dialogue": src,
                    "reference": refs[0] if len(refs) == 1 else refs,
                    "predictions": {name: summaries[k] for name, summaries in by_adapter.items()},
                }
                for k, (i, src, refs) in enumerate(zip(batch["ids"], batch["sources"], batch["references"]))
            ]
        return [
            {"id": i, "dialogue": src, "reference": refs[0] if len(refs) == 1 else refs, "prediction": pred}
            for i, src, refs, pred in zip(
                batch["ids"], batch["sources"], batch["references"], self.generate_summaries(batch)
            )
        ]

    # --- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        if self.pending_lora_ga is not None:  # a fresh fit (a resumed one took the checkpoint's start)
            self._start_lora_ga()
        settings = self.optimizer_settings
        groups = param_groups(self.model, settings.lr, settings.weight_decay, settings.loraplus_lr_ratio)
        if settings.name == "paged_adamw":
            optimizer = peftcore.PagedAdamW(
                groups,
                lr=settings.lr,
                betas=tuple(settings.betas),
                gpu_budget_bytes=settings.gpu_budget_bytes,
            )
        else:
            optimizer = torch.optim.AdamW(
                groups, lr=settings.lr, betas=tuple(settings.betas), **self._adamw_kernel()
            )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * settings.warmup_ratio)

        def linear_warmup_then_decay(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_then_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _adamw_kernel(self) -> dict[str, bool]:
        """torch's fused AdamW (one kernel for every tensor, on the CPU and CUDA; what the HF Trainer
        uses by default), except where Lightning refuses it: it does not clip gradients for an
        optimizer that unscales them itself under mixed precision. There the multi-tensor one."""
        clips = bool(self.trainer.gradient_clip_val)
        mixed = str(self.trainer.precision).endswith("-mixed")
        return {"foreach": True} if clips and mixed else {"fused": True}

    # --- checkpoints: the trainable part only -------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        start = starting_factors(self.model)
        if start:  # LoRA-GA's A0 and B0: the base the adapter trains over is W - s B0 A0
            checkpoint[LORA_GA_START] = start
        trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if any(isinstance(v, DTensor) for v in checkpoint["state_dict"].values()):
            raise ValueError(
                "the strategy saves sharded checkpoints (ModelParallelStrategy(save_distributed_checkpoint=True)): "
                "peftcore writes whole tensors only, which load on any number of devices. Use --trainer.strategy "
                "fsdp2, or ModelParallelStrategy(save_distributed_checkpoint=False)"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.pending_lora_ga is not None:
            if LORA_GA_START not in checkpoint:
                raise ValueError(
                    "the model is LoRA-GA (init='lora_ga') but the checkpoint holds no LoRA-GA starting factors: "
                    "it was written by another method or init; give the config it was trained with"
                )
            use_starting_factors(self.model, self.pending_lora_ga, checkpoint[LORA_GA_START])
            self._inject_pending()
        expected = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        # Under FSDP the strategy has loaded the tensors into the shards itself and handed on the
        # rest: the keys are read again from the file (memory-mapped, nothing copied).
        saved = (
            checkpoint["state_dict"] if "state_dict" in checkpoint else _saved_keys(self.trainer.ckpt_path)
        )
        missing = sorted(expected - saved.keys())
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} trainable tensors of this model (first: {missing[0]!r}); "
                "was it written with another peft method, target_modules or model?"
            )


def check_lora_ga(peft: MethodConfig, quantization: NF4Config | None, batches: int) -> None:
    """What LoRA-GA through the CLI needs, checked before anything is built."""
    if quantization is not None:
        raise ValueError(
            "init='lora_ga' needs the full-precision gradient of the base weights, and model.quantization makes "
            "them 4-bit: drop model.quantization, or use another init for QLoRA"
        )
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"model.lora_ga_batches must be a positive integer, got {batches!r}")


def check_loftq(quantization: NF4Config | None) -> None:
    """LoftQ quantizes its targets as peft's LoftQ does; the rest of the base must match them."""
    if quantization is not None and (quantization.blocksize != LOFTQ_BLOCKSIZE or quantization.double_quant):
        raise ValueError(
            f"init='loftq' quantizes its targets with blocksize {LOFTQ_BLOCKSIZE} and no double quantization "
            f"(peft's LoftQ); model.quantization has blocksize {quantization.blocksize}, double_quant "
            f"{quantization.double_quant}. Set blocksize {LOFTQ_BLOCKSIZE} and double_quant false so the whole base is "
            "quantized alike, or quantization null to quantize only the targets"
        )


def _saved_keys(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["state_dict"]


# fit --help shows the docstring: the method list in it comes from peftcore.methods.
Seq2SeqFineTuner.__doc__ = Seq2SeqFineTuner.__doc__.replace("{method_fields}", method_fields())
