"""The PEFT job on smile.runtime: build backbone + design, train with the Trainer, evaluate, save.

One :class:`Experiment` prepares the data and tokenizer once; each :meth:`Experiment.train`
builds a fresh backbone (a local ``from_pretrained`` directory, or a random tiny config for
offline runs), optionally swaps its FFNs for smile MoE layers (``smile.hf.moefy.moefy``), applies
a design and trains only the PEFT parameters and the task head under DeepSpeed ZeRO. The
frozen backbone runs in bf16 on GPUs while the optimizer keeps fp32 PEFT weights (the runtime's
bf16 mode). The backbone is always frozen, so the runtime's checkpoints are trainable-only
(``train.checkpoint.trainable_only``, required): they hold the PEFT weights and the head, and a
resume checks the rebuilt backbone against the recorded hashes (``frozen_source`` names where it
comes from). What is saved besides the checkpoints is the PEFT artifact: PEFT + head weights, the
design and its budget report (``<run_dir>/peft``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from smile.hf import moefy
from smile.models.peft_design_spaces import backbones
from smile.models.peft_design_spaces.config import DesignSpaceConfig
from smile.models.peft_design_spaces.data import (
    Batches,
    DataConfig,
    encode,
    holdout_split,
    load_examples,
    majority_accuracy,
    word_tokenizer,
)
from smile.models.peft_design_spaces.metrics import task_metrics
from smile.models.peft_design_spaces.peft_model import (
    PEFTModel,
    apply_design,
    budget_report,
    load_peft,
    save_peft,
)
from smile.models.peft_design_spaces.search import (
    DesignSpace,
    DesignSpaceSearch,
    SearchConfig,
    SearchResult,
    Trial,
)
from smile.models.peft_design_spaces.tasks import TaskSpec, task_spec
from smile.moe import MoEConfig
from smile.moe.experts import is_expert_parameter
from smile.moe.topology import Topology
from smile.runtime import CheckpointConfig, TrainConfig, Trainer, config_to_dict, init_distributed
from smile.runtime.distributed import gather_json


@dataclass
class ModelConfig:
    """The backbone when ``design.backbone_path`` is not set, and the optional MoE swap.

    family: roberta (classification head) or t5 (text-to-text).
    random_config: transformers config fields of a randomly initialised backbone (offline runs;
        vocabulary and special-token ids come from the tokenizer).
    tokenizer: "backbone" loads the backbone directory's tokenizer; "word" builds a word-level
        one from the task's texts (only with random_config).
    moe: swap dense FFNs for smile MoE layers (smile.hf.moefy; T5 family), or null.
    """

    family: Literal["roberta", "t5"] = "roberta"
    random_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: Literal["backbone", "word"] = "backbone"
    moe: MoEConfig | None = None


def _frozen_backbone_train() -> TrainConfig:
    """The runtime defaults, with trainable-only checkpoints: the backbone never trains here."""
    return TrainConfig(checkpoint=CheckpointConfig(trainable_only=True))


@dataclass
class JobConfig:
    """``smile zoo peft_design_spaces`` config: design, backbone, data, runtime, search."""

    design: DesignSpaceConfig = field(default_factory=DesignSpaceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_frozen_backbone_train)
    search: SearchConfig = field(default_factory=SearchConfig)

    def validate(self, where: str = "job") -> None:
        if not self.train.checkpoint.trainable_only:
            raise ValueError(
                f"{where}.train.checkpoint.trainable_only must be true: the backbone is frozen, so a "
                "checkpoint holds only the PEFT weights and the head (the backbone is rebuilt from "
                "design.backbone_path or model.random_config and checked against recorded hashes)"
            )
        for task in self.search.tasks:
            task_spec(self.data.benchmark, task)
        has_path, has_random = self.design.backbone_path is not None, bool(self.model.random_config)
        if has_path == has_random:
            raise ValueError(
                f"{where}: set exactly one of design.backbone_path (a from_pretrained directory) and "
                f"model.random_config (a randomly initialised backbone); got backbone_path="
                f"{self.design.backbone_path!r}, random_config={self.model.random_config!r}"
            )
        if self.model.tokenizer == "word" and not has_random:
            raise ValueError(
                f"{where}.model.tokenizer='word' only fits a random backbone (model.random_config)"
            )
        if self.model.tokenizer == "backbone" and not has_path:
            raise ValueError(f"{where}.model.tokenizer='backbone' needs design.backbone_path")


def _family(job: JobConfig) -> str:
    if job.design.backbone_path is None:
        return job.model.family
    from transformers import AutoConfig

    family = AutoConfig.from_pretrained(job.design.backbone_path).model_type
    if family not in ("roberta", "t5"):
        raise ValueError(f"design.backbone_path holds a {family!r} model; allowed: roberta, t5")
    return family


def _tokenizer(job: JobConfig, family: str, texts: list[str]):
    if job.model.tokenizer == "word":
        return word_tokenizer(texts, family)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(job.design.backbone_path)


def _texts(rows: list[dict], spec: TaskSpec) -> list[str]:
    """Every text a word-level tokenizer must cover: inputs, T5's prompt words and label words."""
    texts = [str(r[f]) for r in rows for f in spec.fields] + list(spec.labels) + [spec.name.split(".")[0]]
    return texts + [f"{f}:" for f in spec.fields] + [str(d) for d in range(10)] + ["."]


