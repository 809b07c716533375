"""The two stages of Multimodal-CoT on the shared runtime, and the zoo entry points.

``train(cfg)`` fine-tunes one stage (``cfg.stage``) through ``smile.runtime.Trainer`` in
``<run_dir>/<stage>``, evaluating by greedy generation (``smile.runtime.generation``).
``evaluate(cfg)`` decodes the eval and test splits with the stage's final weights: the rationale
stage writes ``<run_dir>/rationale/predictions_<split>.json`` (``{"preds": {pid: text}}``), which
the answer stage appends verbatim to its inputs; the answer stage reports accuracy per ScienceQA
category from the letter parsed out of its output.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from smile.models.mm_cot.config import MMCoTConfig
from smile.models.mm_cot.data import (
    Batches,
    load_features,
    load_hf_scienceqa,
    load_local_scienceqa,
    make_examples,
    read_rationales,
    write_rationales,
)
from smile.models.mm_cot.fusion import T5ForMultimodalGeneration, build_model
from smile.models.mm_cot.prompts import category_accuracy, extract_answer
from smile.models.mm_cot.synthetic import make_task, task_texts, word_tokenizer
from smile.runtime import (
    OptimizerConfig,
    ScheduleConfig,
    Trainer,
    init_distributed,
    latest_checkpoint,
    load_weights,
)
from smile.runtime.generation import GenerationEval


@dataclass
class Split:
    problems: dict[str, dict]
    pids: list[str]
    feats: dict[str, np.ndarray]


def stage_dir(cfg: MMCoTConfig, stage: str | None = None) -> Path:
    return Path(cfg.run_dir) / (stage or cfg.stage)


def rationale_path(cfg: MMCoTConfig, split: str) -> Path:
    if cfg.rationale_file is not None:
        return Path(cfg.rationale_file.format(split=split))
    return stage_dir(cfg, "rationale") / f"predictions_{split}.json"


def load_split(cfg: MMCoTConfig, split: str) -> Split:
    """Problems, pids and features of one split from the configured source."""
    data, shape = cfg.data, tuple(cfg.patch_shape)
    if data.source == "synthetic":
        n = data.synthetic_train if split == data.train_split else data.synthetic_eval
        seed = cfg.train.seed + {data.train_split: 0, data.eval_split: 1}.get(split, 2) * 7919
        problems, pids, feats = make_task(data.synthetic_task, n, shape, seed, data.synthetic_signal)
        return Split(problems, pids, feats)
    if data.source == "hf":
        problems, pids = load_hf_scienceqa(data.hf_path, split, data.cache_dir)
    else:
        problems, pids = load_local_scienceqa(data.root, split)
    pids = pids[: data.limit] if data.limit else pids
    if cfg.use_caption and data.captions_file:
        captions = json.loads(Path(data.captions_file).read_text())["captions"]
        for pid in pids:
            problems[pid] = {**problems[pid], "caption": captions.get(pid, "")}
    return Split(problems, pids, load_features(pids, problems, data.features_dir, shape))


def build_tokenizer(cfg: MMCoTConfig) -> Any:
    """The backbone's tokenizer, or (offline, no backbone) a word-level one over the synthetic
    task's text, saved with the run so evaluation decodes with the same vocabulary."""
    if cfg.base_model_path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(cfg.base_model_path)
    if cfg.data.source != "synthetic":
        raise ValueError("mm_cot: base_model_path is required unless data.source is synthetic")
    texts: list[str] = []
    for split in (cfg.data.train_split, cfg.data.eval_split):
        texts += task_texts(load_split(cfg, split).problems)
    return word_tokenizer(texts)


