"""Training and evaluation of Masked-Diffuse LM on the shared runtime (``smile.models.registry``
points here).

Run directory (``cfg.run_dir``): the runtime's ``checkpoints/`` (weights with the importance
statistics and length distribution as buffers, EMA weights), ``metrics.jsonl``, ``samples/``
(the eval hook's generations, decoded with the EMA weights), ``vocab.txt`` and
``importance.json`` (fit on the train split only), and ``classifier_<target>/`` for control.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smile.models.masked_diffuse_lm import data as corpora
from smile.models.masked_diffuse_lm.config import MDLMConfig
from smile.models.masked_diffuse_lm.control import (
    LatentClassifier,
    classifier_loss,
    contains_labels,
    guidance,
)
from smile.models.masked_diffuse_lm.denoiser import Denoiser, bert_config, moefy_bert
from smile.models.masked_diffuse_lm.diffusion import MaskedDiffuseLM
from smile.models.masked_diffuse_lm.importance import ImportanceScorer
from smile.models.masked_diffuse_lm.vocab import Vocab
from smile.moe.topology import Topology
from smile.runtime import (
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    Trainer,
    config_to_dict,
    init_distributed,
    latest_checkpoint,
    load_ema_weights,
    load_weights,
)


@dataclass
class Prepared:
    """The tokenised splits, the vocabulary, the train-only importance statistics and the
    bigrams that count as fluent (the grammar's, or those seen in train)."""

    vocab: Vocab
    words: dict[str, list[list[str]]]
    rows: dict[str, list[list[int]]]
    scorer: ImportanceScorer
    allowed: set[tuple[str, str]]


def prepare(cfg: MDLMConfig) -> Prepared:
    source = cfg.data
    if source.source == "grammar":
        words = corpora.grammar_corpus(source.grammar_sentences, source.seed)
        allowed = corpora.Grammar().bigrams()
    else:
        words = (
            corpora.load_e2e(source.data_dir, source.hf_path, source.cache_dir)
            if source.source == "e2e"
            else corpora.load_roc(source.data_dir, source.seed)
        )
        allowed = corpora.train_bigrams(words["train"])
    vocab = (
        Vocab.load(cfg.vocab_path)
        if cfg.vocab_path
        else Vocab.build(words["train"], source.min_count, cfg.unk)
    )
    rows = {
        split: [vocab.encode(s, cfg.max_len, cfg.truncate) for s in sents] for split, sents in words.items()
    }
    scorer = ImportanceScorer().fit(rows["train"], len(vocab))  # train split only
    return Prepared(vocab, words, rows, scorer, allowed)


def pretrained_embeddings(encoder_path: str, vocab: Vocab) -> torch.Tensor:
    """Each word's vector: the mean of its word pieces' input embeddings in a local encoder."""
    from transformers import AutoModel, AutoTokenizer

    if not Path(encoder_path).is_dir():
        raise FileNotFoundError(f"encoder_path: no local encoder directory {encoder_path}")
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    table = AutoModel.from_pretrained(encoder_path).get_input_embeddings().weight.detach()
    rows = []
    for word in vocab.tokens:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id or 0]
        rows.append(table[pieces].mean(0))
    return torch.stack(rows)


def build_model(cfg: MDLMConfig, vocab: Vocab, topology: Topology | None = None) -> MaskedDiffuseLM:
    pretrained = pretrained_embeddings(cfg.encoder_path, vocab) if cfg.use_pretrained_emb else None
    emb_dim = cfg.emb_dim if pretrained is None else pretrained.shape[1]
    b = cfg.backbone
    denoiser = Denoiser(
        bert_config(b.hidden_size, b.num_layers, b.num_heads, b.intermediate_size, b.dropout, cfg.max_len),
        emb_dim,
        len(vocab),
    )
    if cfg.moe is not None:
        moefy_bert(denoiser.bert, cfg.moe, topology)
    return MaskedDiffuseLM(
        denoiser,
        len(vocab),
        emb_dim,
        cfg.T,
        cfg.n_buckets,
        cfg.max_len,
        cfg.schedule,
        pretrained_emb=pretrained,
    )


