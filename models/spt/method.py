"""The SPT job on smile.runtime: data, a T5 (random tiny or ``from_pretrained``) with the bank,
training through the Trainer (the bank in its own lr group), zero-shot rank classification.

Setting A (multitask): train on ``data.tasks``, evaluate rank classification on the training
tasks and zero-shot on ``data.heldout``. Setting B (glue2superglue): stage 1 pretrains the bank
with the LM frozen on ``data``; stage 2 starts from that bank and fine-tunes on ``finetune_data``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smile.models.spt.config import DataConfig, JobConfig
from smile.models.spt.data import (
    TEMPLATES,
    Batches,
    all_texts,
    collate,
    encode,
    load_task,
    word_tokenizer,
)
from smile.models.spt.model import BANK_PARAMS, SPTModel
from smile.models.spt.rank import rank_classify
from smile.moe.layer import MoELayer
from smile.moe.topology import Topology
from smile.runtime import TrainConfig, Trainer, init_distributed
from smile.runtime.config import ParamGroupConfig


def with_bank_group(train: TrainConfig, lr_scale: float) -> TrainConfig:
    """The bank's own parameter group (runtime ``ParamGroupConfig``: lr = optimizer lr × scale),
    added to every optimizer that has no group for it yet."""
    optimizers = []
    for opt in train.optimizers:
        has = any(set(g.params) & set(BANK_PARAMS) for g in opt.groups)
        groups = opt.groups if has else [ParamGroupConfig(list(BANK_PARAMS), lr_scale=lr_scale), *opt.groups]
        optimizers.append(dataclasses.replace(opt, groups=groups))
    return dataclasses.replace(train, optimizers=optimizers)


def routing_metrics(model: SPTModel) -> dict[str, float]:
    """Retrieval (prompt routing) and expert routing, logged apart."""
    out: dict[str, float] = {}
    if model.last_retrieval is not None:
        entropy = model.last_retrieval.entropy().mean()
        out["retrieval_entropy"] = float(entropy)
        out["retrieval_max_alpha"] = float(model.last_retrieval.alpha.max(-1).values.mean())
    stats = [m.last_stats for m in model.modules() if isinstance(m, MoELayer) and m.last_stats is not None]
    if stats:
        loads = torch.stack(
            [s.tokens_per_expert.float() / s.tokens_per_expert.sum().clamp_min(1) for s in stats]
        )
        out["moe_max_expert_load"] = float(loads.max(-1).values.mean())
        out["moe_dropped_fraction"] = sum(s.dropped_fraction for s in stats) / len(stats)
    return out


def loss_fn(model: SPTModel, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
    """Seq2seq CE on the target verbalisation; the Trainer adds the MoE aux loss itself."""
    out = model(batch["input_ids"], batch["attention_mask"], batch["prompt_token_mask"], batch["labels"])
    return out.loss, {"samples": batch["input_ids"].shape[0], **routing_metrics(model)}


class Experiment:
    """One job's tokenizer and encoded data, prepared once; builds, trains and evaluates models."""

    def __init__(
        self,
        job: JobConfig,
        topology: Topology | None = None,
        data: DataConfig | None = None,
        vocabulary: list[str] | None = None,
    ) -> None:
        """``vocabulary``: extra texts the word-level tokenizer of a random LM must cover."""
        job.validate()
        self.job, self.data = job, data or job.data
        self.topology = topology if topology is not None else init_distributed(job.train.dist)
        seed = job.train.seed
        self.raw = {
            "train": [r for t in self.data.tasks for r in load_task(t, self.data, "train", seed)],
            "eval": {t: load_task(t, self.data, "eval", seed) for t in self.data.tasks + self.data.heldout},
        }
        if job.spt.backbone_path is None:
            texts = all_texts(self.raw["train"] + [r for rows in self.raw["eval"].values() for r in rows])
            texts += vocabulary or []
            self.tokenizer = word_tokenizer(texts)
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(job.spt.backbone_path)
        enc = dict(
            tokenizer=self.tokenizer,
            max_length=self.data.max_length,
            max_target_length=self.data.max_target_length,
        )
        self.train_examples = [encode(r, **enc) for r in self.raw["train"]]
        self.eval_examples = {t: [encode(r, **enc) for r in rows] for t, rows in self.raw["eval"].items()}

    def backbone(self) -> nn.Module:
        from transformers import T5Config, T5ForConditionalGeneration

        path = self.job.spt.backbone_path
        if path is not None:
            return T5ForConditionalGeneration.from_pretrained(path)
        tok = self.tokenizer
        return T5ForConditionalGeneration(
            T5Config(
                **self.job.model.random_config,
                vocab_size=len(tok),
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                decoder_start_token_id=tok.pad_token_id,
            )
        )

    def build(self, spt=None) -> SPTModel:
        """A fresh model, identical on every rank (MoE-swapped if configured)."""
        spt = spt or self.job.spt
        torch.manual_seed(self.job.train.seed)
        backbone = self.backbone()
        if self.job.model.moe is not None:
            from smile.hf import moefy

            moefy(backbone, self.job.model.moe, self.topology)
        model = SPTModel(backbone, spt)
        if spt.init_bank:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(spt.init_bank), strict=False)
        longest = max(len(e["input_ids"]) for e in self.train_examples)
        model.check_length(longest)
        return model

    def trainer(self, model: SPTModel, train: TrainConfig | None = None) -> Trainer:
        train = with_bank_group(train or self.job.train, model.cfg.bank_lr_scale)
        mbs, pad_id, seed = train.micro_batch_size, self.tokenizer.pad_token_id, train.seed
        return Trainer(
            model,
            loss_fn,
            train,
            lambda rank, world: Batches(self.train_examples, mbs, pad_id, rank, world, True, seed),
            eval_data=lambda rank, world: [],
            topology=self.topology,
            eval_fn=lambda m, b, ctx: self.evaluate(m),
        )

    @torch.no_grad()
    def evaluate(self, model: SPTModel, batch_size: int = 32) -> dict[str, float]:
        """Rank-classification accuracy and retrieval entropy per task (held-out tasks are
        zero-shot); every rank scores every example (small eval sets) so no gather is needed."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out: dict[str, float] = {}
        for task, examples in self.eval_examples.items():
            correct, entropies = 0, []
            for i in range(0, len(examples), batch_size):
                chunk = examples[i : i + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk, self.tokenizer.pad_token_id).items()}
                preds = rank_classify(model, batch, [e["choice_ids"] for e in chunk])
                model.encoder_inputs(batch["input_ids"], batch["attention_mask"], batch["prompt_token_mask"])
                entropies.append(model.last_retrieval.entropy())
                correct += sum(int(p == e["gold"]) for p, e in zip(preds, chunk))
            kind = "heldout" if task in self.data.heldout else "train"
            out[f"{kind}/{task}/accuracy"] = correct / len(examples)
            out[f"{kind}/{task}/retrieval_entropy"] = float(torch.cat(entropies).mean())
        out["log_bank_size"] = math.log(model.cfg.bank_size)
        model.train(was_training)
        return out

    def alpha_by_task(self, model: SPTModel) -> dict[str, torch.Tensor]:
        """Mean retrieval weights α per task (which memory prompts each template uses)."""
        device = next(model.parameters()).device
        out = {}
        for task, examples in self.eval_examples.items():
            batch = collate(examples[:64], self.tokenizer.pad_token_id)
            model.encoder_inputs(
                *(batch[k].to(device) for k in ("input_ids", "attention_mask", "prompt_token_mask"))
            )
            out[task] = model.last_retrieval.alpha.mean(0).cpu()
        return out

    def run(self, train: TrainConfig | None = None, spt=None, save: bool = True) -> dict[str, Any]:
        """Train one model; returns eval metrics and losses; saves the bank (+ results.json)."""
        train = train or self.job.train
        model = self.build(spt)
        result = self.trainer(model, train).fit()
        summary = {"eval": result.eval_metrics, "steps": result.step, "losses": result.losses}
        rank = dist.get_rank() if dist.is_initialized() else 0
        if save and rank == 0:
            from safetensors.torch import save_file

            out = Path(train.run_dir) / "spt"
            out.mkdir(parents=True, exist_ok=True)
            save_file(model.bank_state_dict(), str(out / "bank.safetensors"))
            if model.cfg.train_backbone:  # the trained LM too (evaluate loads it next to the bank)
                from safetensors.torch import save_model

                save_model(model, str(out / "model.safetensors"))  # handles T5's tied embeddings
            (Path(train.run_dir) / "results.json").write_text(
                json.dumps({**summary, "losses": None}, indent=1)
            )
            summary["bank"] = str(out / "bank.safetensors")
        summary["model"] = model
        return summary


def train(job: JobConfig, topology: Topology | None = None) -> dict[str, Any]:
    """Setting A: one run. Setting B: stage 1 (bank only, LM frozen, GLUE), then stage 2 from the
    pretrained bank on SuperGLUE (``finetune_train``; ``spt.train_backbone`` decides whether the LM
    is fine-tuned too)."""
    if job.setting == "multitask":
        result = Experiment(job, topology).run()
        result.pop("model")
        return result
    stage1 = Experiment(job, topology).run(spt=dataclasses.replace(job.spt, train_backbone=False))
    stage1.pop("model")
    stage2_job = dataclasses.replace(job, spt=dataclasses.replace(job.spt, init_bank=stage1["bank"]))
    stage2 = Experiment(stage2_job, topology, data=job.finetune_data).run(train=job.finetune_train)
    stage2.pop("model")
    return {"stage1": stage1, "stage2": stage2}


def pretrain(job: JobConfig, topology: Topology | None = None) -> dict[str, Any]:
    """A backbone for the frozen-LM regime (setting B's bank training on a useful LM): a random
    tiny T5 trained on ``data.tasks`` (tiny_pretrain: the skills behind tags, no natural-language
    template), saved with ``save_pretrained`` with a tokenizer that covers every synthetic
    template, as ``<run_dir>/backbone`` for ``spt.backbone_path``. The templates' word
    embeddings stay at their random init: the LM has the skills but cannot read the templates."""
    if job.spt.backbone_path is not None or not job.spt.train_backbone:
        raise ValueError("pretrain trains a random LM: needs model.random_config and spt.train_backbone=true")
    exp = Experiment(job, topology, vocabulary=list(TEMPLATES.values()))
    result = exp.run(save=False)
    model = result.pop("model")
    out = Path(job.train.run_dir) / "backbone"
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.backbone.save_pretrained(out)
        exp.tokenizer.save_pretrained(out)
    return {**result, "backbone": str(out)}


def evaluate(job: JobConfig, bank: str | None = None, topology: Topology | None = None) -> dict[str, float]:
    """Rank classification with a saved bank (default ``<run_dir>/spt/bank.safetensors``) and,
    for a jointly trained random-init LM, the ``model.safetensors`` saved next to it (a
    pretrained backbone_path is loaded as is). MoE expert shards are saved from rank 0 only."""
    path = bank or str(Path(job.train.run_dir) / "spt" / "bank.safetensors")
    exp = Experiment(dataclasses.replace(job, spt=dataclasses.replace(job.spt, init_bank=path)), topology)
    model = exp.build()
    full = Path(path).with_name("model.safetensors")
    if job.spt.backbone_path is None and full.is_file():  # a jointly trained random-init LM
        from safetensors.torch import load_model

        load_model(model, str(full))
    return exp.evaluate(model)
