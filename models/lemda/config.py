"""Typed configuration of a LeMDA job: the method, the encoders and fusion, the data, the runtime.

Defaults are the paper's and the official code's (``fusion_mlp_image_text_tabular.yaml`` and
``adamw.yaml`` of lzcemma/LeMDA). Every section validates itself with errors that name the
field, the bad value and what is allowed (loading goes through ``smile.runtime.load_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from smile.moe import MoEConfig
from smile.runtime import ConfigError, TrainConfig

MODALITIES = ("tabular", "text", "image")


@dataclass
class LeMDAConfig:
    """The augmentation network, its losses and the two optimizers.

    augment: False trains the same late-fusion model without the augmenter (the baseline).
    noise_std: the naive ablation, only with augment=False: h trains on ``[f; f']`` with tiled
        labels as in LeMDA, but ``f' = f.detach() + noise_std * std(f) * N(0, I)`` (std per feature
        over the batch): Gaussian noise in the same place of the network, nothing learned.
    arch: "mlp_vae" (MLP VAE over the concatenated features) or "trans_vae" (a transformer VAE
        over the modality tokens).
    z_dim / n_layer: latent width and number of narrowing encoder layers (mlp_vae) or of
        transformer layers (trans_vae); n_head / tran_hidden: trans_vae attention heads, FFN width.
    reg_w, kl_w, cons_w: weights of ``MSE(f', f)``, ``KL(q(z|f) || N(0, I)) / (B z_dim)`` and the
        confidence-masked consistency ``KL(p(f') || p(f))``; cons_threshold: the confidence mask.
    adv_scale: f' enters the task loss through a gradient reversal of this scale.
    cons_updates_task: the official code lets the consistency loss update the task network; the
        paper's task objective has no consistency term, so by default h is frozen in it.
    freeze_encoders: train only h and G on fixed features (the encoders and adapters keep their
        initial or loaded weights), so that with a few training rows the encoders cannot move f
        to memorise them and G perturbs features that stay put, like pretrained ones.
    task_* / aug_*: AdamW (with cosine decay, warmup_ratio, layer-wise lr decay over pretrained
        encoder layers) for the task network, Adam for the augmenter; both step every iteration.
    epochs, batch_size: the effective batch over all ranks; max_steps, if set, replaces epochs.
    """

    augment: bool = True
    noise_std: float = 0.0
    arch: Literal["mlp_vae", "trans_vae"] = "mlp_vae"
    z_dim: int = 8
    n_layer: int = 4
    n_head: int = 8
    tran_hidden: int = 2048
    dropout: float = 0.5
    reg_w: float = 0.1
    kl_w: float = 0.1
    cons_w: float = 0.01
    cons_threshold: float = 0.5
    adv_scale: float = 1e-4
    cons_updates_task: bool = False
    freeze_encoders: bool = False
    task_lr: float = 1e-4
    task_wd: float = 1e-3
    layerwise_lr_decay: float = 0.8
    warmup_ratio: float = 0.1
    aug_lr: float = 1e-4
    aug_wd: float = 1e-5
    epochs: int = 10
    batch_size: int = 128
    max_steps: int | None = None

    def validate(self, where: str = "lemda") -> None:
        _at_least(f"{where}.z_dim", self.z_dim, 1)
        _at_least(f"{where}.noise_std", self.noise_std, 0.0)
        if self.augment and self.noise_std > 0:
            raise ConfigError(
                f"{where}.noise_std={self.noise_std} is the Gaussian-noise ablation; "
                f"it needs {where}.augment=false"
            )
        _at_least(f"{where}.n_layer", self.n_layer, 1)
        _at_least(f"{where}.n_head", self.n_head, 1)
        _at_least(f"{where}.tran_hidden", self.tran_hidden, 1)
        _in_range(f"{where}.dropout", self.dropout, 0.0, 1.0, high_open=True)
        _in_range(f"{where}.cons_threshold", self.cons_threshold, 0.0, 1.0)
        _in_range(f"{where}.layerwise_lr_decay", self.layerwise_lr_decay, 0.0, 1.0, low_open=True)
        _in_range(f"{where}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        for name in ("reg_w", "kl_w", "cons_w", "adv_scale", "task_lr", "task_wd", "aug_lr", "aug_wd"):
            _at_least(f"{where}.{name}", getattr(self, name), 0.0)
        _at_least(f"{where}.epochs", self.epochs, 1)
        _at_least(f"{where}.batch_size", self.batch_size, 1)
        if self.max_steps is not None:
            _at_least(f"{where}.max_steps", self.max_steps, 1)


@dataclass
class EncoderConfig:
    """One modality's encoder and the table columns it reads.

    kind: "tabular" (MLP over numerical and categorical columns), "text" or "image" (a
        transformers backbone).
    path: a local ``from_pretrained`` directory (weights, config, and the tokenizer or image
        processor); nothing is fetched from a hub. Without it, ``hf_config`` builds a randomly
        initialised backbone (``AutoConfig.for_model(**hf_config)``; it must name model_type).
    tokenizer: text only, when ``path`` is unset: a local tokenizer directory or tokenizer.json.
    columns: text columns (joined with the separator token) or the one image column.
    numerical / categorical: tabular columns; hidden, num_layers, norm, dropout, activation and
        cat_dim shape the MLP (the official numerical/categorical MLPs: width 128, LayerNorm,
        leaky ReLU, dropout 0.1).
    max_length: text truncation; pooling: "cls" (first token) or "mean" over the sequence
        ("pooler" uses the backbone's pooled output, e.g. ConvNeXt or ResNet).
    moe: swap this backbone's FFNs for smile MoE layers (``smile.hf.moefy.moefy`` with the
        model's ``moe`` spec; the backbone family must be one moefy supports).
    """

    name: str = ""
    kind: Literal["tabular", "text", "image"] = "tabular"
    path: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    columns: list[str] = field(default_factory=list)
    numerical: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    hidden: int = 128
    num_layers: int = 1
    norm: Literal["layer", "batch"] = "layer"
    dropout: float = 0.1
    activation: Literal["leaky_relu", "relu", "gelu"] = "leaky_relu"
    cat_dim: int = 16
    max_length: int = 512
    pooling: Literal["cls", "mean", "pooler"] = "cls"
    moe: bool = False

    def validate(self, where: str = "encoder") -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(f"{where}.name={self.name!r} must be a non-empty name of letters, digits or _")
        _at_least(f"{where}.hidden", self.hidden, 1)
        _at_least(f"{where}.num_layers", self.num_layers, 1)
        _at_least(f"{where}.cat_dim", self.cat_dim, 1)
        _at_least(f"{where}.max_length", self.max_length, 2)
        _in_range(f"{where}.dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.kind == "tabular":
            if self.moe:
                raise ConfigError(
                    f"{where}.moe=true needs a transformers backbone; a tabular MLP has no FFN blocks"
                )
            if not self.numerical and not self.categorical:
                raise ConfigError(f"{where}: a tabular encoder needs numerical and/or categorical columns")
            if self.columns:
                raise ConfigError(f"{where}.columns is for text/image; use numerical/categorical for tabular")
            return
        if self.numerical or self.categorical:
            raise ConfigError(f"{where}: numerical/categorical are tabular fields; {self.kind} uses columns")
        if not self.columns:
            raise ConfigError(f"{where}.columns must name the {self.kind} column(s)")
        if self.kind == "image" and len(self.columns) != 1:
            raise ConfigError(f"{where}.columns must name exactly one image column, got {self.columns}")
        if self.path is None and not self.hf_config.get("model_type"):
            raise ConfigError(
                f"{where}: set path (a local from_pretrained directory) or hf_config with a model_type"
            )
        if self.kind == "text" and self.path is None and self.tokenizer is None:
            raise ConfigError(
                f"{where}.tokenizer must be a local tokenizer directory or file when path is unset"
            )


@dataclass
class FusionConfig:
    """Late fusion: per-modality adapters to a common width, concatenation (f), MLP, head.

    adapter: "max" or "min" of the encoders' widths (the official "adapt_in_features"), or a
        number; hidden: widths of the fusion MLP units (norm -> Linear -> act -> dropout).
    """

    adapter: str = "max"
    hidden: list[int] = field(default_factory=lambda: [128])
    activation: Literal["leaky_relu", "relu", "gelu"] = "leaky_relu"
    dropout: float = 0.1

    def validate(self, where: str = "fusion") -> None:
        if self.adapter not in ("max", "min") and not (self.adapter.isdigit() and int(self.adapter) > 0):
            raise ConfigError(f"{where}.adapter={self.adapter!r}; allowed: 'max', 'min' or a positive width")
        for i, width in enumerate(self.hidden):
            _at_least(f"{where}.hidden[{i}]", width, 1)
        _in_range(f"{where}.dropout", self.dropout, 0.0, 1.0, high_open=True)


@dataclass
class ModelConfig:
    """The late-fusion classifier: one encoder per modality, and the fusion; ``moe`` is the
    MoE layer spec for the encoders that set ``moe: true`` (the augmenter stays dense)."""

    encoders: list[EncoderConfig] = field(default_factory=list)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    moe: MoEConfig | None = None

    def validate(self, where: str = "model") -> None:
        if not self.encoders:
            raise ConfigError(f"{where}.encoders must list at least one encoder")
        names = [e.name for e in self.encoders]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{where}.encoders: names must be unique, repeated: {repeated}")
        wants_moe = [e.name for e in self.encoders if e.moe]
        if wants_moe and self.moe is None:
            raise ConfigError(f"{where}.moe must be set: encoder(s) {wants_moe} have moe=true")
        if self.moe is not None and not wants_moe:
            raise ConfigError(f"{where}.moe is set but no encoder has moe=true")


@dataclass
class DataConfig:
    """Where the table comes from and how it is split and batched.

    source: "sklearn" (offline; name "wine": 13 features, or "digits": the 64 pixels of 8x8
        digit images, as columns f0.., label "label"),
        "csv" (name is a directory holding ``<split>.csv``; image cells are paths relative to
        image_root, default that directory; several paths separated by ';' use the first),
        "jsonl" (``<split>.jsonl`` in that directory, one JSON object per row), or
        "hf" (name is a ``datasets`` id, read from the local cache, or a ``save_to_disk``
        directory; hf_name selects a configuration).
    label: the label column; classes are the sorted distinct labels of the train split.
    noise_std: sklearn only, Gaussian noise in units of each feature's std, added to every split;
        shift_std: more such noise on the validation and test splits only (a covariate shift).
    label_noise: sklearn only, this fraction of the train rows gets a uniformly drawn other label
        (seeded by ``seed``; validation and test stay clean): fitting those rows hurts, the regime
        where a label-preserving augmenter should help.
    test_fraction, seed: sklearn only, the stratified held-out split; val_fraction (of all rows)
        holds out a stratified "validation" split from the rest (for choosing hyperparameters);
        train_rows keeps a stratified subset of that many train rows (the few-row regime).
    max_rows: keep at most this many rows of each split (quick runs).
    """

    source: Literal["sklearn", "csv", "jsonl", "hf"] = "sklearn"
    name: str = "wine"
    hf_name: str | None = None
    label: str = "label"
    train_split: str = "train"
    eval_split: str = "test"
    image_root: str | None = None
    noise_std: float = 0.0
    shift_std: float = 0.0
    label_noise: float = 0.0
    test_fraction: float = 0.3
    val_fraction: float = 0.0
    train_rows: int | None = None
    seed: int = 0
    max_rows: int | None = None
    eval_batch_size: int = 64
    num_workers: int = 0

    def validate(self, where: str = "data") -> None:
        if not self.name:
            raise ConfigError(f"{where}.name must name the dataset")
        if self.source == "sklearn" and self.name not in ("wine", "digits"):
            raise ConfigError(
                f"{where}.name={self.name!r} is not a sklearn dataset here; allowed: 'wine', 'digits'"
            )
        _at_least(f"{where}.noise_std", self.noise_std, 0.0)
        _at_least(f"{where}.shift_std", self.shift_std, 0.0)
        _in_range(f"{where}.label_noise", self.label_noise, 0.0, 1.0)
        _in_range(f"{where}.test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _in_range(f"{where}.val_fraction", self.val_fraction, 0.0, 1.0 - self.test_fraction, high_open=True)
        if self.train_rows is not None:
            _at_least(f"{where}.train_rows", self.train_rows, 2)
        _at_least(f"{where}.seed", self.seed, 0)
        _at_least(f"{where}.eval_batch_size", self.eval_batch_size, 1)
        _at_least(f"{where}.num_workers", self.num_workers, 0)
        if self.max_rows is not None:
            _at_least(f"{where}.max_rows", self.max_rows, 2)


@dataclass
class JobConfig:
    """A whole ``smile zoo lemda`` run. ``train.optimizers`` is derived from ``lemda`` (task and
    augmenter optimizers), and ``train.max_steps`` / ``train.micro_batch_size`` from
    ``lemda.epochs`` / ``lemda.max_steps`` and ``lemda.batch_size``: leave them unset there.
    metric: reported besides accuracy and loss: "roc_auc" (binary tasks) or "quadratic_kappa"
    (ordinal classes in sorted label order, e.g. PetFinder's AdoptionSpeed 0-4)."""

    lemda: LeMDAConfig = field(default_factory=LeMDAConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metric: Literal["accuracy", "roc_auc", "quadratic_kappa"] = "accuracy"

    def validate(self, where: str = "job") -> None:
        defaults = TrainConfig()
        for name in ("optimizers", "max_steps", "micro_batch_size"):
            if getattr(self.train, name) != getattr(defaults, name):
                raise ConfigError(
                    f"{where}.train.{name} is derived from the lemda section (task_lr/aug_lr..., "
                    f"epochs/max_steps, batch_size); remove it from train"
                )


def _at_least(where: str, value: float, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{where} must be >= {minimum}, got {value!r}")


def _in_range(
    where: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{where} must be in {interval}, got {value!r}")
