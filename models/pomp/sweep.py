"""The README's grid: CoOp (full softmax), POMP (local contrast + correction) and the uncorrected
ablation at several K, the same seeds and steps, each run through ``smile zoo pomp train|eval``.

``python -m smile.models.pomp.sweep --config digits_tiny --clip runs/pomp/tiny_clip
--ks 4 8 16 32 --seeds 0 1 2 --out runs/pomp/grid [--set key=value ...]`` appends one JSON line per
run to ``OUT/grid.jsonl`` (top-1 on the config's first evaluation set, text prompts encoded per
step, wall seconds; runs already there are skipped) and prints the grid as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def variants(ks: list[int]) -> dict[str, list[str]]:
    """Overrides per variant: CoOp once, then POMP and its ablation at each K."""
    out = {"coop": ["objective=full_softmax"]}
    for k in ks:
        out[f"pomp_k{k}"] = [f"num_sampled_classes={k}"]
        out[f"nocorr_k{k}"] = [f"num_sampled_classes={k}", "local_correction=false"]
    return out


def run_one(config: str, clip: str, run: Path, seed: int, extra: list[str], dataset: str) -> dict:
    """Train then evaluate one (variant, seed) through the CLI; the metrics the grid reports."""
    from smile.cli import main as smile_main

    base = ["--config", config, f"clip_path={clip}", f"train.run_dir={run}", f"train.seed={seed}", *extra]
    start = time.perf_counter()
    if smile_main(["zoo", "pomp", "train", *base]) or smile_main(
        ["zoo", "pomp", "eval", *base, "--dataset", dataset]
    ):
        raise RuntimeError(f"run {run} failed")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "top1": json.loads((run / f"eval_{dataset}.json").read_text())["top1"],
        "prompts": float(np.mean([r["prompts"] for r in records if "prompts" in r])),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def table(rows: list[dict], seeds: list[int]) -> str:
    """Markdown: one line per variant, top-1 per seed, mean, prompts/step and its share of CoOp's."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    coop = np.mean([by[("coop", s)]["prompts"] for s in seeds if ("coop", s) in by] or [np.nan])
    head = "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | prompts / step | of CoOp |"
    lines = [head, "|" + "---|" * (len(seeds) + 4)]
    for name in names:
        cells = [by.get((name, s)) for s in seeds]
        top = [c["top1"] for c in cells if c]
        work = float(np.mean([c["prompts"] for c in cells if c]))
        lines.append(
            f"| {name} | "
            + " | ".join(f"{c['top1']:.3f}" if c else "-" for c in cells)
            + f" | {np.mean(top):.3f} | {work:.1f} | {work / coop:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits_tiny")
    parser.add_argument("--clip", required=True, help="a tiny_clip.py directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dataset", default=None, help="evaluation set (default: the config's first)")
    parser.add_argument(
        "--set", dest="overrides", nargs="*", default=[], help="key=value for every run, e.g. max_steps=800"
    )
    args = parser.parse_args()

    from smile.models.pomp.config import POMPConfig
    from smile.models.registry import resolve_config
    from smile.runtime import load_config

    config = str(resolve_config("pomp", args.config))
    dataset = args.dataset or load_config(POMPConfig, config, args.overrides).evaluation[0].name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "grid.jsonl"
    rows = [json.loads(line) for line in grid.read_text().splitlines()] if grid.is_file() else []
    done = {(r["variant"], r["seed"]) for r in rows}
    for name, extra in variants(args.ks).items():
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            row = {"variant": name, "seed": seed, "overrides": args.overrides}
            row |= run_one(
                config, args.clip, out / f"{name}_{seed}", seed, [*args.overrides, *extra], dataset
            )
            rows.append(row)
            with grid.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(rows, args.seeds))


if __name__ == "__main__":
    main()
