"""The protocol: zero-shot or two-stage zero-shot-CoT generation, parsing, scoring, one results
file per (model, task, mode) with every raw output, sharded over ranks and resumable.

Zero-shot: "Q: <input>\nA: The answer (arabic numerals) is" -> parse the continuation.
Zero-shot-CoT (Kojima et al.): stage 1 "Q: <input>\nA: Let's think step by step." -> reasoning;
stage 2 = stage-1 prompt + reasoning + "Therefore, the answer (arabic numerals) is" -> parse.

Ranks (torchrun, or any process group) take every W-th pending example and append each finished
example to ``<task>.<mode>.partial.rank<r>.jsonl``; a rerun skips what any rank's partial file
holds (with any world size), so an interrupted run resumes without redoing finished examples.
Results are gathered in test-set order, so 1 and N ranks write the same file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smile.models.zeroshot_eval.backends import Backend
from smile.models.zeroshot_eval.data import Example, check_limit, load_examples
from smile.models.zeroshot_eval.metrics import HEADLINE, METRICS, is_correct
from smile.models.zeroshot_eval.tasks import Task, get_tasks, protocol_hash
from smile.runtime.sharding import gather_in_order, rank_and_world, shard

MODES = ("zs", "zs-cot")
DEFAULT_STOP = ("\nQ:",)
log = logging.getLogger("smile.models.zeroshot_eval")


def first_prompt(task: Task, example: Example, mode: str) -> str:
    """Zero-shot: the prompt with the answer trigger; CoT: the stage-1 prompt with the CoT trigger."""
    trigger = task.zs_trigger if mode == "zs" else task.cot_trigger
    return f"{task.template(example.input)} {trigger}"


def answer_prompt(task: Task, stage1_prompt: str, reasoning: str) -> str:
    """Stage 2 of zero-shot-CoT: stage-1 prompt + generated reasoning + the answer trigger."""
    return f"{stage1_prompt} {reasoning} {task.answer_trigger}"


def jsonable(value: Any) -> Any:
    """Parsed answers as JSON keeps them (entity sets as sorted [type, span] lists)."""
    if isinstance(value, (set, frozenset)):
        return sorted([list(e) for e in value])
    return value


def _generate_records(
    task: Task,
    backend: Backend,
    examples: Sequence[Example],
    mode: str,
    max_new_tokens: int,
    cot_max_new_tokens: int,
    stop: Sequence[str],
) -> list[dict[str, Any]]:
    prompts = [first_prompt(task, ex, mode) for ex in examples]
    reasonings: list[str | None] = [None] * len(examples)
    if mode == "zs":
        outputs = backend.generate(prompts, max_new_tokens, stop)
    else:
        reasonings = list(backend.generate(prompts, cot_max_new_tokens, stop))
        stage2 = [answer_prompt(task, p, r) for p, r in zip(prompts, reasonings)]
        outputs = backend.generate(stage2, max_new_tokens, stop)
    records = []
    for ex, prompt, reasoning, output in zip(examples, prompts, reasonings, outputs, strict=True):
        parsed = jsonable(task.parser(output))
        correct = is_correct(parsed, ex.target) if task.metric == "accuracy" else None
        records.append(
            {"idx": ex.idx, "prompt": prompt, "reasoning": reasoning, "output": output,
             "parsed": parsed, "target": ex.target, "correct": correct}
        )  # fmt: skip
    return records


def _read_partials(folder: Path, stem: str, protocol: str) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob(f"{stem}.partial.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a crash: that example is redone
            if record.pop("protocol", None) == protocol:
                done[record["idx"]] = record
    return done


def _sum_loads(loads: list[dict[str, list[int]] | None]) -> dict[str, list[int]] | None:
    present = [load for load in loads if load]
    if not present:
        return None
    total: dict[str, list[int]] = {}
    for load in present:
        for layer, counts in load.items():
            total[layer] = [a + b for a, b in zip(total.get(layer, [0] * len(counts)), counts)]
    return total


def load_summary(load: dict[str, list[int]] | None) -> dict[str, float] | None:
    """Per MoE layer, the busiest expert's tokens over the mean (1.0 = perfectly balanced)."""
    if not load:
        return None
    return {layer: max(c) * len(c) / max(1, sum(c)) for layer, c in load.items()}


