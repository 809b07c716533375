"""LeMDA against its two ablations, same seeds, steps and model: no augmentation, and Gaussian
noise on f in the augmenter's place (``lemda.noise_std``), its scale chosen on the validation split.

``python -m smile.models.lemda.ablation --config digits_fewshot --seeds 0 1 2 3 4`` trains every
variant through the Trainer (one process), picks the noise scale (and, with ``--adv-grid``,
LeMDA's ``adv_scale``) by mean validation accuracy over the seeds, and prints the test accuracy
of each seed, mean and std, as a Markdown table and JSON. The test split is never used to choose.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np
import torch

from smile.models.lemda import job
from smile.models.lemda.batches import EvalBatches
from smile.models.lemda.cli import load_job_config
from smile.models.lemda.data import VALIDATION, load_split
from smile.models.lemda.metrics import make_eval_fn


def run(config: str, overrides: list[str], seed: int) -> dict[str, float]:
    """Train one variant with ``seed`` (data split and training): its validation and test metric,
    and its last logged training losses."""
    seeded = [f"train.seed={seed}", f"data.seed={seed}", "train.checkpoint.save_final=false"]
    cfg = load_job_config(config, [*overrides, *seeded])
    built = job.build_job(cfg)
    result = built.trainer().fit()
    eval_fn = make_eval_fn(cfg.metric)
    ctx = SimpleNamespace(device=torch.device("cpu"))
    # The last logged training losses: task loss, and the augmenter's mean ||f' - f|| (LeMDA).
    out = {
        f"train_{k}": float(result.train_metrics[k])
        for k in ("task", "aug_shift")
        if k in result.train_metrics
    }
    for split, table in ((VALIDATION, load_split(cfg.data, VALIDATION)), ("test", built.eval_table)):
        batches = EvalBatches(table, built.featurizer, cfg.data.eval_batch_size, 0, 1)
        built.model.eval()
        with torch.no_grad():
            out[split] = eval_fn(built.model, batches, ctx)[cfg.metric]
    return out


def sweep(config: str, base: list[str], name: str, values: list[float], seeds: list[int]) -> dict:
    """Every value of one hyperparameter over all seeds; the value with the best mean validation."""
    results = {v: [run(config, [*base, f"{name}={v}"], s) for s in seeds] for v in values}
    val = {v: float(np.mean([r[VALIDATION] for r in rs])) for v, rs in results.items()}
    best = max(values, key=lambda v: val[v])
    return {"chosen": best, "validation": val, "runs": results[best]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits_fewshot")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--noise-grid", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--adv-grid", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--run-dir", default="runs/lemda/ablation")
    parser.add_argument("overrides", nargs="*", help="key.path=value for every variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    base = [f"train.run_dir={args.run_dir}", *args.overrides]
    lemda = sweep(args.config, base, "lemda.adv_scale", args.adv_grid, args.seeds)
    none = [run(args.config, [*base, "lemda.augment=false"], s) for s in args.seeds]
    noise = sweep(args.config, [*base, "lemda.augment=false"], "lemda.noise_std", args.noise_grid, args.seeds)
    rows = {
        f"LeMDA (adv_scale {lemda['chosen']:g})": lemda["runs"],
        "no augmentation": none,
        f"Gaussian noise on f (noise_std {noise['chosen']:g})": noise["runs"],
    }
    seeds = " | ".join(str(s) for s in args.seeds)
    print(f"| variant | {seeds} | mean ± std (test) | mean (validation) |")
    print("| --- |" + " --- |" * (len(args.seeds) + 2))
    summary = {}
    for label, runs in rows.items():
        test = [r["test"] for r in runs]
        val = float(np.mean([r[VALIDATION] for r in runs]))
        cells = " | ".join(f"{t:.3f}" for t in test)
        print(f"| {label} | {cells} | {np.mean(test):.3f} ± {np.std(test):.3f} | {val:.3f} |")
        summary[label] = {"test": test, "validation_mean": val}
        for key in ("train_task", "train_aug_shift"):
            if key in runs[0]:
                summary[label][key] = [round(r[key], 4) for r in runs]
    summary["adv_scale_validation"] = lemda["validation"]
    summary["noise_std_validation"] = noise["validation"]
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
