"""The two stages as runs of the shared runtime's Trainer, and the evaluation of either stage.

Run directory layout (``cfg.run_dir``)::

    stage1/  checkpoints/step_*/ (runtime)  metrics.jsonl  trap_replace.json  selected.json
             parts/{stem,head,decoder}.safetensors  eval.json
    stage2/  the same, without a decoder

``trap_replace.json`` records the config and a fingerprint of the holdout/poison split;
``selected.json`` names the checkpoint a stage hands on. Stage 2 takes its stem from
``cfg.init_from`` (a checkpoint or a stage-1 run directory) or from ``<run_dir>/stage1``, reading
the checkpoint path there (never rebuilding it from hyperparameters), and refuses a stage 1 whose
holdout differs from its own. Both stages resume from their newest checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from smile.models.trap_replace.config import TrapReplaceConfig
from smile.models.trap_replace.datasets import ImageDataset, load_image_dataset
from smile.models.trap_replace.loaders import Batches
from smile.models.trap_replace.losses import Stage1Loss, Stage2Loss
from smile.models.trap_replace.metrics import ca_asr, predictions
from smile.models.trap_replace.networks import StemHeadDecoder, build_network, replace_head
from smile.models.trap_replace.poison import (
    PoisonSplit,
    holdout_val_split,
    make_poisoned_split,
    make_test_sets,
    split_digest,
)
from smile.runtime import (
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    Trainer,
    config_to_dict,
    init_distributed,
    latest_checkpoint,
    load_weights,
)
from smile.runtime.checkpoint import MANIFEST, step_dir_name
from smile.runtime.metrics import read_records

log = logging.getLogger(__name__)

SETUP_FILE = "trap_replace.json"
SELECTED_FILE = "selected.json"
EVAL_FILE = "eval.json"


@dataclass
class StageResult:
    stage: int
    run_dir: Path
    checkpoint: Path
    losses: list[float]
    resumed_from: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def stage_dir(cfg: TrapReplaceConfig, stage: int) -> Path:
    return Path(cfg.run_dir) / f"stage{stage}"


def is_rank0() -> bool:
    """Whether this process writes the run's files (rank 0, or no process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _write_json(path: Path, obj: Any) -> None:
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(obj, indent=1))
        tmp.replace(path)


def prepare(
    cfg: TrapReplaceConfig, dataset: ImageDataset | None = None, hard_images: torch.Tensor | None = None
) -> tuple[ImageDataset, PoisonSplit]:
    """The dataset (``cfg.data`` unless given) and its seeded poisoned split."""
    dataset = dataset if dataset is not None else load_image_dataset(cfg.data, seed=cfg.poison.seed)
    return dataset, make_poisoned_split(dataset, cfg.poison, hard_images=hard_images)