def build_backbone(job: JobConfig, family: str, tokenizer, spec: TaskSpec) -> nn.Module:
    """A fresh backbone (call under the same seed on every rank)."""
    path = job.design.backbone_path
    if family == "roberta":
        from transformers import RobertaConfig, RobertaForSequenceClassification

        problem = "regression" if spec.regression else "single_label_classification"
        if path is not None:
            return RobertaForSequenceClassification.from_pretrained(
                path, num_labels=spec.num_labels, problem_type=problem
            )
        config = RobertaConfig(
            **job.model.random_config,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            num_labels=spec.num_labels,
            problem_type=problem,
        )
        return RobertaForSequenceClassification(config)
    from transformers import T5Config, T5ForConditionalGeneration

    if path is not None:
        return T5ForConditionalGeneration.from_pretrained(path)
    config = T5Config(
        **job.model.random_config,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


def make_loss_fn(family: str):
    """Task loss only (T5: seq2seq cross-entropy; RoBERTa: classification / regression); the
    Trainer adds the routers' auxiliary loss when the FFNs are MoE layers."""

    def loss_fn(model: nn.Module, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        loss, metrics = out.loss, {"samples": batch["input_ids"].shape[0]}
        if family == "roberta" and out.logits.shape[-1] > 1:
            metrics["accuracy"] = (out.logits.argmax(-1) == batch["labels"]).float().mean().detach()
        return loss, metrics

    return loss_fn


@torch.no_grad()
def greedy_decode(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int
) -> torch.Tensor:
    """Exactly ``steps`` greedy decoder steps on every rank (MoE layers communicate in forward,
    so no rank may stop early); the caller cuts at end-of-sequence."""
    config = model.config
    encoder_outputs = model.backbone.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    decoded = torch.full((input_ids.shape[0], 1), config.decoder_start_token_id, device=input_ids.device)
    for _ in range(steps):
        logits = model(
            encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=decoded
        ).logits
        decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoded[:, 1:]


def parse_prediction(text: str, spec: TaskSpec) -> float:
    """T5's generated text as a class id (-1 when it is no label word) or an STS-B score."""
    text = text.strip()
    if spec.regression:
        try:
            return float(text.replace(" ", ""))
        except ValueError:
            return 0.0
    return float(spec.labels.index(text)) if text in spec.labels else -1.0


def make_eval_fn(family: str, spec: TaskSpec, tokenizer, max_target_length: int):
    """Benchmark metrics over the whole eval split (predictions gathered from every rank)."""

    def eval_fn(model: nn.Module, batches, ctx) -> dict[str, float]:
        preds: list[float] = []
        golds: list[float] = []
        for batch in batches:
            ids, mask = batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device)
            if family == "t5":
                out = greedy_decode(model, ids, mask, max_target_length).tolist()
                eos = tokenizer.eos_token_id
                cut = [row[: row.index(eos)] if eos in row else row for row in out]
                pred = [
                    parse_prediction(t, spec) for t in tokenizer.batch_decode(cut, skip_special_tokens=True)
                ]
                gold = batch["gold"].tolist()
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                pred = (logits.squeeze(-1) if spec.regression else logits.argmax(-1)).float().tolist()
                gold = batch["labels"].float().tolist()
            valid = batch["valid"].tolist()
            preds += [p for p, v in zip(pred, valid) if v]
            golds += [g for g, v in zip(gold, valid) if v]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = gather_json([preds, golds])
            preds = [p for part in parts for p in part[0]]
            golds = [g for part in parts for g in part[1]]
        return task_metrics(preds, golds, spec.regression, spec.num_labels)

    return eval_fn


def gathered_peft_state(model: PEFTModel, topology: Topology) -> dict[str, torch.Tensor]:
    """PEFT + head weights with every expert's LoRA factors (collective under expert parallelism)."""
    state = model.peft_state_dict()
    if not dist.is_initialized() or topology.ep_size == 1:
        return state
    group = topology.group("ep")
    for name, param in model.trained_named_parameters():
        if is_expert_parameter(param):
            local = param.detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, local, group=group)
            state[name] = torch.cat(parts, dim=0).cpu()
    return state


