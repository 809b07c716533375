"""The trap's own contribution: the same poisoned split, seeds and steps trained three ways.

- ``no_defense``: stage 1 with plain CE (``rec_weight = tv_weight = 0``, no decoder);
- ``replace_only``: stage 2 on that undefended stem (head replacement alone: same clean holdout,
  same stage-2 steps);
- ``trap_and_replace``: stage 1 with the reconstruction decoder, then the same stage 2.

Head replacement alone already removes a backdoor that lives in the head; the defense is only
shown to matter where the undefended stem carries the backdoor and the trapped stem does not.
``smile zoo trap_replace ablate --config <cfg> --seeds 0,1,2`` runs every seed (seed s sets both
``poison.seed`` and ``train.seed``), writes ``<run_dir>/ablation.json`` and prints the table.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

from smile.models.trap_replace.config import TrapReplaceConfig
from smile.models.trap_replace.stages import is_rank0, train_stage1, train_stage2

ARMS = ("no_defense", "replace_only", "trap_stage1", "trap_and_replace")


def seeded(cfg: TrapReplaceConfig, seed: int, run_dir: Path, defended: bool) -> TrapReplaceConfig:
    """``cfg`` for one seed and arm: the split, triggers, initialisation and data order all follow
    ``seed``; the undefended arm drops the decoder and its losses."""
    out = copy.deepcopy(cfg)
    out.poison.seed = seed
    out.train.seed = seed
    out.run_dir = str(run_dir)
    out.init_from = None
    if not defended:
        out.rec_weight = 0.0
        out.tv_weight = 0.0
    out.validate()
    return out


def run_seed(cfg: TrapReplaceConfig, seed: int, root: Path) -> dict[str, dict[str, float]]:
    """CA/ASR of every arm for one seed (runs under ``root/seed<seed>/{no_defense,trap}``)."""
    undefended = seeded(cfg, seed, root / f"seed{seed}" / "no_defense", defended=False)
    trapped = seeded(cfg, seed, root / f"seed{seed}" / "trap", defended=True)
    return {
        "no_defense": train_stage1(undefended).metrics,
        "replace_only": train_stage2(undefended).metrics,
        "trap_stage1": train_stage1(trapped).metrics,
        "trap_and_replace": train_stage2(trapped).metrics,
    }


def summarize(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of CA and ASR per arm over the seeds."""
    out: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        for metric in ("ca", "asr"):
            values = [per_seed[s][arm][metric] for s in sorted(per_seed)]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            out.setdefault(arm, {}).update({metric: statistics.fmean(values), f"{metric}_std": spread})
    return out


def table(per_seed: dict[int, dict[str, dict[str, float]]]) -> str:
    """The markdown table of the README: every seed, then mean +- std."""
    seeds = sorted(per_seed)
    summary = summarize(per_seed)
    head = "| arm | " + " | ".join(f"seed {s} CA / ASR" for s in seeds) + " | mean CA | mean ASR |"
    rows = [head, "|" + "---|" * (len(seeds) + 3)]
    for arm in ARMS:
        cells = [f"{per_seed[s][arm]['ca']:.3f} / {per_seed[s][arm]['asr']:.3f}" for s in seeds]
        m = summary[arm]
        rows.append(
            f"| {arm} | " + " | ".join(cells) + f" | {m['ca']:.3f} +- {m['ca_std']:.3f} "
            f"| {m['asr']:.3f} +- {m['asr_std']:.3f} |"
        )
    return "\n".join(rows)


def ablate(cfg: TrapReplaceConfig, seeds: list[int]) -> dict[str, Any]:
    """Every arm for every seed; the result (also ``<run_dir>/ablation.json``) holds the per-seed
    metrics, their mean/std and the wall time."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    root = Path(cfg.run_dir)
    start = time.perf_counter()
    per_seed = {seed: run_seed(cfg, seed, root) for seed in seeds}
    result = {
        "seeds": seeds,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "summary": summarize(per_seed),
        "wall_s": time.perf_counter() - start,
    }
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        (root / "ablation.json").write_text(json.dumps(result, indent=1))
    result["table"] = table(per_seed)
    return result
