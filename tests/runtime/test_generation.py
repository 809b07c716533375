"""smile.runtime.generation: batched greedy/beam decoding as a Trainer eval_fn, metrics on the
decoded text, predictions as JSONL, records gathered over ranks. Offline: tiny random T5 and a
word-level tokenizer built here."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from smile.runtime import TrainConfig, Trainer
from smile.runtime.config import LogConfig, OptimizerConfig
from smile.runtime.generation import GenerationEval, exact_match
from smile.testing import run_distributed

WORDS = "a b c d e f g h".split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def batch(tok, texts: list[str], ids: list[str]) -> dict:
    enc = tok(texts, padding=True, return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "ids": ids,
        "references": texts,
        "meta": [{"n": len(t.split())} for t in texts],
    }


class Echo(nn.Module):
    """A seq2seq stand-in whose generate returns its input and records the keyword arguments."""

    config = type("C", (), {"is_encoder_decoder": True})()

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def generate(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        return input_ids


def test_echo_records_metrics_jsonl_and_generate_keys(tmp_path):
    tok = tokenizer()
    data = [
        batch(tok, ["a b", "c d e"], ["x0", "x1"]) | {"feats": torch.ones(2, 3)},
        batch(tok, ["h"], ["x2"]) | {"feats": torch.ones(1, 3)},
    ]
    data[1]["references"] = ["g"]  # one wrong
    model = Echo()
    gen = GenerationEval(
        tok,
        max_new_tokens=7,
        num_beams=3,
        generate_keys=("feats",),
        output_dir=tmp_path,
        postprocess=str.upper,
        metrics=lambda rs: {"n": len(rs), **exact_match([r | {"parsed": r["prediction"]} for r in rs])},
    )
    metrics = gen(model, data, None)
    assert metrics == {"n": 3.0, "exact_match": pytest.approx(2 / 3)}
    call = model.calls[0]
    assert call["max_new_tokens"] == 7 and call["num_beams"] == 3 and call["do_sample"] is False
    assert torch.equal(call["feats"], torch.ones(2, 3)) and call["synced_gpus"] is False
    lines = [json.loads(x) for x in gen.last_path.read_text().splitlines()]
    assert gen.last_path.name == "predictions_step_00000000.jsonl"
    assert [r["id"] for r in lines] == ["x0", "x1", "x2"] and lines[1]["prediction"] == "c d e"
    assert lines[1]["parsed"] == "C D E" and lines[1]["n"] == 3
    with pytest.raises(ValueError, match="no 'missing'"):
        GenerationEval(tok, generate_keys=("missing",))(model, data, None)
    with pytest.raises(ValueError, match="num_beams=0"):
        GenerationEval(tok, num_beams=0)


def _t5(tok) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=16,
        d_ff=32,
        d_kv=4,
        num_heads=2,
        num_layers=1,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(cfg)


def _copy_batches(tok, n: int = 8):
    texts = [" ".join(WORDS[(i + j) % 8] for j in range(3)) for i in range(n)]
    b = batch(tok, texts, [f"s{i}" for i in range(n)])
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return [b]


def test_trainer_eval_fn_greedy_and_beam_on_t5(tmp_path):
    """A real T5 learns to copy through the Trainer; its eval is generation: greedy and beam
    decode the same learnt copies, exact match on the text, JSONL per evaluation step."""
    torch.set_num_threads(1)
    tok = _copy_batches.__globals__["tokenizer"]()
    data = _copy_batches(tok)
    model = _t5(tok)
    gen = GenerationEval(tok, max_new_tokens=5, output_dir=tmp_path / "gen")
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"),
        max_steps=150,
        zero_stage=0,
        precision="fp32",
        eval_every=150,
        optimizers=[OptimizerConfig(lr=1e-2)],
        log=LogConfig(every=50, progress_bar=False, plot=False),
    )
    trainer = Trainer(
        model,
        lambda m, b, ctx: m(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss,
        cfg,
        data,
        data,
        eval_fn=gen,
    )
    try:
        fit = trainer.fit()
    finally:
        trainer.close()
    assert fit.eval_metrics["exact_match"] == 1.0, gen.last_records
    assert (tmp_path / "gen" / "predictions_step_00000150.jsonl").is_file()
    beam = GenerationEval(tok, max_new_tokens=5, num_beams=3)(model, data, None)
    assert beam["exact_match"] == 1.0


def _gather_job(topo) -> dict:
    import torch.distributed as dist

    tok = tokenizer()
    rank = dist.get_rank()
    texts = [["a", "b c"], ["d", "e"]][rank]
    gen = GenerationEval(tok, output_dir=None)
    metrics = gen(
        Echo(),
        [batch(tok, texts, [f"r{rank}_{i}" for i in range(2)]) | {"ids": ["r0_0", f"r{rank}_1"]}],
        None,
    )
    return {"metrics": metrics, "ids": [r["id"] for r in gen.last_records]}


def test_records_gathered_over_ranks_once_per_id():
    out = run_distributed(_gather_job, 1, 2, timeout=120)
    assert out[0] == out[1]
    assert out[0]["ids"] == ["r0_0", "r0_1", "r1_1"] and out[0]["metrics"] == {"exact_match": 1.0}
