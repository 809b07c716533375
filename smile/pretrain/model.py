"""Build the job's MoE model from transformers, check it fits the data, and define its loss.

The model is a transformers T5, GPT-2 or Llama built from ``ModelConfig`` (or loaded from a
local directory) whose FFNs :func:`smile.hf.moefy.moefy` swaps for smile MoE layers; a local
SwitchTransformers checkpoint is imported straight into the expert-parallel layout. Mismatches
between tokenizer, data and model are reported by :func:`check_fits` before any weight exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smile.data import TextTokenizer
from smile.data.objectives import compute_input_and_target_lengths
from smile.hf import import_switch, moe_dropped_fraction, moe_modules, moefy
from smile.moe.topology import Topology
from smile.pretrain.config import JobConfig
from smile.runtime import ConfigError


def _init_kind(job: JobConfig) -> str | None:
    """model_type of ``model.init_from`` (None when training from scratch)."""
    if job.model.init_from is None:
        return None
    config = Path(job.model.init_from) / "config.json"
    if not config.is_file():
        raise ConfigError(f"model.init_from={job.model.init_from!r} holds no config.json")
    kind = json.loads(config.read_text()).get("model_type")
    if kind == "switch_transformers" and job.model.family == "t5":
        if job.moe.router != "switch":
            raise ConfigError("model.init_from is a SwitchTransformers checkpoint: set moe.router='switch'")
        return kind
    if kind != job.model.family:
        raise ConfigError(
            f"model.init_from={job.model.init_from!r} is a {kind!r} model; model.family={job.model.family!r} "
            "takes a checkpoint of that family (or a 'switch_transformers' one for t5)"
        )
    return kind


def hf_config(job: JobConfig, tokenizer: TextTokenizer) -> Any:
    """The transformers config of the job's model (read from ``init_from`` when set)."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig, T5Config

    if _init_kind(job) is not None:
        return AutoConfig.from_pretrained(job.model.init_from, local_files_only=True)
    m = job.model
    vocab = m.vocab_size or tokenizer.vocab_size
    if m.family == "t5":
        return T5Config(
            vocab_size=vocab,
            d_model=m.d_model,
            d_kv=m.d_kv or m.d_model // m.num_heads,
            d_ff=m.d_ff,
            num_layers=m.num_layers,
            num_decoder_layers=m.num_decoder_layers or m.num_layers,
            num_heads=m.num_heads,
            dropout_rate=m.dropout,
            feed_forward_proj="relu",
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
            decoder_start_token_id=tokenizer.pad_id,
            use_cache=False,
        )
    if m.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_positions=m.max_seq_len,
            n_embd=m.d_model,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.d_ff,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            bos_token_id=tokenizer.eos_id,
            eos_token_id=tokenizer.eos_id,
            use_cache=False,
        )
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=m.d_model,
        intermediate_size=m.d_ff,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads,
        max_position_embeddings=m.max_seq_len,
        attention_dropout=m.dropout,
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        use_cache=False,
    )


def max_positions(job: JobConfig, config: Any) -> int:
    """Longest sequence the model takes: learned positions, else the job's declared maximum."""
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return job.model.max_seq_len


def check_fits(job: JobConfig, tokenizer: TextTokenizer, config: Any, topology: Topology) -> None:
    """Tokenizer vocabulary, sequence lengths and expert layout against the model, before training."""
    if config.vocab_size < tokenizer.vocab_size:
        source = f"model.init_from={job.model.init_from!r}" if job.model.init_from else "model.vocab_size"
        raise ConfigError(
            f"tokenizer/model vocabulary mismatch: data.tokenizer={tokenizer.path!r} has "
            f"{tokenizer.vocab_size} tokens but the model embeds only {config.vocab_size} ({source}); "
            "use the model's tokenizer or a vocab_size >= the tokenizer's"
        )
    limit = max_positions(job, config)
    lengths = {"data.seq_len": job.data.seq_len}
    if job.data.objective == "span_corruption":
        _, targets = compute_input_and_target_lengths(
            job.data.seq_len, job.data.noise_density, job.data.mean_span_length
        )
        lengths["the span-corruption target length"] = targets
    for what, length in lengths.items():
        if length > limit:
            raise ConfigError(
                f"{what}={length} exceeds the model's maximum sequence length {limit} "
                "(model.max_seq_len, or the positions of model.init_from)"
            )
    job.moe.check_topology(topology)


def build_model(job: JobConfig, tokenizer: TextTokenizer, topology: Topology) -> nn.Module:
    """The job's MoE model on this rank (same seed on every rank: dense weights agree)."""
    from transformers import (
        AutoModelForCausalLM,
        GPT2LMHeadModel,
        LlamaForCausalLM,
        T5ForConditionalGeneration,
    )

    config = hf_config(job, tokenizer)
    check_fits(job, tokenizer, config, topology)
    torch.manual_seed(job.train.seed)
    kind = _init_kind(job)
    if kind == "switch_transformers":
        if (job.moe.num_experts, job.moe.every) != (config.num_experts, config.encoder_sparse_step):
            raise ConfigError(
                f"moe.num_experts={job.moe.num_experts}, moe.every={job.moe.every} differ from the "
                f"checkpoint's num_experts={config.num_experts}, sparse step={config.encoder_sparse_step}"
            )
        return import_switch(
            job.model.init_from,
            topology,
            dispatcher=job.moe.dispatcher,
            capacity_factor=job.moe.capacity_factor,
            backend=job.moe.backend,
        ).train()
    if kind is not None:
        loader = T5ForConditionalGeneration if kind == "t5" else AutoModelForCausalLM
        model = loader.from_pretrained(job.model.init_from, local_files_only=True)
    else:
        model_class = {"t5": T5ForConditionalGeneration, "gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}
        model = model_class[job.model.family](config)
    moefy(model, job.moe, topology)
    return model.train()


def pretrain_loss(model: nn.Module, batch: dict[str, torch.Tensor], ctx: Any):
    """Cross-entropy on the loader's labels (already shifted); the Trainer adds the aux losses.

    ``tokens`` counts what the model processed: encoder (unpadded) plus decoder tokens for
    span corruption, the input tokens for causal LM.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "decoder_input_ids" in batch:
        inputs["decoder_input_ids"] = batch["decoder_input_ids"]
        tokens = batch["attention_mask"].sum() + batch["labels"].numel()
    else:
        tokens = batch["input_ids"].numel()
    logits = model(**inputs).logits
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
    metrics = {
        "ce": ce.detach(),
        "dropped": moe_dropped_fraction(model),
        "tokens": tokens,
        "samples": batch["input_ids"].shape[0],
    }
    return ce, metrics


def parameter_summary(model: nn.Module, topology: Topology) -> dict[str, int]:
    """Parameters of the whole model (all experts) and those one token uses (k experts per layer)."""
    from smile.moe.experts import is_expert_parameter

    dense = sum(p.numel() for p in model.parameters() if not is_expert_parameter(p))
    local_experts = sum(p.numel() for p in model.parameters() if is_expert_parameter(p))
    active = dense
    for _, module in moe_modules(model):
        ffn = module.moe.experts
        per_expert = (ffn.w_in.numel() + ffn.w_out.numel()) // ffn.num_local
        active += module.moe.router.k * per_expert
    return {"total": dense + local_experts * topology.ep_size, "dense": dense, "active_per_token": active}
