"""Training and evaluation of Masked-Diffuse LM on the shared runtime (``smile.models.registry``
points here).

Run directory (``cfg.run_dir``): the runtime's ``checkpoints/`` (weights with the importance
statistics and length distribution as buffers, EMA weights), ``metrics.jsonl``, ``samples/``
(the eval hook's generations, decoded with the EMA weights), ``vocab.txt`` and
``importance.json`` (fit on the train split only), and ``classifier_<target>/`` (content),
``classifier_pos/`` and ``classifier_span/`` for control.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smile.models.masked_diffuse_lm import data as corpora
from smile.models.masked_diffuse_lm.config import MDLMConfig
from smile.models.masked_diffuse_lm.control import (
    LatentClassifier,
    POSClassifier,
    SpanClassifier,
    classifier_loss,
    guidance,
    parse_pos_target,
    parse_span_target,
    pos_guidance,
    pos_loss,
    span_guidance,
    span_loss,
    span_table,
)
from smile.models.masked_diffuse_lm.data import POS_TAGS, SPAN_LABELS, Grammar, Parse, Span
from smile.models.masked_diffuse_lm.denoiser import Denoiser, bert_config, moefy_bert
from smile.models.masked_diffuse_lm.diffusion import Guidance, MaskedDiffuseLM
from smile.models.masked_diffuse_lm.importance import ImportanceScorer
from smile.models.masked_diffuse_lm.vocab import Vocab
from smile.moe.topology import Topology
from smile.runtime import (
    ConfigError,
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
    """The tokenised splits, the vocabulary, the train-only importance statistics, the
    bigrams that count as fluent (the grammar's, or those seen in train) and, for the synthetic
    grammar, the gold derivation (tags and constituents) of every train sentence."""

    vocab: Vocab
    words: dict[str, list[list[str]]]
    rows: dict[str, list[list[int]]]
    scorer: ImportanceScorer
    allowed: set[tuple[str, str]]
    gold: list[Parse] | None = None


def prepare(cfg: MDLMConfig) -> Prepared:
    source = cfg.data
    gold = None
    if source.source == "grammar":
        treebank = corpora.grammar_treebank(source.grammar_sentences, source.seed)
        words = {split: [w for w, _ in derived] for split, derived in treebank.items()}
        gold = [parse for _, parse in treebank["train"]]
        allowed = Grammar().bigrams()
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
    return Prepared(vocab, words, rows, scorer, allowed, gold)


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
        len(vocab) + (cfg.objective == "paper"),  # the output layer's [MASK] class
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
        objective=cfg.objective,
    )


def train_config(
    cfg: MDLMConfig, world: int, run_dir: str | None = None, steps: int | None = None
) -> TrainConfig:
    """``cfg.train`` with the paper's optimisation: AdamW, no decay, ``warmup_steps`` of linear
    warm-up, then lr annealed linearly to 0 (Diffusion-LM's lr_anneal_steps), the global batch
    split over the ranks."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} ranks")
    train = copy.deepcopy(cfg.train)
    train.run_dir = run_dir or cfg.run_dir
    train.max_steps = steps or cfg.steps
    train.micro_batch_size = cfg.batch_size // world
    train.grad_accum_steps = 1
    train.optimizers = [
        OptimizerConfig(
            name="main",
            type="adamw",
            lr=cfg.lr,
            weight_decay=0.0,
            schedule=ScheduleConfig(kind="linear", warmup_steps=cfg.warmup_steps),
        )
    ]
    train.validate()
    return train


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def decode(vocab: Vocab, ids: torch.Tensor) -> list[list[str]]:
    return [vocab.decode(row.tolist()) for row in ids.cpu()]


def generate(
    cfg: MDLMConfig,
    model: MaskedDiffuseLM,
    n: int,
    lengths: torch.Tensor | None = None,
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """``n`` samples with the config's sampler and decoding (``decode: mbr``: the minimum-Bayes-risk
    one of ``mbr_samples`` per output, guided alike)."""
    return model.sample(
        n,
        lengths=lengths,
        guidance=guidance,
        steps=cfg.sample_steps,
        x0_mode=cfg.x0_mode,
        mbr_samples=cfg.mbr_samples if cfg.decode == "mbr" else 1,
    )


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
        ids = generate(cfg, model, max(1, cfg.eval_samples // world))
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


def fit_classifier(
    cfg: MDLMConfig,
    model: MaskedDiffuseLM,
    prep: Prepared,
    classifier: torch.nn.Module,
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any],
    name: str,
) -> torch.nn.Module:
    """Train a latent classifier through the Trainer on noised latents of the frozen diffusion
    model (``<run_dir>/<name>``); its batches carry ``rows`` to look annotations up by."""
    topology = init_distributed(cfg.train.dist)
    control = cfg.control
    model.requires_grad_(False)
    world = dist.get_world_size()
    tcfg = train_config(cfg, world, str(Path(cfg.run_dir) / name), steps=control.classifier_steps)
    tcfg.optimizers[0].lr = control.classifier_lr
    tcfg.ema.decay, tcfg.eval_every = 0.0, 0

    def clf_loss(clf: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: Any):
        model.to(ctx.device)
        return loss(clf, batch)

    def data(rank: int, world_size: int) -> corpora.Batches:
        return corpora.Batches(
            prep.rows["train"], prep.vocab, tcfg.micro_batch_size, cfg.max_len,
            seed=cfg.train.seed + 1, rank=rank, world_size=world_size, with_rows=True,
        )  # fmt: skip

    trainer = Trainer(classifier, clf_loss, tcfg, data, topology=topology)
    trainer.fit()
    trainer.close()
    return classifier.eval()


def train_classifier(
    cfg: MDLMConfig, model: MaskedDiffuseLM, prep: Prepared, target_id: int
) -> LatentClassifier:
    """p(c | x_t, t) for "contains the target word"."""
    torch.manual_seed(cfg.train.seed)
    classifier = LatentClassifier(model.emb_dim, cfg.control.classifier_hidden, 2)
    return fit_classifier(
        cfg,
        model,
        prep,
        classifier,
        lambda clf, batch: classifier_loss(clf, model, batch, target_id),
        f"classifier_{cfg.control.target}",
    )


Tagger = Callable[[list[str]], Sequence[str]]  # words -> one tag per word
SpanParser = Callable[[list[str]], Iterable[Span] | None]  # words -> constituents, None: no parse


def _user_callable(spec: str | None, field: str) -> Callable | None:
    """``"module:function"`` -> the function (a tagger or parser the user supplies)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"control.{field}={spec!r} must be 'module:function'")
    return getattr(importlib.import_module(module), name)


def _missing(field: str, what: str, cfg: MDLMConfig) -> ConfigError:
    return ConfigError(
        f"control.{field}: {cfg.control.task} control on data.source={cfg.data.source} needs a {what} "
        f"the user supplies ('module:function', or the {field}= argument in Python); only the "
        "synthetic grammar (data.source=grammar) brings its own, and none is downloaded"
    )


def pos_annotations(
    cfg: MDLMConfig, prep: Prepared, tagger: Tagger | None = None
) -> tuple[Tagger, list[Sequence[str]], tuple[str, ...]]:
    """(the tagger that scores samples, the train split's tags, the tag set): a user tagger
    (argument, else ``control.tagger``) on every sentence, or the grammar's gold tags and its
    lexicon."""
    tagger = tagger or _user_callable(cfg.control.tagger, "tagger")
    if tagger is None:
        if prep.gold is None:
            raise _missing("tagger", "POS tagger (words -> tags)", cfg)
        return Grammar().tag, [p.tags for p in prep.gold], POS_TAGS
    tags = [list(tagger(words)) for words in prep.words["train"]]
    for words, row in zip(prep.words["train"], tags):
        if len(row) != len(words):
            raise ValueError(f"control.tagger gave {len(row)} tags for the {len(words)} words {words}")
    return tagger, tags, tuple(sorted({t for row in tags for t in row}))


def span_annotations(
    cfg: MDLMConfig, prep: Prepared, parser: SpanParser | None = None
) -> tuple[SpanParser, list[set[Span]], tuple[str, ...]]:
    """(the parser that scores samples, the train split's constituents, the label set), as
    ``pos_annotations``: a user parser, or the grammar's gold derivations and its recogniser."""
    parser = parser or _user_callable(cfg.control.parser, "parser")
    if parser is None:
        if prep.gold is None:
            raise _missing("parser", "constituency parser (words -> [(i, j, label)])", cfg)
        grammar = Grammar()

        def grammar_parser(words: list[str]) -> frozenset[Span] | None:
            parse = grammar.parse(words)
            return None if parse is None else parse.spans

        return grammar_parser, [set(p.spans) for p in prep.gold], SPAN_LABELS
    spans = [set(parser(words) or ()) for words in prep.words["train"]]
    return parser, spans, tuple(sorted({label for row in spans for _, _, label in row}))


def _guided_vs_unguided(
    cfg: MDLMConfig,
    model: MaskedDiffuseLM,
    prep: Prepared,
    guide: Guidance,
    success: Callable[[list[list[str]]], dict[str, float]],
    lengths: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Unguided and guided samples from the same noise (same seed, same lengths), each scored by
    ``success`` and the fluency metrics."""
    results = {}
    for name, hook in (("unguided", None), ("guided", guide)):
        torch.manual_seed(cfg.train.seed)
        ids = generate(cfg, model, cfg.control.samples, lengths, hook)
        samples = decode(prep.vocab, ids)
        results[name] = {
            **success(samples),
            **generation_metrics(samples, prep.allowed),
            "examples": [" ".join(s) for s in samples[:5]],
        }
    return results


def pos_control(
    cfg: MDLMConfig,
    model: MaskedDiffuseLM,
    prep: Prepared,
    tagger: Tagger | None = None,
    classifier: POSClassifier | None = None,
) -> dict[str, Any]:
    """POS control: samples of the target's length guided toward its tag sequence; success is
    the exact match of the samples' tags (by the grammar's lexicon or the user's tagger), with
    the per-token accuracy next to it."""
    control = cfg.control
    tagger, train_tags, tagset = pos_annotations(cfg, prep, tagger)
    target = parse_pos_target(control.target, tagset, cfg.max_len)
    if classifier is None:
        index = {t: i for i, t in enumerate(tagset)}
        table = torch.full((len(train_tags), cfg.max_len), -100, dtype=torch.long)
        for r, (row, tags) in enumerate(zip(prep.rows["train"], train_tags)):
            table[r, : len(row)] = torch.tensor([index[t] for t in tags[: len(row)]])
        torch.manual_seed(cfg.train.seed)
        classifier = POSClassifier(model.emb_dim, control.classifier_hidden, cfg.max_len, len(tagset))

        def loss(clf: torch.nn.Module, batch: dict[str, torch.Tensor]):
            return pos_loss(clf, model, batch, table[batch["rows"].cpu()].to(batch["rows"].device))

        classifier = fit_classifier(cfg, model, prep, classifier, loss, "classifier_pos")
    classifier.to(model.word_emb.weight.device)
    ids = [tagset.index(t) for t in target]
    guide = pos_guidance(classifier, ids, control.step_size, control.guidance_steps, control.fluency)

    def success(samples: list[list[str]]) -> dict[str, float]:
        tags = [list(tagger(s)) for s in samples]
        hits = sum(a == b for row in tags for a, b in zip(row, target))
        return {
            "success": sum(row == target for row in tags) / len(samples),
            "token_accuracy": hits / (len(samples) * len(target)),
        }

    lengths = torch.full((control.samples,), len(target))
    return {"task": "pos", "target": target, **_guided_vs_unguided(cfg, model, prep, guide, success, lengths)}


def span_control(
    cfg: MDLMConfig,
    model: MaskedDiffuseLM,
    prep: Prepared,
    parser: SpanParser | None = None,
    classifier: SpanClassifier | None = None,
) -> dict[str, Any]:
    """Syntax-span control: samples guided toward "words i..j form a constituent X"; success is
    the share whose parse (the grammar's recogniser or the user's parser; no parse is a miss)
    contains the span. Lengths are drawn from the train sentences that have the span: a length
    that cannot hold it would only measure the length sampler."""
    control = cfg.control
    parser, train_spans, labels = span_annotations(cfg, prep, parser)
    first, last, label = parse_span_target(control.target, labels, cfg.max_len)
    lengths = [len(row) for row in prep.rows["train"]]
    hits = [n for n, spans in zip(lengths, train_spans) if (first, last, label) in spans]
    if not hits:
        counts = Counter(span for spans in train_spans for span in spans)
        common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        raise ConfigError(
            f"control.target={control.target!r}: no train sentence has this constituent; "
            f"frequent ones: {'; '.join(f'{i},{j},{x}' for (i, j, x), _ in common)}"
        )
    if classifier is None:
        gold = [  # a truncated row keeps the spans inside it
            [(i, j, labels.index(x)) for i, j, x in sorted(spans) if j < n]
            for spans, n in zip(train_spans, lengths)
        ]
        torch.manual_seed(cfg.train.seed)
        classifier = SpanClassifier(model.emb_dim, control.classifier_hidden, cfg.max_len, len(labels))

        def loss(clf: torch.nn.Module, batch: dict[str, torch.Tensor]):
            rows = batch["rows"].tolist()
            targets, valid = span_table(
                [gold[r] for r in rows], [lengths[r] for r in rows], cfg.max_len, len(labels)
            )
            device = batch["rows"].device
            return span_loss(clf, model, batch, targets.to(device), valid.to(device))

        classifier = fit_classifier(cfg, model, prep, classifier, loss, "classifier_span")
    classifier.to(model.word_emb.weight.device)
    target = (first, last, labels.index(label))
    guide = span_guidance(classifier, target, control.step_size, control.guidance_steps, control.fluency)

    def success(samples: list[list[str]]) -> dict[str, float]:
        parses = [parser(s) for s in samples]
        return {
            "success": sum(p is not None and (first, last, label) in set(p) for p in parses) / len(samples),
            "parsed": sum(p is not None for p in parses) / len(samples),
        }

    torch.manual_seed(cfg.train.seed)  # lengths ~ p(length | the train sentence has the span)
    pick = torch.randint(len(hits), (control.samples,))
    results = _guided_vs_unguided(cfg, model, prep, guide, success, torch.tensor(hits)[pick])
    return {"task": "span", "target": [first, last, label], **results}


def controlled_generation(
    cfg: MDLMConfig,
    model: MaskedDiffuseLM,
    prep: Prepared,
    classifier: torch.nn.Module | None = None,
    tagger: Tagger | None = None,
    parser: SpanParser | None = None,
) -> dict[str, Any]:
    """Guided vs unguided samples from the same noise (same seed): control success and fluency.
    ``tagger`` / ``parser``: the user's, for pos / span control on real data."""
    control, n = cfg.control, cfg.control.samples
    if control.task == "pos":
        return pos_control(cfg, model, prep, tagger, classifier)
    if control.task == "span":
        return span_control(cfg, model, prep, parser, classifier)
    results: dict[str, Any] = {"task": control.task}
    if control.task == "length":
        length = min(control.length, cfg.max_len)
        lengths = torch.full((n,), length)
        torch.manual_seed(cfg.train.seed)
        samples = decode(prep.vocab, generate(cfg, model, n, lengths))
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

    def success(samples: list[list[str]]) -> dict[str, float]:
        return {"success": sum(control.target in s for s in samples) / n}

    return {**results, **_guided_vs_unguided(cfg, model, prep, guide, success)}


def evaluate(cfg: MDLMConfig, control: bool = False, checkpoint: str | None = None) -> dict[str, Any]:
    """Samples with the EMA weights and their metrics; with ``control``, guided generation."""
    model, prep = load_trained(cfg, checkpoint)
    torch.manual_seed(cfg.train.seed)
    samples = decode(prep.vocab, generate(cfg, model, cfg.eval_samples))
    out: dict[str, Any] = {
        **generation_metrics(samples, prep.allowed),
        "examples": [" ".join(s) for s in samples[:5]],
    }
    if control:
        out["control"] = controlled_generation(cfg, model, prep)
    return out