def train_config(
    cfg: MDLMConfig, world: int, run_dir: str | None = None, steps: int | None = None
) -> TrainConfig:
    """``cfg.train`` with the paper's optimisation: AdamW, no decay, lr annealed linearly to 0
    (Diffusion-LM's lr_anneal_steps), the global batch split over the ranks."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} ranks")
    train = copy.deepcopy(cfg.train)
    train.run_dir = run_dir or cfg.run_dir
    train.max_steps = steps or cfg.steps
    train.micro_batch_size = cfg.batch_size // world
    train.grad_accum_steps = 1
    train.optimizers = [
        OptimizerConfig(
            name="main", type="adamw", lr=cfg.lr, weight_decay=0.0, schedule=ScheduleConfig(kind="linear")
        )
    ]
    train.validate()
    return train


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def decode(vocab: Vocab, ids: torch.Tensor) -> list[list[str]]:
    return [vocab.decode(row.tolist()) for row in ids.cpu()]


def generation_metrics(samples: list[list[str]], allowed: set[tuple[str, str]]) -> dict[str, float]:
    return {
        "gen_bigram_rate": corpora.bigram_rate(samples, allowed),
        "gen_fluent_sentences": sum(corpora.bigram_rate([x], allowed) == 1.0 for x in samples)
        / max(len(samples), 1),
        "gen_distinct2": corpora.distinct_n(samples, 2),
        "gen_mean_len": sum(map(len, samples)) / max(len(samples), 1),
    }


def loss_fn(model: MaskedDiffuseLM, batch: dict[str, torch.Tensor], ctx: Any):
    return model.training_loss(batch)


def train(cfg: MDLMConfig, prepared: Prepared | None = None) -> dict[str, Any]:
    """Train the diffusion model (resumes from the run's newest checkpoint); each evaluation
    samples ``eval_samples`` sentences with the EMA weights and scores them."""
    topology = init_distributed(cfg.train.dist)
    prep = prepared or prepare(cfg)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg, prep.vocab, topology)
    model.set_statistics(prep.scorer.idf, prep.scorer.entropy, [len(r) for r in prep.rows["train"]])
    run_dir = Path(cfg.run_dir)
    if _rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        prep.vocab.save(run_dir / "vocab.txt")
        prep.scorer.save(run_dir / "importance.json")
        (run_dir / "masked_diffuse_lm.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    world = dist.get_world_size()
    tcfg = train_config(cfg, world)

    def train_data(rank: int, world_size: int) -> corpora.Batches:
        return corpora.Batches(
            prep.rows["train"], prep.vocab, tcfg.micro_batch_size, cfg.max_len,
            seed=cfg.train.seed, rank=rank, world_size=world_size,
        )  # fmt: skip

    def generate_fn(model: MaskedDiffuseLM, ctx: Any):
        ids = model.sample(max(1, cfg.eval_samples // world), steps=cfg.sample_steps, x0_mode=cfg.x0_mode)
        samples = decode(prep.vocab, ids)
        return generation_metrics(samples, prep.allowed), [" ".join(s) for s in samples]

    valid = prep.rows["valid"]
    eval_bs = max(1, min(tcfg.micro_batch_size, len(valid) // world))

    def eval_data(rank: int, world_size: int) -> corpora.Batches:
        return corpora.Batches(
            valid, prep.vocab, eval_bs, cfg.max_len, shuffle=False, rank=rank, world_size=world_size
        )

    evals = eval_data if len(valid) >= world else None  # the valid CE, next to the generations
    trainer = Trainer(model, loss_fn, tcfg, train_data, evals, topology=topology, generate_fn=generate_fn)
    result = trainer.fit()
    trainer.close()
    return {
        "run_dir": str(run_dir),
        "checkpoint": result.checkpoint,
        "resumed_from": result.resumed_from,
        "losses": result.losses,
        "train": result.train_metrics,
        "eval": result.eval_metrics,
        "model": model,
        "prepared": prep,
    }


def load_trained(
    cfg: MDLMConfig, checkpoint: str | None = None, prepared: Prepared | None = None
) -> tuple[MaskedDiffuseLM, Prepared]:
    """The trained model with its EMA weights (raw weights if the run kept no EMA)."""
    topology = init_distributed(cfg.train.dist)
    prep = prepared or prepare(cfg)
    path = Path(checkpoint) if checkpoint else latest_checkpoint(Path(cfg.run_dir) / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {cfg.run_dir}/checkpoints; train first")
    model = build_model(cfg, prep.vocab, topology)
    load_weights(model, path, topology)  # weights and buffers (importance statistics, lengths)
    if cfg.train.ema.enabled:
        load_ema_weights(model, path, topology)
    return model.eval(), prep


def train_classifier(
    cfg: MDLMConfig, model: MaskedDiffuseLM, prep: Prepared, target_id: int
) -> LatentClassifier:
    """p(c | x_t, t) for "contains the target word", trained through the Trainer on noised
    latents of the frozen diffusion model."""
    topology = init_distributed(cfg.train.dist)
    control = cfg.control
    torch.manual_seed(cfg.train.seed)
    classifier = LatentClassifier(model.emb_dim, control.classifier_hidden, 2)
    model.requires_grad_(False)
    world = dist.get_world_size()
    tcfg = train_config(
        cfg, world, str(Path(cfg.run_dir) / f"classifier_{control.target}"), steps=control.classifier_steps
    )
    tcfg.optimizers[0].lr = control.classifier_lr
    tcfg.ema.decay, tcfg.eval_every = 0.0, 0

    def clf_loss(clf: LatentClassifier, batch: dict[str, torch.Tensor], ctx: Any):
        model.to(ctx.device)
        return classifier_loss(clf, model, batch, target_id)

    def data(rank: int, world_size: int) -> corpora.Batches:
        return corpora.Batches(
            prep.rows["train"], prep.vocab, tcfg.micro_batch_size, cfg.max_len,
            seed=cfg.train.seed + 1, rank=rank, world_size=world_size,
        )  # fmt: skip

    trainer = Trainer(classifier, clf_loss, tcfg, data, topology=topology)
    trainer.fit()
    trainer.close()
    return classifier.eval()


def controlled_generation(
    cfg: MDLMConfig, model: MaskedDiffuseLM, prep: Prepared, classifier: LatentClassifier | None = None
) -> dict[str, Any]:
    """Guided vs unguided samples from the same noise (same seed): control success and fluency."""
    control, n = cfg.control, cfg.control.samples
    results: dict[str, Any] = {"task": control.task}
    if control.task == "length":
        length = min(control.length, cfg.max_len)
        lengths = torch.full((n,), length)
        torch.manual_seed(cfg.train.seed)
        samples = decode(
            prep.vocab, model.sample(n, lengths=lengths, steps=cfg.sample_steps, x0_mode=cfg.x0_mode)
        )
        results["success"] = sum(len(s) == length for s in samples) / n
        results.update(generation_metrics(samples, prep.allowed))
        return results
    if control.target is None or control.target not in prep.vocab.index:
        raise KeyError(f"control.target={control.target!r} must be a word of the vocabulary")
    target_id = prep.vocab.index[control.target]
    if classifier is None:
        classifier = train_classifier(cfg, model, prep, target_id)
    classifier.to(model.word_emb.weight.device)
    guide = guidance(classifier, 1, control.step_size, control.guidance_steps, control.fluency)
    for name, hook in (("unguided", None), ("guided", guide)):
        torch.manual_seed(cfg.train.seed)
        ids = model.sample(n, guidance=hook, steps=cfg.sample_steps, x0_mode=cfg.x0_mode)
        mask = (ids != 0).long()
        samples = decode(prep.vocab, ids)
        results[name] = {
            "success": float(contains_labels(ids, mask, target_id).float().mean()),
            **generation_metrics(samples, prep.allowed),
            "examples": [" ".join(s) for s in samples[:5]],
        }
    return results


def evaluate(cfg: MDLMConfig, control: bool = False, checkpoint: str | None = None) -> dict[str, Any]:
    """Samples with the EMA weights and their metrics; with ``control``, guided generation."""
    model, prep = load_trained(cfg, checkpoint)
    torch.manual_seed(cfg.train.seed)
    samples = decode(prep.vocab, model.sample(cfg.eval_samples, steps=cfg.sample_steps, x0_mode=cfg.x0_mode))
    out: dict[str, Any] = {
        **generation_metrics(samples, prep.allowed),
        "examples": [" ".join(s) for s in samples[:5]],
    }
    if control:
        out["control"] = controlled_generation(cfg, model, prep)
    return out