def build_model(
    cfg: TrapReplaceConfig, dataset: ImageDataset, with_decoder: bool | None = None
) -> StemHeadDecoder:
    """The stage-1 network for ``dataset`` (decoder unless both stage-1 weights are 0)."""
    return build_network(
        cfg.arch,
        cfg.stem_end_block,
        dataset.num_classes,
        in_channels=dataset.channels,
        base_width=cfg.base_width,
        decoder_channels=cfg.decoder_channels,
        with_decoder=cfg.with_decoder if with_decoder is None else with_decoder,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def _per_rank(batch_size: int, world: int) -> int:
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {world} ranks")
    return batch_size // world


def stage_train_config(
    cfg: TrapReplaceConfig, stage: int, steps_per_epoch: int, per_rank: int
) -> TrainConfig:
    """The runtime config of one stage: ``cfg.train`` with this stage's run dir, length, batch,
    optimizer (weight decay on every parameter, like torch's Adam/SGD in the official code) and
    checkpoint cadence. Checkpoints always live under the stage's own run directory."""
    optim = cfg.stage1 if stage == 1 else cfg.stage2
    train = copy.deepcopy(cfg.train)
    train.run_dir = str(stage_dir(cfg, stage))
    train.max_steps = optim.epochs * steps_per_epoch
    train.micro_batch_size = per_rank
    train.grad_accum_steps = 1
    train.optimizers = [
        OptimizerConfig(
            name="stage1" if stage == 1 else "head",
            type=optim.type,
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            momentum=optim.momentum if optim.type == "sgd" else 0.0,
            decay_1d=True,
            schedule=ScheduleConfig(kind=optim.schedule),
        )
    ]
    train.checkpoint.dir = None
    train.checkpoint.export_dir = None
    train.checkpoint.every = cfg.checkpoint_every_epochs * steps_per_epoch
    train.eval_every = 0
    train.validate()
    return train


def _train_batches(cfg: TrapReplaceConfig, images, per_rank: int):
    def factory(rank: int, world: int) -> Batches:
        return Batches(
            images,
            per_rank,
            shuffle=True,
            augment=cfg.data.augment,
            crop=cfg.data.crop,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
        )

    return factory


def _eval_batches(cfg: TrapReplaceConfig, images) -> Batches:
    augment = "center_crop" if cfg.data.augment == "resized_crop" else "none"
    return Batches(
        images,
        cfg.data.eval_batch_size,
        shuffle=False,
        augment=augment,
        crop=cfg.data.crop,
        num_workers=cfg.data.num_workers,
    )


def save_parts(model: StemHeadDecoder, out_dir: Path) -> None:
    """Stem, head and decoder weights as separate safetensors files (rank 0)."""
    if not is_rank0():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("stem", "head", "decoder"):
        part = getattr(model, name)
        if part is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in part.state_dict().items()}
            save_file(state, str(out_dir / f"{name}.safetensors"))


def _finish(
    cfg: TrapReplaceConfig,
    stage: int,
    model: StemHeadDecoder,
    split: PoisonSplit,
    trainer: Trainer,
    checkpoint: Path,
    selection: dict[str, Any],
    evaluate: bool,
) -> dict[str, float]:
    out = stage_dir(cfg, stage)
    _write_json(out / SELECTED_FILE, {"checkpoint": str(checkpoint.resolve()), **selection})
    save_parts(model, out / "parts")
    metrics: dict[str, float] = {}
    if evaluate:
        metrics = ca_asr(
            model,
            _eval_batches(cfg, split.test_clean),
            _eval_batches(cfg, split.test_triggered),
            cfg.poison.target,
            trainer.device,
        )
        _write_json(out / EVAL_FILE, {"checkpoint": str(checkpoint.resolve()), **metrics})
    if dist.is_initialized():
        dist.barrier()
    return metrics


def train_stage1(
    cfg: TrapReplaceConfig,
    *,
    dataset: ImageDataset | None = None,
    hard_images: torch.Tensor | None = None,
    evaluate: bool = True,
) -> StageResult:
    """Bait and trap: stem + head + decoder on the poisoned training set (CE + MSE + TV).
    With rec_weight = tv_weight = 0 this is the no-defense baseline (plain CE, no decoder)."""
    topology = init_distributed(cfg.train.dist)
    world = dist.get_world_size()
    dataset, split = prepare(cfg, dataset, hard_images)
    per_rank = _per_rank(cfg.stage1.batch_size, world)
    data = _train_batches(cfg, split.train, per_rank)
    train_cfg = stage_train_config(cfg, 1, len(data(0, world)), per_rank)
    if (stage_dir(cfg, 1) / SETUP_FILE).is_file():  # resuming: the split must be the same
        _stage1_setup(stage_dir(cfg, 1), split)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, dataset)
    _write_json(
        stage_dir(cfg, 1) / SETUP_FILE,
        {
            "config": config_to_dict(cfg),
            "split_digest": split_digest(split),
            "with_decoder": cfg.with_decoder,
            "poisoned": int(split.train.poisoned.sum()),
            "train_size": len(split.train),
            "holdout_size": len(split.holdout),
        },
    )
    loss = Stage1Loss(cfg.rec_weight, cfg.tv_weight)
    trainer = Trainer(model, loss, train_cfg, data, topology=topology)
    fit = trainer.fit()
    checkpoint = Path(fit.checkpoint) if fit.checkpoint else latest_checkpoint(train_cfg.checkpoint_dir)
    metrics = _finish(
        cfg, 1, model, split, trainer, checkpoint, {"selection": "last", "step": fit.step}, evaluate
    )
    return StageResult(1, stage_dir(cfg, 1), checkpoint, fit.losses, fit.resumed_from, metrics)


