"""Generation in evaluation: decode with ``model.generate``, score the text, keep the predictions.

Any seq2seq or causal transformers model plugs into the Trainer through ``eval_fn``:

    gen = GenerationEval(tokenizer, max_new_tokens=64, num_beams=1, generate_keys=("image_feats",),
                         metrics=my_metrics, output_dir=run_dir / "predictions")
    Trainer(model, loss_fn, cfg, train_data, eval_data, eval_fn=gen)

Eval batches are mappings with ``input_ids`` and ``attention_mask`` (plus the tensors named in
``generate_keys``, passed to ``generate`` as keyword arguments) and optional per-example lists
``ids``, ``references`` and ``meta`` (dicts copied into each record). Every rank decodes its own
batches; the records are gathered so that all ranks compute the same metrics on the whole set and
rank 0 writes them as JSONL (``<output_dir>/<name>_step_<N>.jsonl``). Metrics run on the decoded
text, not on token ids, so they measure what a user of the model would read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Record = dict[str, Any]
MetricsFn = Callable[[list[Record]], Mapping[str, float]]
TEXT_KEYS = ("ids", "references", "meta")


def exact_match(records: Sequence[Record]) -> dict[str, float]:
    """Share of records whose (parsed) prediction equals the reference after stripping."""
    scored = [r for r in records if r.get("reference") is not None]
    if not scored:
        return {}
    hits = sum(str(r.get("parsed", r["prediction"])).strip() == str(r["reference"]).strip() for r in scored)
    return {"exact_match": hits / len(scored)}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_records(records: list[Record]) -> list[Record]:
    """Every rank's records, in rank order, on every rank (duplicate ids kept once)."""
    rank, world = _world()
    if world == 1:
        return records
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, records)
    seen, merged = set(), []
    for record in (r for part in parts for r in part):
        key = record.get("id")
        if key is None or key not in seen:
            merged.append(record)
            seen.add(key)
    return merged


def _batches(eval_data: Any) -> Iterable[Mapping[str, Any]]:
    if callable(eval_data) and not hasattr(eval_data, "__iter__"):
        rank, world = _world()
        return eval_data(rank, world)  # a data factory, as the Trainer accepts
    return eval_data


class GenerationEval:
    """An ``eval_fn(model, eval_data, ctx) -> dict[str, float]`` that generates, decodes, scores
    and writes predictions (see the module docstring).

    num_beams 1 is greedy decoding; ``generate_kwargs`` go to ``generate`` as they are.
    postprocess: maps the decoded text to ``record["parsed"]`` (e.g. an answer-letter parser).
    metrics: records -> metrics (default: exact match of parsed/prediction against reference).
    max_batches: per rank (None: the whole iterable). synced_gpus: keep ranks decoding in lockstep
    (transformers' ``synced_gpus``), needed under ZeRO-3 and expert parallelism, whose forward is
    collective; None: on when there are several ranks (then every rank must yield the same number
    of batches, e.g. by repeating examples: records are deduplicated by id).
    ``last_records`` / ``last_path`` keep the latest evaluation's records and file for callers
    that chain stages.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        generate_keys: Sequence[str] = (),
        metrics: MetricsFn | None = None,
        postprocess: Callable[[str], str] | None = None,
        output_dir: str | Path | None = None,
        name: str = "predictions",
        max_batches: int | None = None,
        generate_kwargs: Mapping[str, Any] | None = None,
        synced_gpus: bool | None = None,
    ) -> None:
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} and num_beams={num_beams} must be >= 1")
        self.tokenizer = tokenizer
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        self.generate_keys = tuple(generate_keys)
        self.metrics = metrics or exact_match
        self.postprocess = postprocess
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.name = name
        self.max_batches = max_batches
        self.generate_kwargs = dict(generate_kwargs or {})
        self.synced_gpus = synced_gpus
        self.last_records: list[Record] = []
        self.last_path: Path | None = None

    def decode_batch(self, model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> list[str]:
        """Generate for one batch and decode the new text (special tokens dropped)."""
        dtype = next(model.parameters()).dtype
        extra = {}
        for key in self.generate_keys:
            if key not in batch:
                raise ValueError(f"generation eval: batch has no {key!r} (keys: {sorted(batch)})")
            value = batch[key].to(device)
            extra[key] = value.to(dtype) if value.is_floating_point() else value
        input_ids = batch["input_ids"].to(device)
        synced = _world()[1] > 1 if self.synced_gpus is None else self.synced_gpus
        out = model.generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
            synced_gpus=synced,
            **extra,
            **self.generate_kwargs,
        )
        if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            out = out[:, input_ids.shape[1] :]  # a causal model echoes its prompt
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def __call__(self, model: nn.Module, eval_data: Any, ctx: Any = None) -> dict[str, float]:
        device = getattr(ctx, "device", None) or next(model.parameters()).device
        was_training = model.training
        model.eval()
        records: list[Record] = []
        try:
            with torch.no_grad():
                for i, batch in enumerate(_batches(eval_data)):
                    if self.max_batches is not None and i >= self.max_batches:
                        break
                    texts = self.decode_batch(model, batch, device)
                    n = len(texts)
                    ids = batch.get("ids") or [None] * n
                    refs = batch.get("references") or [None] * n
                    metas = batch.get("meta") or [{}] * n
                    for text, key, ref, meta in zip(texts, ids, refs, metas, strict=True):
                        record: Record = {"id": key, "prediction": text.strip(), "reference": ref, **meta}
                        if self.postprocess is not None:
                            record["parsed"] = self.postprocess(text)
                        records.append(record)
        finally:
            model.train(was_training)
        records = gather_records(records)
        self.last_records = records
        metrics = {k: float(v) for k, v in self.metrics(records).items()}
        self._write(records, getattr(ctx, "step", 0))
        return metrics

    def _write(self, records: list[Record], step: int) -> None:
        if self.output_dir is None:
            return
        self.last_path = self.output_dir / f"{self.name}_step_{step:08d}.jsonl"
        if _world()[0] == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.last_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            tmp.replace(self.last_path)
        if _world()[1] > 1:
            dist.barrier()  # the file exists on every rank's return