class Experiment:
    """One job's data and recipe, prepared once; trains and evaluates designs through the Trainer."""

    def __init__(self, job: JobConfig, topology: Topology | None = None) -> None:
        checkpoint = job.train.checkpoint
        if checkpoint.frozen_source is None:
            checkpoint = dataclasses.replace(checkpoint, frozen_source=_frozen_source(job))
        self.job = dataclasses.replace(job, train=dataclasses.replace(job.train, checkpoint=checkpoint))
        self.topology = topology if topology is not None else init_distributed(job.train.dist)
        self.spec = job.data.spec
        self.family = _family(job)
        self.train_rows, self.eval_rows = load_examples(job.data, "train"), load_examples(job.data, "eval")
        texts = _texts(self.train_rows + self.eval_rows, self.spec)
        self.tokenizer = _tokenizer(job, self.family, texts)
        self.train_examples = encode(self.train_rows, self.spec, self.tokenizer, self.family, job.data)
        self.eval_examples = encode(self.eval_rows, self.spec, self.tokenizer, self.family, job.data)
        self.majority = (
            None
            if self.spec.regression
            else majority_accuracy(
                [r["label"] for r in self.train_rows], [r["label"] for r in self.eval_rows]
            )
        )

    def search_split(self) -> Experiment:
        """This experiment for the search: candidates train on the training split minus a held-out
        part and are scored on that part (``search.holdout_fraction``, seeded by ``search.seed``),
        so the eval split the final report uses plays no part in choosing the design."""
        search = self.job.search
        keep, held = holdout_split(
            self.train_rows,
            self.eval_rows,
            self.spec,
            search.holdout_fraction,
            search.seed,
            search.max_holdout_samples,
        )
        out = copy.copy(self)
        out.train_examples = [self.train_examples[i] for i in keep]
        out.eval_examples = [self.train_examples[i] for i in held]
        return out

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def backbone(self) -> nn.Module:
        """A fresh backbone (MoE-swapped if configured), identical on every rank."""
        torch.manual_seed(self.job.train.seed)
        model = build_backbone(self.job, self.family, self.tokenizer, self.spec)
        if self.job.model.moe is not None:
            moefy(model, self.job.model.moe, self.topology)
        return model

    def build(self, design: DesignSpaceConfig | None = None) -> PEFTModel:
        return apply_design(self.backbone(), design or self.job.design)

    def _batches(self, examples: list[dict], train: bool):
        mbs, pad, seed = self.job.train.micro_batch_size, self.tokenizer.pad_token_id, self.job.train.seed
        return lambda rank, world: Batches(examples, mbs, pad, rank, world, train=train, seed=seed)

    def trainer(self, model: PEFTModel, train: TrainConfig) -> Trainer:
        return Trainer(
            model,
            make_loss_fn(self.family),
            train,
            self._batches(self.train_examples, True),
            eval_data=self._batches(self.eval_examples, False),
            topology=self.topology,
            eval_fn=make_eval_fn(self.family, self.spec, self.tokenizer, self.job.data.max_target_length),
        )

    def train(
        self,
        design: DesignSpaceConfig | None = None,
        train: TrainConfig | None = None,
        save: bool = True,
        model: PEFTModel | None = None,
    ) -> dict[str, Any]:
        """Train one design (or a ``model`` already built by :meth:`build`); returns eval metrics,
        the majority baseline and the budget report."""
        train = train or self.job.train
        model = model if model is not None else self.build(design)
        result = self.trainer(model, train).fit()
        summary = {
            "task": f"{self.spec.benchmark}/{self.spec.name}",
            "metric": self.spec.metric,
            "eval": result.eval_metrics,
            "majority_accuracy": self.majority,
            "steps": result.step,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "budget": budget_report(model),
        }
        if save:
            state = gathered_peft_state(model, self.topology)
            if self.rank == 0:
                out = save_peft(model, Path(train.run_dir) / "peft", state)
                (Path(train.run_dir) / "results.json").write_text(json.dumps(summary, indent=1))
                summary["peft_dir"] = str(out)
            if dist.is_initialized():
                dist.barrier()
        return summary

    def evaluate(self, peft_dir: str | Path) -> dict[str, float]:
        """Metrics of a saved PEFT artifact on the eval split (its own design.json is used)."""
        from smile.runtime import from_dict

        design = from_dict(
            DesignSpaceConfig, json.loads((Path(peft_dir) / "design.json").read_text()), "design"
        )
        model = self.build(design)
        load_peft(model, peft_dir, ep_rank=self.topology.ep_rank)
        return self.trainer(model, self.job.train).evaluate()