def find_stage1_checkpoint(cfg: TrapReplaceConfig) -> tuple[Path, Path | None]:
    """(stage-1 checkpoint, stage-1 run dir if known) from ``cfg.init_from`` or ``<run_dir>/stage1``:
    a checkpoint directory, or a run directory with selected.json or checkpoints/."""
    source = Path(cfg.init_from) if cfg.init_from else stage_dir(cfg, 1)
    if (source / MANIFEST).is_file():
        run = source.parent.parent
        return source, run if (run / SETUP_FILE).is_file() else None
    selected = source / SELECTED_FILE
    if selected.is_file():
        path = Path(json.loads(selected.read_text())["checkpoint"])
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{selected} names checkpoint {str(path)!r}, which is not a complete checkpoint"
            )
        return path, source
    latest = latest_checkpoint(source / "checkpoints")
    if latest is None:
        raise FileNotFoundError(
            f"stage 2 needs a stage-1 checkpoint: {str(source)!r} is neither a checkpoint nor a stage-1 run "
            "directory with one (run `smile zoo trap_replace train --stage 1` first, or set init_from)"
        )
    return latest, source


def _stage1_setup(run: Path | None, split: PoisonSplit) -> dict[str, Any]:
    if run is None:
        log.warning(
            "stage-1 checkpoint has no %s beside it: cannot check that its holdout is ours", SETUP_FILE
        )
        return {}
    setup = json.loads((run / SETUP_FILE).read_text())
    if setup["split_digest"] != split_digest(split):
        raise ValueError(
            f"stage 1 in {str(run)!r} was trained on a different holdout/poison split (poison settings or "
            "dataset differ): its training set may overlap this stage's holdout; use the same poison section"
        )
    return setup


def _load_stage1(
    cfg: TrapReplaceConfig, dataset: ImageDataset, split: PoisonSplit
) -> tuple[StemHeadDecoder, Path]:
    checkpoint, run = find_stage1_checkpoint(cfg)
    setup = _stage1_setup(run, split)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, dataset, with_decoder=setup.get("with_decoder"))
    load_weights(model, checkpoint)
    return model, checkpoint


def _val_accuracy(model, batches, ctx) -> dict[str, float]:
    pred, labels = predictions(model, batches, ctx.device)
    return {"val_acc": float((pred == labels).double().mean())}


