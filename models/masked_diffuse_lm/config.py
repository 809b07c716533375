"""Typed configuration of Masked-Diffuse LM. Defaults are the paper's setting (§4.3, §6.3): the
two-term CE objective, m = 3 buckets, T=500, sqrt schedule, lr 3e-4, 20,000 steps, batch 32,
1,000 linear warm-up steps, MBR decoding; with the official README's seed 0, BERT-base denoiser
and EMA decoding. The E2E control runs use 16-dim embeddings, the ROCStories command 128."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from smile.moe import MoEConfig
from smile.runtime import CheckpointConfig, ConfigError, EMAConfig, LogConfig, TrainConfig


@dataclass
class BackboneCfg:
    """The denoiser's BertConfig (BERT-base by default, as the paper's backbone)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1

    def validate(self, where: str = "backbone") -> None:
        if min(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size) < 1:
            raise ConfigError(f"{where}: sizes must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{where}.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout={self.dropout} must be in [0, 1)")


@dataclass
class DataCfg:
    """source: grammar (offline synthetic, ``grammar_sentences``), e2e (``data_dir`` from
    ``datasets.save_to_disk``, or ``hf_path`` through the HF cache ``cache_dir``), roc (official
    ROCStories CSV files in ``data_dir``). ``min_count``: rarer train words become [UNK]."""

    source: Literal["grammar", "e2e", "roc"] = "e2e"
    data_dir: str | None = None
    hf_path: str = "e2e_nlg"
    cache_dir: str | None = None
    grammar_sentences: int = 2000
    min_count: int = 1
    seed: int = 0


@dataclass
class ControlCfg:
    """Guided generation (``eval --control``). task: content (samples must contain ``target``
    word; a latent classifier guides), length (samples of ``length`` words; met by the mask), pos
    (``target`` a tag sequence such as ``"DET NOUN VERB"``; the samples have its length) or span
    (``target`` ``"i,j,LABEL"``: words i..j, 0-based and inclusive, form a constituent LABEL).
    pos / span read the synthetic grammar's own lexicon and parser; on real data they need
    ``tagger`` (pos) / ``parser`` (span), a ``"module:function"`` the user supplies: words -> tags,
    words -> [(i, j, label), ...] or None (no parse); nothing is bundled or downloaded.
    The classifier trains ``classifier_steps`` steps at ``classifier_lr``; guidance takes
    ``guidance_steps`` gradient steps of ``step_size`` per reverse step, with ``fluency`` weight."""

    task: Literal["content", "length", "pos", "span"] = "content"
    target: str | None = None
    length: int = 10
    tagger: str | None = None
    parser: str | None = None
    classifier_hidden: int = 128
    classifier_steps: int = 2000
    classifier_lr: float = 1e-3
    step_size: float = 0.1
    guidance_steps: int = 3
    fluency: float = 0.01
    samples: int = 200


@dataclass
class MDLMConfig:
    """Masked-Diffuse LM, end to end (the spec's MDLMConfig plus the runtime's ``train``).

    vocab_path: a vocabulary file (one token per line) to use; None builds it from the train split
        (saved as ``<run_dir>/vocab.txt``). unk: whether unknown words map to [UNK].
    n_buckets: importance buckets, 1..T (the paper's m = 3); 1 is Diffusion-LM's uniform noise.
    objective: ``paper``: gamma_t CE(f, d) + CE(f, d_hat) with a [MASK] class (§4.3); ``ce``: the
        single CE of the words (diffusion.py says what d_hat is and why paper is the default).
    use_pretrained_emb / encoder_path: x_0 from a local pretrained encoder's (BERT) word-piece
        embeddings, averaged per word and frozen.
    lr / steps / batch_size / warmup_steps: the optimisation (global batch over ranks; linear
        warm-up, then linear decay to 0); ``train`` holds the rest.
    decode: ``mbr`` keeps, per output, the minimum-Bayes-risk sample of ``mbr_samples`` (the
        paper decodes with MBR, following Diffusion-LM); ``sample``: one sample per output.
    sample_steps: reverse steps when sampling (None: all T). x0_mode: expected or argmax x0_hat.
    eval_samples: samples generated at each evaluation (the eval hook), with EMA weights.
    moe: swap the denoiser's FFNs for smile MoE layers.
    """

    run_dir: str = "runs/masked_diffuse_lm"
    vocab_path: str | None = None
    unk: bool = True
    max_len: int = 64
    truncate: bool = False
    emb_dim: int = 16
    T: int = 500
    schedule: Literal["sqrt", "linear"] = "sqrt"
    n_buckets: int = 3
    objective: Literal["paper", "ce"] = "paper"
    importance: Literal["tfidf+entropy"] = "tfidf+entropy"
    use_pretrained_emb: bool = False
    encoder_path: str | None = None
    lr: float = 3e-4
    steps: int = 20_000
    batch_size: int = 32
    warmup_steps: int = 1_000
    sample_steps: int | None = None
    x0_mode: Literal["expected", "argmax", "hybrid"] = "expected"
    eval_samples: int = 64
    decode: Literal["mbr", "sample"] = "mbr"
    mbr_samples: int = 10
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    data: DataCfg = field(default_factory=DataCfg)
    control: ControlCfg = field(default_factory=ControlCfg)
    moe: MoEConfig | None = None
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            zero_stage=2,
            checkpoint=CheckpointConfig(every=10_000, keep_last=2),
            log=LogConfig(every=100),
            ema=EMAConfig(decay=0.9999),
            eval_every=10_000,
        )
    )

    def validate(self, where: str = "masked_diffuse_lm") -> None:
        if self.T < 1:
            raise ConfigError(f"{where}.T={self.T} must be >= 1")
        if not 1 <= self.n_buckets <= self.T:
            raise ConfigError(f"{where}.n_buckets={self.n_buckets} must be in [1, T={self.T}]")
        for name in ("max_len", "emb_dim", "steps", "batch_size", "eval_samples", "mbr_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps={self.warmup_steps} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr={self.lr} must be > 0")
        if self.sample_steps is not None and not 1 <= self.sample_steps <= self.T:
            raise ConfigError(f"{where}.sample_steps={self.sample_steps} must be in [1, T={self.T}]")
        if self.use_pretrained_emb and (self.encoder_path is None or not Path(self.encoder_path).is_dir()):
            raise FileNotFoundError(
                f"{where}.use_pretrained_emb=true needs a local encoder_path directory "
                f"(from_pretrained layout), got {self.encoder_path!r}"
            )
        if self.data.source == "roc" and self.data.data_dir is None:
            raise ConfigError(f"{where}.data.data_dir must name the ROCStories folder for source=roc")
        self.backbone.validate(f"{where}.backbone")
