"""The cost model's whole-model projection: Switch-Base-128 on 16 x 8, the presets' sources."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields, replace

import pytest

from benchmarks import make_results
from smile.sim import cost_model as cm


def _model(every: int = 2) -> cm.MoEModel:
    return cm.encoder_decoder_moe(
        "t5-base-moe",
        d_model=768,
        d_ff=3072,
        d_kv=64,
        num_heads=12,
        num_layers=12,
        num_decoder_layers=12,
        vocab_size=32128,
        every=every,
        experts_per_gpu=1,
        batch_per_gpu=4,
        inputs_length=512,
        targets_length=114,
        capacity_factor=1.25,
    )


def test_sparse_blocks_follow_the_switch_transformers_rule():
    """transformers makes block i of a stack sparse when i % sparse_step == 1 (step from the config)."""
    from transformers import SwitchTransformersConfig

    config = SwitchTransformersConfig(
        d_ff=3072, num_experts=128, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6
    )
    step = config.encoder_sparse_step
    assert (config.d_model, config.num_layers, config.num_decoder_layers, step) == (768, 12, 12, 2)
    transformers_count = sum(1 for i in range(config.num_layers) if i % step == 1 or step == 1)
    assert cm.sparse_blocks(config.num_layers, step) == transformers_count == 6
    assert cm.sparse_blocks(12, 1) == 12 and cm.sparse_blocks(12, 4) == 3


def test_paper_model_is_the_cluster_config():
    model = make_results.paper_model()
    (enc, n_enc), (dec, n_dec) = model.moe_layers
    assert (n_enc, n_dec) == (6, 6)
    assert (enc.tokens_per_gpu, dec.tokens_per_gpu) == (4 * 512, 4 * 114)  # batch 4, T5 span lengths
    assert (enc.d_model, enc.d_ff, enc.experts_per_gpu, enc.capacity_factor, enc.k) == (768, 3072, 1, 1.25, 1)
    assert model.dense_flops == pytest.approx(_model().dense_flops)


def test_dense_flops_lose_exactly_the_ffns_that_become_moe():
    """every=1 turns the 6 + 6 dense FFNs into MoE: the dense count drops by their 2*d*ff MACs per token."""
    half, full = _model(every=2), _model(every=1)
    assert [c for _, c in full.moe_layers] == [12, 12]
    ffn_flops = 2 * 2 * 768 * 3072 * (4 * 512 * 6 + 4 * 114 * 6)
    assert half.dense_flops - full.dense_flops == pytest.approx(ffn_flops)


def test_model_step_adds_the_layers_and_the_dense_work():
    spec, model = cm.preset("a100-efa"), _model()
    for kind in cm.LAYER_KINDS:
        step = cm.model_step(spec, model, kind)
        layers = [(cm.layer_step(spec, w, kind), c) for w, c in model.moe_layers]
        assert step["moe"] == pytest.approx(sum(c * t["total"] for t, c in layers))
        assert step["all2all"] == pytest.approx(sum(c * t["all2all"] for t, c in layers))
        assert step["dense"] == pytest.approx(3 * model.dense_flops / spec.flops)
        assert step["total"] == pytest.approx(step["moe"] + step["dense"])


def test_dense_work_dilutes_the_layer_speedup():
    for name in cm.PRESETS:
        r = cm.compare_model(cm.preset(name), _model())
        assert r["step_speedup"] == pytest.approx(r["switch_step_ms"] / r["smile_step_ms"])
        assert 1 < r["step_speedup"] < r["moe_speedup"]  # the same dense ms added to both
        assert r["step_speedup"] < r["step_bound"]
        # on one node the bi-level dispatch only adds a hop: no gain
        assert cm.compare_model(cm.preset(name).with_nodes(1), _model())["step_speedup"] < 1
    with pytest.raises(ValueError, match="at least one layer"):
        cm.MoEModel("empty", (), 0.0)


def test_sensitivity_names_every_parameter_and_follows_the_alpha_term():
    spec, model = cm.preset("a100-efa"), _model()
    sens = cm.sensitivity(spec, model)
    assert set(sens) == set(cm.SENSITIVITY_PARAMS)
    base = cm.compare_model(spec, model)["step_speedup"]
    low, high = sens["inter_latency"]
    assert low < base < high  # SMILE saves inter-node messages: dearer messages, larger gain
    assert high == pytest.approx(
        cm.compare_model(replace(spec, inter_latency=2 * spec.inter_latency), model)["step_speedup"]
    )
    with pytest.raises(ValueError, match="factor must be > 1"):
        cm.sensitivity(spec, model, factor=1.0)


def test_every_preset_parameter_cites_a_source():
    """Each measured-or-assumed figure in PRESETS has its own comment right above it."""
    source = inspect.getsource(cm)
    block = source[source.index("PRESETS: dict") : source.index("def preset(")]
    lines = block.splitlines()
    structural = {"name", "nodes", "gpus_per_node", "overlap_tiers", "count_exchange"}  # not measured figures
    cited = {f.name for f in fields(cm.ClusterSpec)} - structural
    for i, line in enumerate(lines):
        found = re.match(r"\s+(\w+)=", line)
        if found and found.group(1) in cited:
            assert lines[i - 1].strip().startswith("#"), f"{found.group(1)} has no source comment: {line}"
    assert len([ln for ln in lines if re.match(r"\s+(\w+)=", ln)]) == len(cm.PRESETS) * (len(cited) + 3)