def evaluate_task(
    task: Task,
    backend: Backend,
    examples: Sequence[Example],
    mode: str = "zs",
    out_dir: str | Path | None = None,
    max_new_tokens: int = 32,
    cot_max_new_tokens: int = 128,
    stop: Sequence[str] = DEFAULT_STOP,
    chunk: int = 8,
) -> dict[str, Any]:
    """One task on this rank's share of ``examples``; every rank returns the whole result."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    rank, world = rank_and_world()
    protocol = protocol_hash([task])
    stem = f"{task.name}.{mode}"
    folder = Path(out_dir) if out_dir is not None else None
    done = _read_partials(folder, stem, protocol) if folder is not None else {}
    if world > 1:
        dist.barrier()  # every rank has read the same partials before any rank appends to them
    pending = [ex for ex in examples if ex.idx not in done]
    mine = shard(pending, rank, world)
    partial = None
    if folder is not None and mine:
        folder.mkdir(parents=True, exist_ok=True)
        partial = (folder / f"{stem}.partial.rank{rank}.jsonl").open("a")
    take_load = getattr(backend, "take_expert_load", lambda: None)
    take_load()  # start counting expert loads at this task
    new: list[dict[str, Any]] = []
    try:
        for start in range(0, len(mine), chunk):
            records = _generate_records(
                task, backend, mine[start : start + chunk], mode, max_new_tokens, cot_max_new_tokens, stop
            )
            new.extend(records)
            if partial is not None:
                partial.writelines(json.dumps({**r, "protocol": protocol}) + "\n" for r in records)
                partial.flush()
    finally:
        if partial is not None:
            partial.close()
    by_idx = {**done, **{r["idx"]: r for r in gather_in_order(new)}}
    predictions = [by_idx[ex.idx] for ex in examples]
    load = _sum_loads(gather_in_order([take_load()]) if world > 1 else [take_load()])
    scores = METRICS[task.metric]([p["parsed"] for p in predictions], [ex.target for ex in examples])
    result = {
        "task": task.name, "category": task.category, "mode": mode, "model": backend.name,
        "metric": task.metric, "headline": HEADLINE[task.metric], "scores": scores,
        "n": len(examples), "resumed": len(done), "protocol": protocol,
        "expert_load": load, "expert_load_max_over_mean": load_summary(load), "predictions": predictions,
    }  # fmt: skip
    if folder is not None and rank == 0:
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=1))
        for path in folder.glob(f"{stem}.partial.rank*.jsonl"):
            path.unlink()
    if rank == 0:
        name = HEADLINE[task.metric]
        log.info("%s %s %s: %s=%.4f (n=%d)", backend.name, task.name, mode, name, scores[name], len(examples))
        if load:
            log.info("%s %s expert load (max/mean per layer): %s", task.name, mode, load_summary(load))
    return result


def run_eval(
    tasks: Sequence[str | Task] | None,
    backend: Backend,
    mode: str = "zs",
    limit: int | None = None,
    seed: int = 0,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    out_dir: str | Path | None = None,
    max_new_tokens: int = 32,
    cot_max_new_tokens: int = 128,
    stop: Sequence[str] = DEFAULT_STOP,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``backend`` on ``tasks`` (names or Tasks; None: the paper's 20) in ``mode``; with
    ``out_dir``, write ``<task>.<mode>.json`` there and resume from partial predictions. Returns
    the results by task name (on every rank). ``limit``: a ``seed``-ed subsample per task."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_limit(limit)
    if not tasks or all(isinstance(t, str) for t in tasks):
        task_list = get_tasks(list(tasks or ()) or None)
    else:
        task_list = [t if isinstance(t, Task) else get_tasks([t])[0] for t in tasks]
    examples = {t.name: load_examples(t, data_dir, cache_dir, limit, seed) for t in task_list}  # fail early
    torch.manual_seed(seed)
    if dist.is_initialized():
        dist.barrier()  # every rank found every dataset before anyone writes
    results = {}
    for task in task_list:
        results[task.name] = evaluate_task(
            task, backend, examples[task.name], mode, out_dir, max_new_tokens, cot_max_new_tokens, stop
        )
    return results
