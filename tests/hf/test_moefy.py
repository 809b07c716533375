"""smile.hf: moefy on T5, GPT-2 and Llama; SwitchTransformers import/export, exact round trip,
the same logits as transformers' own Switch model, and the expert-parallel layout on 2 x 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from smile.hf import ConvertError, MoEFeedForward, export_switch, import_switch, moe_modules, moefy
from smile.moe import MoEConfig, MoEConfigError, Topology, collect_aux_loss
from smile.testing import run_distributed

VOCAB = 64


def tiny_t5(num_layers: int = 4, proj: str = "relu"):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=num_layers, num_heads=2,
        feed_forward_proj=proj, dropout_rate=0.0, decoder_start_token_id=0, use_cache=False,
    )
    return T5ForConditionalGeneration(config)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=4, n_head=2, n_inner=32)
    return GPT2LMHeadModel(config)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    )


def tiny_switch_dir(path: Path, router_bias: bool = False, seed: int = 0, vocab: int = VOCAB) -> Path:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(
        vocab_size=vocab, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=4, num_decoder_layers=4,
        num_experts=8, expert_capacity=256, encoder_sparse_step=2, decoder_sparse_step=2,
        router_jitter_noise=0.0, router_bias=router_bias, dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    SwitchTransformersForConditionalGeneration(config).save_pretrained(path)
    return path


def _expert_grads_nonzero(model) -> bool:
    return all(
        m.moe.experts.w_in.grad is not None and m.moe.experts.w_in.grad.abs().sum() > 0
        for _, m in moe_modules(model)
    )


def test_moefy_t5_swaps_every_other_ffn_and_trains_span_corruption():
    torch.manual_seed(0)
    model = tiny_t5()
    replaced = moefy(model, MoEConfig(num_experts=4, router="switch", capacity_factor=None))
    assert replaced == [
        "encoder.block.1.layer.1.DenseReluDense", "encoder.block.3.layer.1.DenseReluDense",
        "decoder.block.1.layer.2.DenseReluDense", "decoder.block.3.layer.2.DenseReluDense",
    ]
    assert isinstance(model.encoder.block[1].layer[1].DenseReluDense, MoEFeedForward)
    assert not isinstance(model.encoder.block[0].layer[1].DenseReluDense, MoEFeedForward)
    assert model.encoder.block[1].layer[1].DenseReluDense.moe.experts.activation == "relu"
    ids = torch.randint(3, VOCAB, (2, 10))
    labels = torch.randint(3, VOCAB, (2, 5))
    logits = model(input_ids=ids, decoder_input_ids=labels).logits
    aux = collect_aux_loss(model)
    (F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + aux).backward()
    assert aux.item() > 0 and _expert_grads_nonzero(model)
    assert collect_aux_loss(model) is None  # consumed: never counted twice


@pytest.mark.parametrize("build, activation, width", [(tiny_gpt2, "gelu", 32), (tiny_llama, "swiglu", 64)])
def test_moefy_decoder_only_causal_lm(build, activation, width):
    torch.manual_seed(0)
    model = build()
    replaced = moefy(model, MoEConfig(num_experts=4, router="bilevel", every=2))
    assert [name.split(".")[-2] for name in replaced] == ["1", "3"]
    experts = dict(moe_modules(model))[replaced[0]].moe.experts
    assert experts.activation == activation and experts.w_in.shape == (4, 16, width)
    ids = torch.randint(0, VOCAB, (2, 12))
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + collect_aux_loss(model)
    loss.backward()
    assert _expert_grads_nonzero(model)


def test_moefy_errors_name_the_problem():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(ConvertError, match="model_type 'bert' is not supported; supported: t5"):
        moefy(bert, MoEConfig())
    with pytest.raises(MoEConfigError, match="num_experts=6 must be a multiple of the expert-parallel size"):
        moefy(tiny_t5(), MoEConfig(num_experts=6), Topology(2, 2))
    with pytest.raises(ConvertError, match="moe.every=5 selects no block"):
        moefy(tiny_t5(num_layers=1), MoEConfig(every=5))
    with pytest.raises(MoEConfigError, match="moe.capacity_factor must be > 0"):
        moefy(tiny_t5(), MoEConfig(capacity_factor=0.0))
    with pytest.raises(ConvertError, match="activation .relu. has no smile expert equivalent"):
        moefy(tiny_t5(proj="gated-relu"), MoEConfig())
    with pytest.raises(MoEConfigError, match="moe.chunks must be 'auto' or an integer >= 1, got 0"):
        moefy(tiny_t5(), MoEConfig(chunks=0))


def _safetensors_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys.update(handle.keys())
    return keys


def test_switch_import_matches_transformers_and_exports_exactly(tmp_path):
    from transformers import SwitchTransformersForConditionalGeneration

    src = tiny_switch_dir(tmp_path / "switch")
    reference = SwitchTransformersForConditionalGeneration.from_pretrained(src).eval()
    model = import_switch(src, capacity_factor=None)  # dropless: HF's capacity (256) drops nothing
    ids, dec = torch.randint(3, VOCAB, (2, 12)), torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        want = reference(input_ids=ids, decoder_input_ids=dec).logits
        got = model(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    out = export_switch(model, tmp_path / "export")
    assert _safetensors_keys(out) == _safetensors_keys(src)
    back = SwitchTransformersForConditionalGeneration.from_pretrained(out)
    want_state, got_state = reference.state_dict(), back.state_dict()
    assert want_state.keys() == got_state.keys()
    assert all(torch.equal(want_state[k], got_state[k]) for k in want_state)
    unnamed = {"_name_or_path": ""}
    assert {**back.config.to_dict(), **unnamed} == {**reference.config.to_dict(), **unnamed}


def test_switch_import_export_errors(tmp_path):
    with pytest.raises(ConvertError, match="no config.json"):
        import_switch(tmp_path)
    with pytest.raises(ConvertError, match="router_bias=true is not supported"):
        import_switch(tiny_switch_dir(tmp_path / "biased", router_bias=True))
    model = tiny_t5()
    moefy(model, MoEConfig(num_experts=4))
    with pytest.raises(ConvertError, match="needs a SwitchTransformers host model"):
        export_switch(model, tmp_path / "out")


def switch_ep_worker(topo, src: str, out: str) -> dict:
    """Import on this rank's expert slice, compare with the full HF model, export sharded."""
    from transformers import SwitchTransformersForConditionalGeneration

    reference = SwitchTransformersForConditionalGeneration.from_pretrained(src).eval()
    report = {}
    for dispatcher in ("flat", "hierarchical"):
        model = import_switch(src, topo, dispatcher=dispatcher, capacity_factor=None)
        gen = torch.Generator().manual_seed(topo.rank)  # each rank routes its own tokens
        ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
        dec = torch.randint(3, VOCAB, (2, 7), generator=gen)
        with torch.no_grad():
            got = model(input_ids=ids, decoder_input_ids=dec).logits
            want = reference(input_ids=ids, decoder_input_ids=dec).logits
        report[dispatcher] = float((got - want).abs().max())
    slot = model.encoder.block[1].layer[1].mlp.moe.experts
    first = topo.ep_rank * slot.num_local
    wanted = reference.encoder.block[1].layer[1].mlp.experts[f"expert_{first}"].wi.weight.t()
    report["local_experts"] = slot.num_local
    report["slice_exact"] = bool(torch.equal(slot.w_in[0], wanted))
    export_switch(model, out, topo)
    if topo.rank == 0:
        back = SwitchTransformersForConditionalGeneration.from_pretrained(out).state_dict()
        want = reference.state_dict()
        same = back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
        report["round_trip_exact"] = same
    return report


@pytest.mark.slow
def test_switch_checkpoint_in_expert_parallel_layout_on_2x2(tmp_path):
    src = tiny_switch_dir(tmp_path / "switch", seed=3)
    out = tmp_path / "export"
    reports = run_distributed(switch_ep_worker, 2, 2, str(src), str(out), timeout=300)
    for report in reports:
        assert report["flat"] < 1e-5 and report["hierarchical"] < 1e-5, report
        assert report["local_experts"] == 2 and report["slice_exact"]
    assert reports[0]["round_trip_exact"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert _safetensors_keys(out) == _safetensors_keys(src)