def make_model(cfg: MMCoTConfig, tokenizer: Any, topology: Any = None) -> T5ForMultimodalGeneration:
    """The multimodal T5 (from ``base_model_path`` or ``tiny``), MoE-fied when ``cfg.moe``."""
    from transformers import T5Config

    t5 = None
    if cfg.base_model_path is None:
        t = cfg.tiny
        t5 = T5Config(
            vocab_size=len(tokenizer),
            d_model=t.d_model,
            d_ff=t.d_ff,
            num_layers=t.num_layers,
            num_heads=t.num_heads,
            d_kv=t.d_kv,
            dropout_rate=t.dropout_rate,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    model = build_model(
        t5,
        base_model_path=cfg.base_model_path,
        patch_shape=tuple(cfg.patch_shape),
        gate_value=cfg.fusion_gate,
        vision_mask=cfg.vision_mask,
        allow_missing_image=cfg.allow_missing_image,
    )
    if cfg.moe is not None:
        from smile.hf import moefy

        moefy(model, cfg.moe, topology)
    return model


def examples(cfg: MMCoTConfig, split: str, tokenizer: Any, *, training: bool) -> list:
    """Tokenised examples of ``split``; the answer stage reads generated rationales for eval
    splits (and trains on gold ones, as the official code)."""
    data = load_split(cfg, split)
    rationales = None
    if cfg.format.startswith("QCMG") and not training:
        rationales = read_rationales(rationale_path(cfg, split))
        missing = [pid for pid in data.pids if pid not in rationales]
        if missing:
            raise ValueError(
                f"rationale file {rationale_path(cfg, split)} lacks {len(missing)} pids, e.g. {missing[0]}"
            )
    return make_examples(
        data.problems,
        data.pids,
        data.feats,
        tokenizer,
        cfg.format,
        cfg.input_len,
        cfg.target_len,
        rationales,
        cfg.use_caption,
    )


def _world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def generation_eval(
    cfg: MMCoTConfig, tokenizer: Any, out_dir: Path, name: str = "predictions"
) -> GenerationEval:
    """Greedy (or beam) decoding; the answer stage parses the letter and scores per category."""
    answer = cfg.format.endswith("-A")

    def metrics(records: list[dict]) -> dict[str, float]:
        if not answer:
            # compared without spaces: a word-level tokenizer decodes "Solution:" as "Solution :"
            same = [r["prediction"].replace(" ", "") == r["reference"].replace(" ", "") for r in records]
            return {"rationale_exact": float(np.mean(same))}
        for r in records:
            r["correct"] = r["parsed"] == r["reference"]
        return category_accuracy(records)

    return GenerationEval(
        tokenizer,
        max_new_tokens=cfg.target_len,
        num_beams=cfg.num_beams,
        generate_keys=("image_feats",),
        metrics=metrics,
        postprocess=extract_answer if answer else None,
        output_dir=out_dir,
        name=name,
    )


def _train_config(cfg: MMCoTConfig, n_train: int, per_rank: int, world: int):
    steps_per_epoch = max(1, n_train // (per_rank * world))
    return dataclasses.replace(
        cfg.train,
        run_dir=str(stage_dir(cfg)),
        max_steps=cfg.max_steps or cfg.epochs * steps_per_epoch,
        micro_batch_size=per_rank,
        # Seq2SeqTrainer's defaults in the official code: AdamW, linear decay, no warmup.
        optimizers=[
            OptimizerConfig(
                type="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=ScheduleConfig(kind="linear")
            )
        ],
    )


def seq2seq_loss(model: T5ForMultimodalGeneration, batch: dict, ctx: Any) -> torch.Tensor:
    """Token cross-entropy of the target (the Trainer adds MoE aux losses)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        image_feats=batch["image_feats"],
        labels=batch["labels"],
    )
    return out.loss


def _threads(cfg: MMCoTConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)


def train(cfg: MMCoTConfig, **_: Any) -> dict[str, Any]:
    """Fine-tune ``cfg.stage``; returns the run summary (final eval metrics included)."""
    _threads(cfg)
    topology = init_distributed(cfg.train.dist)
    rank, world = _world()
    torch.manual_seed(cfg.train.seed)
    tokenizer = build_tokenizer(cfg)
    train_ex = examples(cfg, cfg.data.train_split, tokenizer, training=True)
    eval_ex = (
        examples(cfg, cfg.data.eval_split, tokenizer, training=False) if cfg.eval_during_training else None
    )
    if cfg.batch_size % world:
        raise ValueError(f"mm_cot: batch_size={cfg.batch_size} is not divisible by {world} ranks")
    per_rank = cfg.batch_size // world
    pad = tokenizer.pad_token_id
    train_data = Batches(train_ex, per_rank, pad, rank=rank, world=world, seed=cfg.train.seed)
    eval_data = (
        None
        if eval_ex is None
        else Batches(eval_ex, cfg.eval_batch_size, pad, rank=rank, world=world, train=False)
    )
    model = make_model(cfg, tokenizer, topology)
    out = stage_dir(cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out / "tokenizer")
    trainer = Trainer(
        model,
        seq2seq_loss,
        _train_config(cfg, len(train_ex), per_rank, world),
        train_data,
        eval_data,
        topology=topology,
        eval_fn=generation_eval(cfg, tokenizer, out / "generations"),
    )
    try:
        fit = trainer.fit()
    finally:
        trainer.close()
    return {
        "stage": cfg.stage,
        "run_dir": str(out),
        "checkpoint": str(fit.checkpoint),
        "step": fit.step,
        "loss": fit.losses[-1] if fit.losses else None,
        **(fit.eval_metrics or {}),
    }


def evaluate(cfg: MMCoTConfig, splits: tuple[str, ...] | None = None, **_: Any) -> dict[str, Any]:
    """Decode ``splits`` (default: eval and test) with the stage's newest checkpoint; the
    rationale stage writes the files the answer stage reads."""
    _threads(cfg)
    topology = init_distributed(cfg.train.dist)
    rank, world = _world()
    out = stage_dir(cfg)
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(
            f"mm_cot: no checkpoint under {out / 'checkpoints'}: train stage {cfg.stage!r} first"
        )
    tokenizer = _saved_tokenizer(cfg, out)
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg, tokenizer, topology)
    load_weights(model, checkpoint, topology)
    results: dict[str, Any] = {"stage": cfg.stage, "checkpoint": str(checkpoint)}
    for split in splits or (cfg.data.eval_split, cfg.data.test_split):
        ex = examples(cfg, split, tokenizer, training=False)
        gen = generation_eval(cfg, tokenizer, out / "generations", name=f"eval_{split}")
        metrics = gen(
            model,
            Batches(ex, cfg.eval_batch_size, tokenizer.pad_token_id, rank=rank, world=world, train=False),
        )
        if cfg.stage == "rationale" and rank == 0:
            metrics["rationale_file"] = str(write_rationales(rationale_path(cfg, split), gen.last_records))
        results[split] = metrics
    if rank == 0:
        (out / "eval.json").write_text(json.dumps(results, indent=1))
    return results


def _saved_tokenizer(cfg: MMCoTConfig, out: Path) -> Any:
    from transformers import AutoTokenizer

    if (out / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(out / "tokenizer")
    return build_tokenizer(cfg)