def _best_val_checkpoint(run: Path, checkpoints: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of the step with the best holdout-validation accuracy (latest on ties)."""
    by_step = {
        r["step"]: r["val_acc"] for r in read_records(run / "metrics.jsonl") if r.get("split") == "eval"
    }
    usable = {s: acc for s, acc in by_step.items() if (checkpoints / step_dir_name(s) / MANIFEST).is_file()}
    if not usable:
        raise FileNotFoundError(f"no checkpoint in {checkpoints} has a holdout-validation record")
    step = max(usable, key=lambda s: (usable[s], s))
    return checkpoints / step_dir_name(step), {
        "selection": "holdout_val",
        "step": step,
        "val_acc": usable[step],
    }


def train_stage2(
    cfg: TrapReplaceConfig,
    *,
    dataset: ImageDataset | None = None,
    hard_images: torch.Tensor | None = None,
    evaluate: bool = True,
) -> StageResult:
    """Replace: frozen stage-1 stem (BN statistics included), fresh dropout head trained on the
    clean holdout only with CutMix + label smoothing."""
    topology = init_distributed(cfg.train.dist)
    world = dist.get_world_size()
    dataset, split = prepare(cfg, dataset, hard_images)
    model, source = _load_stage1(cfg, dataset, split)
    torch.manual_seed(cfg.train.seed + 1)
    replace_head(model, cfg.head_dropout)
    if cfg.stage2.type in ("adam", "adamw") and cfg.stage2.lr >= 0.01:
        log.warning(
            "stage 2 uses %s with lr=%g: the official default, unusually high for Adam",
            cfg.stage2.type,
            cfg.stage2.lr,
        )
    holdout, val = split.holdout, None
    if cfg.selection == "holdout_val":
        holdout, val = holdout_val_split(split.holdout, cfg.val_fraction, cfg.poison.seed)
    per_rank = _per_rank(cfg.stage2.batch_size, world)
    data = _train_batches(cfg, holdout, per_rank)
    steps_per_epoch = len(data(0, world))
    train_cfg = stage_train_config(cfg, 2, steps_per_epoch, per_rank)
    if val is not None:
        every = cfg.val_every_epochs * steps_per_epoch
        train_cfg.eval_every = every
        train_cfg.checkpoint.every = every
        train_cfg.checkpoint.keep_last = train_cfg.max_steps // every + 1
    trainer = Trainer(
        model,
        Stage2Loss(cfg.cutmix_beta, cfg.cutmix_prob, cfg.label_smoothing, cfg.train.seed),
        train_cfg,
        data,
        eval_data=None if val is None else _eval_batches(cfg, val),
        eval_fn=None if val is None else _val_accuracy,
        topology=topology,
    )
    fit = trainer.fit()
    if val is None:
        checkpoint = Path(fit.checkpoint) if fit.checkpoint else latest_checkpoint(train_cfg.checkpoint_dir)
        selection: dict[str, Any] = {"selection": "last", "step": fit.step}
    else:
        checkpoint, selection = _best_val_checkpoint(stage_dir(cfg, 2), train_cfg.checkpoint_dir)
        load_weights(model, checkpoint)
    selection["stage1_checkpoint"] = str(source.resolve())
    metrics = _finish(cfg, 2, model, split, trainer, checkpoint, selection, evaluate)
    return StageResult(2, stage_dir(cfg, 2), checkpoint, fit.losses, fit.resumed_from, metrics)


def load_stage_model(
    cfg: TrapReplaceConfig, stage: int, dataset: ImageDataset
) -> tuple[StemHeadDecoder, Path]:
    """The model a finished stage selected, from its run directory."""
    selected = stage_dir(cfg, stage) / SELECTED_FILE
    if not selected.is_file():
        raise FileNotFoundError(f"stage {stage} has not finished: {selected} does not exist")
    checkpoint = Path(json.loads(selected.read_text())["checkpoint"])
    setup_path = stage_dir(cfg, 1) / SETUP_FILE
    with_decoder = json.loads(setup_path.read_text())["with_decoder"] if setup_path.is_file() else None
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, dataset, with_decoder=with_decoder)
    if stage == 2:
        replace_head(model, cfg.head_dropout)
    load_weights(model, checkpoint)
    return model, checkpoint


def evaluate_stage(
    cfg: TrapReplaceConfig, stage: int, *, dataset: ImageDataset | None = None, device: str | None = None
) -> dict[str, Any]:
    """CA and ASR of a finished stage's selected model on the clean and triggered test sets."""
    dataset = dataset if dataset is not None else load_image_dataset(cfg.data, seed=cfg.poison.seed)
    test_clean, test_triggered = make_test_sets(dataset, cfg.poison)
    model, checkpoint = load_stage_model(cfg, stage, dataset)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    metrics = ca_asr(
        model, _eval_batches(cfg, test_clean), _eval_batches(cfg, test_triggered), cfg.poison.target, dev
    )
    result = {"stage": stage, "checkpoint": str(checkpoint), **metrics}
    _write_json(stage_dir(cfg, stage) / EVAL_FILE, result)
    return result