def _frozen_source(job: JobConfig) -> str:
    """Where the frozen backbone is rebuilt from, recorded in every checkpoint's manifest."""
    if job.design.backbone_path is not None:
        return job.design.backbone_path
    moe = (
        "" if job.model.moe is None else f", FFNs swapped by smile.hf.moefy({config_to_dict(job.model.moe)})"
    )
    return (
        f"random {job.model.family} backbone {job.model.random_config} "
        f"(seeded by train.seed={job.train.seed}{moe})"
    )


def search_experiments(exp: Experiment) -> list[Experiment]:
    """One held-out search experiment per search task (``search.tasks``, default ``data.task``)."""
    job, out = exp.job, []
    for task in job.search.tasks or [job.data.task]:
        task_exp = exp
        if task != job.data.task:
            task_exp = Experiment(
                dataclasses.replace(job, data=dataclasses.replace(job.data, task=task)), exp.topology
            )
        out.append(task_exp.search_split())
    return out


def run_search(exp: Experiment) -> SearchResult:
    """The design-space search, every candidate trained through the Trainer on each search task's
    training split minus its held-out part and scored on that held-out part; a candidate's score
    is the average over the tasks."""
    job = exp.job
    tasks = search_experiments(exp)
    space = DesignSpace(job.design, len(backbones.layers(exp.backbone())), job.search.num_groups)
    counter = itertools.count()

    def evaluate(design: DesignSpaceConfig, steps: int) -> Trial:
        trial = next(counter)
        scores, params = {}, []
        for task in tasks:
            summary = task.train(
                design, _search_train(job, steps, f"{trial:03d}-{task.spec.name}"), save=False
            )
            scores[task.spec.name] = summary["eval"][task.spec.metric]
            params.append(summary["budget"]["trainable_params"])
        return Trial(scores, sum(params) / len(params))

    result = DesignSpaceSearch(space, job.search.n_samples, job.search.short_train_steps, job.search).run(
        evaluate
    )
    if exp.rank == 0:
        out = Path(job.train.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "best": config_to_dict(result.best),
            "tasks": {
                t.spec.name: {
                    "metric": t.spec.metric,
                    "search_train": len(t.train_examples),
                    "heldout": len(t.eval_examples),
                }
                for t in tasks
            },
            "history": result.history,
        }
        (out / "search.json").write_text(json.dumps(record, indent=1))
    return result


def _search_train(job: JobConfig, steps: int, name: str) -> TrainConfig:
    """The short run of one search candidate: no checkpoints, no progress bar."""
    return dataclasses.replace(
        job.train,
        max_steps=steps,
        run_dir=str(Path(job.train.run_dir) / "search" / name),
        eval_every=0,
        checkpoint=dataclasses.replace(
            job.train.checkpoint, dir=None, every=0, save_final=False, resume="never", export_dir=None
        ),
        log=dataclasses.replace(job.train.log, progress_bar=False, plot=False),
    )
