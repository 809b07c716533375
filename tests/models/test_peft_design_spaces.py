"""PEFT design spaces (S4) on stock transformers T5 / RoBERTa: the spec's invariants on tiny
random models (identity at init, exact group mapping, budget, gradients, LoRA merge, bad
inputs), the GLUE/SuperGLUE loader on local fixtures, LoRA on smile MoE experts, the search's
task averaging, tie rule and held-out split, and, through smile.runtime on simulated clusters,
learning (ZeRO-2, 2 ranks), trainable-only checkpoints and resume, the search, eval from the
saved artifact, and expert-LoRA training on 2 nodes x 2 GPUs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from smile.models.peft_design_spaces import (
    DesignSpaceConfig,
    apply_design,
    backbones,
    budget_report,
    group_sizes_for,
    is_peft,
)
from smile.models.peft_design_spaces.attention import prefix_attention
from smile.models.peft_design_spaces.components import Adapter, LoRA, Prefix, WithAdapter
from smile.models.peft_design_spaces.search import DesignSpace, DesignSpaceSearch, SearchConfig, Trial
from smile.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "models" / "peft_design_spaces" / "configs"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "glue"
ALL_BUT_PREFIX = [["adapter", "lora", "bitfit"]] * 4


def tiny(family: str, seed: int = 0) -> nn.Module:
    """Tiny random backbones: RoBERTa with 6 layers, T5 with 4 + 4 blocks (d_model 32)."""
    from transformers import (
        RobertaConfig,
        RobertaForSequenceClassification,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if family == "roberta":
        config = RobertaConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
            num_labels=3,
        )
        return RobertaForSequenceClassification(config).eval()
    config = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


def inputs(family: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        batch["labels"] = torch.randint(2, 64, (3, 4), generator=gen)
    return batch


def logits(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(family)).logits


def design(**kw) -> DesignSpaceConfig:
    kw.setdefault("param_budget_ratio", 0.1)
    kw.setdefault("prefix_mlp_hidden", 16)
    return DesignSpaceConfig(**kw)


FAMILIES = ["roberta", "t5"]


# ---- zero-init identity, and prefix as the one non-identity component --------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_lora_bitfit_leave_the_backbone_function_unchanged_at_init(family):
    reference = logits(tiny(family), family)
    model = apply_design(tiny(family), design(strategies_per_group=ALL_BUT_PREFIX))
    assert any(isinstance(m, LoRA) for m in model.modules()) and any(
        isinstance(m, WithAdapter) for m in model.modules()
    )
    torch.testing.assert_close(logits(model, family), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_changes_the_output_only_through_its_prefix_positions(family):
    reference = logits(tiny(family), family)
    model = apply_design(tiny(family), design(strategies_per_group=[["prefix"]] * 4))
    assert (logits(model, family) - reference).abs().max() > 1e-5  # a prefix moves attention even at init
    with model.prefixes_enabled(False):
        torch.testing.assert_close(logits(model, family), reference, atol=1e-6, rtol=0)

    # One attention call: exactly softmax over [prefix; keys] with the prefix visible to every query.
    attn = backbones.layers(model.backbone)[1].self_attention
    prefix: Prefix = attn.peft_prefix
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, prefix.num_heads, 5, prefix.head_dim, generator=gen) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, ..., 3:] = torch.finfo(torch.float32).min
    out, _ = prefix_attention(attn, q, k, v, mask, scaling=0.5)
    pk, pv = prefix.expand(2, torch.float32)
    scores = torch.cat([pk, k], 2).transpose(2, 3)
    weights = torch.softmax(q @ scores * 0.5 + torch.nn.functional.pad(mask, (prefix.length, 0)), dim=-1)
    expected = (weights @ torch.cat([pv, v], 2)).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---- exact group -> module mapping -------------------------------------------------------------------------
def _strategies_found(layer: backbones.Layer) -> set[str]:
    found = set()
    if isinstance(getattr(layer.ffn_parent, layer.ffn_name), WithAdapter):
        found.add("adapter")
    if isinstance(getattr(layer.self_attention, "peft_prefix", None), Prefix):
        found.add("prefix")
    if any(isinstance(m, LoRA) for m in layer.block.modules()):
        found.add("lora")
    biases = [
        n
        for n, p in layer.block.named_parameters()
        if n.endswith("bias") and is_peft(p) and ".adapter." not in n
    ]
    if biases:
        found.add("bitfit")
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_gets_exactly_its_groups_modules(family):
    model = apply_design(tiny(family), design())
    layers = backbones.layers(model.backbone)
    sizes = [1, 2, 2, 1] if family == "roberta" else [1, 3, 3, 1]
    assert [len(g.layers) for g in model.design.groups(len(layers))] == sizes  # spindle
    expected = {}
    start = 0
    for size, strategies in zip(sizes, model.design.strategies_per_group):
        expected.update({i: set(strategies) for i in range(start, start + size)})
        start += size
    for layer in layers:
        assert _strategies_found(layer) == expected[layer.index], f"layer {layer.index}"
        lora = sorted(n for n, m in layer.block.named_modules() if parametrize.is_parametrized(m))
        want = (
            [layer.attention_weights[a].rsplit(".", 1)[0] for a in ("q", "v")]
            if "lora" in expected[layer.index]
            else []
        )
        assert lora == sorted(want)
        if family == "t5" and "bitfit" not in expected[layer.index]:  # biases are added only for BitFit
            assert all(m.bias is None for m, _ in backbones.bitfit_sites(layer, skip=(Adapter,)))


# ---- budget ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation", ["uniform", "increasing"])
def test_budget_within_ten_percent_and_uniform_within_groups(family, allocation):
    ratio = 0.1 if allocation == "uniform" else 0.2  # the first layer gets 1/36 of the total when increasing
    model = apply_design(tiny(family), design(allocation=allocation, param_budget_ratio=ratio))
    report = budget_report(model)
    assert abs(report["ratio"] - ratio) <= 0.1 * ratio, report["ratio"]
    layers = backbones.layers(model.backbone)
    rows = report["layers"]
    assert [r["planned"] for r in rows] == [r["params"] for r in rows]  # plan == parameters actually created
    if allocation == "uniform":
        for group in {r["group"] for r in rows}:
            counts = [r["params"] for r in rows if r["group"] == group]
            unit = max(model.plans[0].costs.unit(s) for s in ("adapter", "prefix", "lora"))
            assert max(counts) - min(counts) <= unit, (group, counts)
    else:
        assert rows[-1]["budget"] > rows[0]["budget"]
    # Without the prefix MLP, every trainable parameter except the head is in the budget.
    direct = apply_design(tiny(family), design(prefix_mlp_hidden=0))
    trainable = sum(
        p.numel() for n, p in direct.named_parameters() if p.requires_grad and not direct.is_head(n)
    )
    assert abs(trainable / direct.backbone_params - 0.1) <= 0.01
    assert len(layers) == len(rows)


# ---- gradients, LoRA merge, prefix fold --------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_only_peft_parameters_and_the_head_receive_gradients(family):
    model = apply_design(tiny(family), design())
    model.train()
    out = model(**inputs(family))
    (out.loss if family == "t5" else out.logits.square().sum()).backward()
    for name, param in model.named_parameters():
        trained = is_peft(param) or model.is_head(name)
        assert (param.grad is not None) == trained, name
    assert any(model.is_head(n) for n, _ in model.named_parameters()) == (family == "roberta")
    nonzero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    for kind in ("lora_B", "adapter.up.weight", "peft_prefix.embedding", "prefix_mlp.net.2.weight"):
        assert any(kind in n for n in nonzero), kind


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_lora_and_folded_prefix_give_the_same_logits(family):
    model = apply_design(tiny(family), design())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRA):
                m.lora_B.normal_(0, 0.1)
    before = logits(model, family)
    assert model.merge_lora() == 4  # q and v in G1's and G4's layer
    assert not any(isinstance(m, LoRA) for m in model.modules())
    torch.testing.assert_close(logits(model, family), before, atol=1e-5, rtol=1e-5)
    model.fold_prefixes()
    assert model.prefix_mlp is None and not any(
        n.endswith("embedding") and "peft_prefix" in n for n, _ in model.named_parameters()
    )
    torch.testing.assert_close(logits(model, family), before, atol=1e-5, rtol=1e-5)


# ---- bad inputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"group_sizes": [1, 1, 1, 1]}, "sums to 4 layers, but the backbone has 6"),
        ({"strategies_per_group": [["adapter"], [], ["lora"], ["bitfit"]]}, "is empty while tune_all_groups"),
        ({"strategies_per_group": [["adapter"], ["ia3"], ["lora"], ["bitfit"]]}, "unknown strategy ['ia3']"),
        ({"param_budget_ratio": 0.004, "strategies_per_group": [["lora"]] * 4}, "strategy 'lora'"),
        ({"param_budget_ratio": 0.002, "strategies_per_group": [["adapter"]] * 4}, "strategy 'adapter'"),
        ({"param_budget_ratio": 0.002, "strategies_per_group": [["prefix"]] * 4}, "strategy 'prefix'"),
        ({"param_budget_ratio": 0.002, "strategies_per_group": [["bitfit"]] * 4}, "strategy 'bitfit'"),
        ({"lora_targets": ["q", "no_such_weight"]}, "'no_such_weight' matches no weight"),
    ],
)
def test_bad_designs_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        apply_design(tiny("roberta"), design(**kwargs))
    assert message in str(err.value)


def test_spindle_and_other_groupings():
    assert group_sizes_for("spindle", 12) == [2, 4, 4, 2]
    assert group_sizes_for("spindle", 24) == [4, 8, 8, 4]
    assert group_sizes_for("spindle", 8) == [1, 3, 3, 1]
    assert group_sizes_for("bottleneck", 12) == [4, 2, 2, 4]
    assert group_sizes_for("increasing", 12) == [1, 2, 4, 5]
    for pattern in ("uniform", "increasing", "decreasing", "spindle", "bottleneck"):
        sizes = group_sizes_for(pattern, 10)
        assert sum(sizes) == 10 and min(sizes) >= 1
    with pytest.raises(ValueError, match="allowed"):
        group_sizes_for("zigzag", 12)


# ---- LoRA / adapters on smile MoE experts (smile.hf.moefy) ---------------------------------
def tiny_moe_t5() -> nn.Module:
    from smile.hf import moefy
    from smile.moe import MoEConfig

    model = tiny("t5")
    moefy(model, MoEConfig(num_experts=4, router="switch", every=2, capacity_factor=None))
    return model.eval()


def test_lora_reaches_expert_weights_and_router_of_moe_layers():
    from smile.hf import MoEFeedForward
    from smile.moe.experts import is_expert_parameter

    reference = logits(tiny_moe_t5(), "t5")
    model = apply_design(
        tiny_moe_t5(), design(lora_targets=["q", "v", "experts", "router"], param_budget_ratio=0.2)
    )
    with model.prefixes_enabled(False):  # all other strategies, expert LoRA included, start as the identity
        torch.testing.assert_close(logits(model, "t5"), reference, atol=1e-6, rtol=0)
    last = backbones.layers(model.backbone)[-1]  # decoder block 3: sparse, in G4 (prefix, bitfit, lora)
    ffn = last.block.layer[-1].DenseReluDense
    assert isinstance(ffn, MoEFeedForward)
    rank = model.plans[-1].sizes["lora"]
    experts = ffn.moe.experts.parametrizations
    assert tuple(experts.w_in[0].lora_A.shape) == (4, 32, rank) and tuple(experts.w_in[0].lora_B.shape) == (
        4,
        rank,
        64,
    )
    assert tuple(experts.w_out[0].lora_A.shape) == (4, 64, rank) and tuple(experts.w_out[0].lora_B.shape) == (
        4,
        rank,
        32,
    )
    assert all(is_expert_parameter(p) for p in experts.parameters() if is_peft(p))
    assert tuple(ffn.moe.router.proj.parametrizations.weight[0].lora_B.shape) == (4, rank)
    adapted = backbones.layers(model.backbone)[1]  # encoder block 1: sparse, in G2 (adapter, prefix)
    assert isinstance(adapted.block.layer[-1].DenseReluDense, WithAdapter)
    assert isinstance(adapted.block.layer[-1].DenseReluDense.inner, MoEFeedForward)
    # Every expert's low-rank delta trains: gradients reach B of w_in and w_out for each expert used.
    model.train()
    model(**inputs("t5")).loss.backward()
    assert experts.w_out[0].lora_B.grad.abs().sum(dim=(1, 2)).gt(0).sum() >= 2
    assert (
        experts.w_in[0].lora_A.grad is not None
        and ffn.moe.experts.parametrizations.w_in.original.grad is None
    )
    # The budget counts every expert's factors (one LoRA rank costs e * (in + out) per expert weight).
    assert model.plans[-1].costs.lora_unit == 2 * (32 + 32) + 2 * 4 * (32 + 64) + (32 + 4)
    report = budget_report(model)
    assert abs(report["ratio"] - 0.2) <= 0.02


# ---- the search's greedy logic (every sampled design applied for real) -------------------------------------
def test_search_fixes_the_best_choice_stage_by_stage():
    from smile.models.peft_design_spaces.allocation import BudgetError

    spindle = group_sizes_for("spindle", 6)
    seen = []

    def evaluate(candidate: DesignSpaceConfig, steps: int) -> Trial:
        model = apply_design(tiny("roberta"), candidate)  # raises BudgetError for infeasible designs
        report = budget_report(model)
        seen.append((candidate, steps, report["ratio"]))
        # Weights dominate the noise of the still-free components at every stage.
        score = 30.0 * (candidate.group_sizes == spindle) + 10.0 * (candidate.allocation == "uniform")
        score += 5.0 * candidate.tune_all_groups
        score += sum(w * ("lora" in s) for w, s in zip((1.0, 0.3, 0.1, 0.03), candidate.strategies_per_group))
        return Trial({"task": score}, report["trainable_params"])

    space = DesignSpace(design(), num_layers=6)
    config = SearchConfig(
        stages=["grouping", "allocation", "tunable_groups", "strategies"],
        groupings=["uniform", "spindle"],
        allocations=["increasing", "uniform"],
        tunable_groups=[[1], [1, 2, 3, 4]],
        strategy_sets=[["bitfit"], ["lora", "adapter"]],
    )
    result = DesignSpaceSearch(space, n_samples=2, short_train_steps=7, config=config).run(evaluate)
    best = result.best
    assert best.group_sizes == spindle and best.allocation == "uniform" and best.tune_all_groups
    assert best.strategies_per_group == [["lora", "adapter"]] * 4
    assert [h["stage"] for h in result.history] == [
        "grouping",
        "allocation",
        "tunable_groups",
        "strategies G1",
        "strategies G2",
        "strategies G3",
        "strategies G4",
    ]
    assert all(steps == 7 for _, steps, _ in seen)
    assert any(c.allocation == "increasing" for c, _, _ in seen) and any(
        not c.tune_all_groups for c, _, _ in seen
    )
    apply_design(tiny("roberta"), best)
    with pytest.raises(BudgetError):  # so the search can skip infeasible samples
        apply_design(tiny("roberta"), dataclasses.replace(best, param_budget_ratio=0.001))


def test_search_averages_over_tasks_and_breaks_ties_by_size_then_order(caplog):
    """Task A alone prefers spindle, the average over A and B prefers uniform; ties are logged and
    go to fewer trainable parameters, then to the choice listed first."""
    space = DesignSpace(design(), num_layers=6)
    per_task = {"spindle": {"a": 0.9, "b": 0.1}, "uniform": {"a": 0.6, "b": 0.6}}
    params = {"spindle": 10, "uniform": 10, "increasing": 7, "decreasing": 7}

    def run(groupings: list[str], scores, tolerance: float = 0.0):
        def evaluate(candidate: DesignSpaceConfig, steps: int) -> Trial:
            name = next(g for g in groupings if group_sizes_for(g, 6) == candidate.group_sizes)
            return Trial(scores(name), params[name])

        config = SearchConfig(stages=["grouping"], groupings=groupings, tie_tolerance=tolerance)
        return DesignSpaceSearch(space, n_samples=1, short_train_steps=1, config=config).run(evaluate)

    averaged = run(["spindle", "uniform"], lambda g: per_task[g])
    entry = averaged.history[0]
    assert entry["chosen"] == "uniform" and entry["tie"] is None
    assert entry["scores"] == {"spindle": pytest.approx(0.5), "uniform": pytest.approx(0.6)}
    assert entry["task_scores"]["spindle"] == {"a": 0.9, "b": 0.1}
    assert averaged.best.group_sizes == group_sizes_for("uniform", 6)

    # Equal scores: the listed order alone would pick spindle; fewer trainable parameters wins.
    with caplog.at_level("WARNING", logger="smile.models.peft_design_spaces.search"):
        tied = run(["spindle", "uniform", "increasing"], lambda g: {"a": 0.5})
    tie = tied.history[0]["tie"]
    assert tied.history[0]["chosen"] == "increasing" and tie["chosen"] == "increasing"
    assert tie["choices"] == ["spindle", "uniform", "increasing"]
    assert "3 choices tie" in caplog.text and "chose 'increasing'" in caplog.text
    # Equal scores and sizes: the configured order decides (here the later-listed one comes first).
    assert run(["decreasing", "increasing"], lambda g: {"a": 0.5}).history[0]["chosen"] == "decreasing"
    assert run(["increasing", "decreasing"], lambda g: {"a": 0.5}).history[0]["chosen"] == "increasing"
    # A tolerance turns near-equal scores into a tie; without it the higher score wins.
    near = {"spindle": {"a": 0.701}, "increasing": {"a": 0.7}}
    assert run(["spindle", "increasing"], near.get).history[0]["chosen"] == "spindle"
    assert run(["spindle", "increasing"], near.get, tolerance=0.01).history[0]["chosen"] == "increasing"
    with pytest.raises(ValueError, match="tie_tolerance"):
        SearchConfig(tie_tolerance=-1.0).validate()


def test_search_heldout_split_is_carved_from_train_and_disjoint_from_eval():
    from smile.models.peft_design_spaces.data import DataConfig, holdout_split, load_examples
    from smile.models.peft_design_spaces.training import Experiment, JobConfig
    from smile.moe.topology import Topology
    from smile.runtime import load_config

    job = load_config(JobConfig, CONFIGS / "tiny_roberta_keywords.yaml", ["search.holdout_fraction=0.25"])
    exp = Experiment(job, Topology(nodes=1, gpus_per_node=1))
    split = exp.search_split()
    key = lambda ex: tuple(ex["input_ids"])  # noqa: E731  (word-level ids: equal ids = equal text)
    held, rest = [key(e) for e in split.eval_examples], [key(e) for e in split.train_examples]
    assert len(held) == 256 and len(held) + len(rest) == len(exp.train_examples)
    assert sorted(held + rest) == sorted(key(e) for e in exp.train_examples)  # carved from train
    assert not set(held) & {key(e) for e in exp.eval_examples}  # disjoint from the final eval split
    assert exp.eval_examples is not split.eval_examples and len(exp.eval_examples) == 256
    again = Experiment(job, Topology(nodes=1, gpus_per_node=1)).search_split()
    assert [key(e) for e in again.eval_examples] == held  # seeded: the same split every time
    other = dataclasses.replace(job, search=dataclasses.replace(job.search, seed=1))
    assert [key(e) for e in Experiment(other, Topology(1, 1)).search_split().eval_examples] != held

    # A training row that also occurs in the eval split is never held out (GLUE splits share some).
    cfg = DataConfig(benchmark="glue", task="sst2", data_dir=str(FIXTURES / "glue"))
    train, evaluation = load_examples(cfg, "train"), load_examples(cfg, "eval")
    train = train + [dict(evaluation[0])]
    keep, held_idx = holdout_split(train, evaluation, cfg.spec, fraction=0.9, seed=0)
    assert len(train) - 1 in keep and not set(keep) & set(held_idx) and len(held_idx) == 11
    sentences = {r["sentence"] for r in evaluation}
    assert not any(train[i]["sentence"] in sentences for i in held_idx)


# ---- data: GLUE / SuperGLUE loaders on local fixtures, tokenisation, batches, metrics ----------------------
def test_glue_and_superglue_loaders_read_the_hub_layout_from_a_local_copy(tmp_path):
    from smile.models.peft_design_spaces.data import (
        Batches,
        DataConfig,
        encode,
        load_examples,
        word_tokenizer,
    )

    cases = [("glue", "sst2", 12, 4), ("glue", "rte", 6, 2), ("super_glue", "boolq", 4, 2)]
    for benchmark, task, n_train, n_eval in cases:
        cfg = DataConfig(
            benchmark=benchmark, task=task, data_dir=str(FIXTURES / benchmark), cache_dir=str(tmp_path)
        )
        train, evaluation = load_examples(cfg, "train"), load_examples(cfg, "eval")
        assert (len(train), len(evaluation)) == (n_train, n_eval)
        spec = cfg.spec
        assert all(set(spec.fields) <= set(row) and row["label"] in (0, 1) for row in train + evaluation)
        texts = (
            [str(r[f]) for r in train for f in spec.fields]
            + list(spec.labels)
            + [task, *(f"{f}:" for f in spec.fields)]
        )
        t5 = encode(train, spec, word_tokenizer(texts, "t5"), "t5", cfg)
        tok = word_tokenizer(texts, "t5")
        assert tok.decode(t5[0]["target_ids"], skip_special_tokens=True) == spec.labels[train[0]["label"]]
        assert tok.decode(t5[0]["input_ids"], skip_special_tokens=True).startswith(
            f"{task} {spec.fields[0]} :"
        )
        rob_tok = word_tokenizer(texts, "roberta")
        rob = encode(train, spec, rob_tok, "roberta", cfg)
        sep = rob_tok.sep_token_id
        assert rob[0]["input_ids"][0] == rob_tok.cls_token_id and rob[0]["input_ids"].count(sep) == (
            3 if len(spec.fields) == 2 else 1
        )
    with pytest.raises(FileNotFoundError, match="no train-\\*.parquet"):
        load_examples(DataConfig(benchmark="glue", task="cola", data_dir=str(FIXTURES / "glue")), "train")
    with pytest.raises(ValueError, match="allowed: .*boolq"):
        DataConfig(benchmark="super_glue", task="record").validate()

    # Evaluation shards: every example once, short shards padded with invalid copies.
    examples = [{"input_ids": [5] * (i + 1), "label": i % 2} for i in range(5)]
    shards = [list(Batches(examples, 2, 0, rank, 3, train=False)) for rank in range(3)]
    assert [len(s) for s in shards] == [1, 1, 1]
    assert sum(int(b["valid"].sum()) for s in shards for b in s) == 5
    assert shards[0][0]["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    # Training shards: same permutation on every rank, disjoint, equal batch counts.
    train_shards = [
        [b["input_ids"][:, 0].tolist() for b in Batches(examples * 4, 3, 0, r, 2, seed=3)] for r in range(2)
    ]
    assert len(train_shards[0]) == len(train_shards[1]) == 3


def test_metrics_match_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    from scipy.stats import spearmanr

    from smile.models.peft_design_spaces.metrics import task_metrics

    gen = torch.Generator().manual_seed(0)
    pred, gold = (
        torch.randint(0, 2, (50,), generator=gen).tolist(),
        torch.randint(0, 2, (50,), generator=gen).tolist(),
    )
    m = task_metrics(pred, gold, regression=False, num_labels=2)
    assert m["accuracy"] == pytest.approx(sklearn.accuracy_score(gold, pred))
    assert m["f1"] == pytest.approx(sklearn.f1_score(gold, pred))
    assert m["matthews"] == pytest.approx(sklearn.matthews_corrcoef(gold, pred))
    three = task_metrics([0, 1, 2, 2, 1, -1], [0, 1, 1, 2, 1, 0], regression=False, num_labels=3)
    assert three["macro_f1"] == pytest.approx(
        sklearn.f1_score([0, 1, 1, 2, 1, 0], [0, 1, 2, 2, 1, -1], labels=[0, 1, 2], average="macro")
    )
    x, y = torch.rand(30, generator=gen).tolist(), torch.rand(30, generator=gen).tolist()
    y[3] = y[4]
    reg = task_metrics(x, y, regression=True, num_labels=1)
    assert reg["spearman"] == pytest.approx(spearmanr(x, y).statistic)


def test_bundled_configs_load_and_job_validation():
    from smile.models.peft_design_spaces.training import JobConfig
    from smile.runtime import load_config

    for path in sorted(CONFIGS.glob("*.yaml")):
        job = load_config(JobConfig, path)
        assert job.train.zero_stage == 2, path.name
        assert job.train.checkpoint.trainable_only, path.name  # the backbone is always frozen
    with pytest.raises(ValueError, match="trainable_only must be true"):
        load_config(
            JobConfig, CONFIGS / "tiny_roberta_keywords.yaml", ["train.checkpoint.trainable_only=false"]
        )
    with pytest.raises(ValueError, match="not a supported keywords task"):
        load_config(JobConfig, CONFIGS / "tiny_roberta_keywords.yaml", ["search.tasks=[keywords,sst2]"])
    with pytest.raises(ValueError, match="exactly one of design.backbone_path"):
        load_config(JobConfig, CONFIGS / "tiny_roberta_keywords.yaml", ["design.backbone_path=/some/dir"])
    with pytest.raises(ValueError, match="allowed: adapter, prefix, bitfit, lora"):
        load_config(
            JobConfig, CONFIGS / "tiny_roberta_keywords.yaml", ["design.strategies_per_group=[[lora],[dora]]"]
        )


# ---- through smile.runtime on simulated clusters -----------------------------------------------------------
def _cli(argv: list[str]) -> str:
    import contextlib
    import io

    from smile.cli import main as smile_main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert smile_main(["zoo", "peft_design_spaces", *argv]) == 0
    return buffer.getvalue()


def _train_eval_search(topology, tmp: str) -> dict:
    from smile.models.peft_design_spaces.training import Experiment, JobConfig
    from smile.runtime import load_config

    out: dict = {}
    config = str(CONFIGS / "tiny_roberta_keywords.yaml")
    run_dir = f"{tmp}/roberta"
    job = load_config(JobConfig, config, [f"train.run_dir={run_dir}"])
    exp = Experiment(job, topology)
    model = exp.build()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.trained_named_parameters()}
    summary = exp.train(model=model)
    out["summary"] = {
        k: summary[k] for k in ("eval", "majority_accuracy", "steps", "first_loss", "last_loss")
    }
    out["ratio"] = summary["budget"]["ratio"]
    out["frozen"] = len(frozen)
    out["frozen_identical"] = all(
        torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen
    )
    out["trained_moved"] = sum(not torch.equal(p, trained[n]) for n, p in model.trained_named_parameters())
    out["trained"] = len(trained)
    out["eval_cli"] = _cli(["eval", "--config", config, f"train.run_dir={run_dir}"])

    # T5 on the GLUE fixture with trainable-only checkpoints at steps 3 and 6, then a second run
    # resumed from step 3 (another run dir) that must end with the same PEFT weights.
    t5_config = str(CONFIGS / "tiny_t5_keywords.yaml")
    t5_args = [
        "data.benchmark=glue",
        "data.task=sst2",
        f"data.data_dir={FIXTURES / 'glue'}",
        f"data.cache_dir={tmp}/hf",
        "train.max_steps=6",
        "train.micro_batch_size=4",
        "train.log.every=3",
        "train.checkpoint.every=3",
        "train.checkpoint.save_final=true",
    ]
    _cli(["train", "--config", t5_config, f"train.run_dir={tmp}/t5", *t5_args])
    resume = f"train.checkpoint.resume={tmp}/t5/checkpoints/step_00000003"
    _cli(["train", "--config", t5_config, f"train.run_dir={tmp}/t5_resumed", *t5_args, resume])
    t5_job = load_config(JobConfig, t5_config, [f"train.run_dir={tmp}/t5", *t5_args])
    t5_model = Experiment(t5_job, topology).build()
    out["t5_trained"] = sorted(n for n, _ in t5_model.trained_named_parameters())
    state = t5_model.state_dict(keep_vars=True)  # tied weights under every name, as checkpoints see them
    out["t5_frozen"] = sorted(
        n for n, t in state.items() if isinstance(t, nn.Parameter) and not t.requires_grad
    )

    _cli(
        [
            "search",
            "--config",
            config,
            f"train.run_dir={tmp}/search",
            "search.tasks=[keywords,topics]",
            "search.max_holdout_samples=64",
            "search.n_samples=1",
            "search.short_train_steps=4",
            "search.stages=[grouping,allocation]",
            "search.groupings=[spindle,uniform]",
            "search.allocations=[uniform,increasing]",
        ]
    )
    return out


@pytest.mark.slow
def test_s4_trains_with_zero2_on_two_ranks_beats_majority_evals_and_searches(tmp_path):
    from safetensors.torch import load_file

    ranks = run_distributed(_train_eval_search, 1, 2, str(tmp_path), timeout=600)
    for out in ranks:
        assert out["frozen_identical"] and out["frozen"] > 50
        assert out["trained_moved"] == out["trained"]
    result = ranks[0]["summary"]
    accuracy, majority = result["eval"]["accuracy"], result["majority_accuracy"]
    assert result["steps"] == 150 and majority == 0.5
    assert accuracy >= majority + 0.3, result  # S4 on a frozen tiny RoBERTa clearly beats the majority class
    assert abs(ranks[0]["ratio"] - 0.1) <= 0.01
    # `eval` on the saved PEFT artifact reproduces the final evaluation.
    assert json.loads(ranks[0]["eval_cli"])["eval"]["accuracy"] == pytest.approx(accuracy)
    assert ranks[1]["eval_cli"] == ""
    saved = json.loads((tmp_path / "roberta" / "peft" / "design.json").read_text())
    assert saved["strategies_per_group"][3] == ["prefix", "bitfit", "lora"]
    # T5 text-to-text on the GLUE fixture through `smile zoo peft_design_spaces train`.
    t5 = json.loads((tmp_path / "t5" / "results.json").read_text())
    assert t5["task"] == "glue/sst2" and t5["steps"] == 6 and 0.0 <= t5["eval"]["accuracy"] <= 1.0
    # Its checkpoints hold exactly the trainable tensors; the frozen backbone is only recorded.
    step = tmp_path / "t5" / "checkpoints" / "step_00000006"
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["trainable_only"] and manifest["frozen_source"].startswith("random t5 backbone")
    assert sorted(load_file(str(step / "model.safetensors"))) == ranks[0]["t5_trained"]
    assert sorted(json.loads((step / "frozen.json").read_text())) == ranks[0]["t5_frozen"]
    # Resuming from step 3 ends where the uninterrupted run ended (same PEFT weights and metrics).
    resumed = json.loads((tmp_path / "t5_resumed" / "results.json").read_text())
    assert resumed["steps"] == 6 and resumed["eval"] == t5["eval"]
    first = load_file(str(tmp_path / "t5" / "peft" / "peft.safetensors"))
    second = load_file(str(tmp_path / "t5_resumed" / "peft" / "peft.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # The search scored every candidate on each task's held-out part of train and averaged the tasks.
    search = json.loads((tmp_path / "search" / "search.json").read_text())
    assert search["tasks"] == {
        t: {"metric": "accuracy", "search_train": 960, "heldout": 64} for t in ("keywords", "topics")
    }
    assert [h["stage"] for h in search["history"]] == ["grouping", "allocation"]
    for entry in search["history"]:
        for choice, score in entry["scores"].items():
            tasks = entry["task_scores"][choice]
            assert set(tasks) == {"keywords", "topics"}
            assert score == pytest.approx(sum(tasks.values()) / 2)
        if entry["tie"]:  # equal scores: the tie rule decided, and the run recorded it
            assert (
                entry["tie"]["chosen"] == entry["chosen"] and len(set(entry["tie"]["scores"].values())) == 1
            )
        else:
            assert entry["scores"][entry["chosen"]] == max(entry["scores"].values())
    best = DesignSpaceConfig(**search["best"])
    assert sum(best.group_sizes) == 6 and best.allocation in ("uniform", "increasing")
    apply_design(tiny("roberta"), best)


def _moe_expert_lora(topology, tmp: str) -> dict:
    from smile.models.peft_design_spaces.training import Experiment, JobConfig
    from smile.moe.experts import is_expert_parameter
    from smile.runtime import load_config

    job = load_config(
        JobConfig,
        CONFIGS / "tiny_t5_moe_keywords.yaml",
        [
            f"train.run_dir={tmp}/moe",
            "train.max_steps=3",
            "train.micro_batch_size=8",
            "data.keywords_train=64",
            "data.keywords_eval=32",
            "data.max_target_length=2",
        ],
    )
    exp = Experiment(job, topology)
    model = exp.build()
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if is_expert_parameter(p)}
    summary = exp.train(model=model)
    peft = dict(model.trained_named_parameters())
    return {
        "loss": summary["last_loss"],
        "eval": summary["eval"],
        # numpy, not tensors: tensors cross the result queue as shared memory of a process that exits
        "expert_lora_B": {
            n: p.detach().float().numpy() for n, p in peft.items() if is_expert_parameter(p) and "lora_B" in n
        },
        "dense_lora_B": {
            n: p.detach().float().numpy()
            for n, p in peft.items()
            if not is_expert_parameter(p) and "lora_B" in n
        },
        "frozen_experts_identical": all(
            torch.equal(p, experts[n]) for n, p in model.named_parameters() if n in experts and not is_peft(p)
        ),
    }


@pytest.mark.slow
def test_expert_lora_trains_on_two_nodes_by_two_gpus(tmp_path):
    """T5 with SMILE bi-level MoE FFNs (4 experts, one per rank): LoRA on the experts trains,
    each rank updates its own expert's factors, dense PEFT stays replicated."""
    from safetensors.torch import load_file

    ranks = run_distributed(_moe_expert_lora, 2, 2, str(tmp_path), timeout=600)
    for out in ranks:
        assert out["frozen_experts_identical"] and torch.isfinite(torch.tensor(out["loss"]))
        assert out["expert_lora_B"] and all(
            t.shape[0] == 1 and abs(t).sum() > 0 for t in out["expert_lora_B"].values()
        )
    name = next(iter(ranks[0]["expert_lora_B"]))
    assert not (ranks[0]["expert_lora_B"][name] == ranks[1]["expert_lora_B"][name]).all()
    for other in ranks[1:]:
        for n, t in ranks[0]["dense_lora_B"].items():
            torch.testing.assert_close(torch.from_numpy(other["dense_lora_B"][n]), torch.from_numpy(t))
    saved = load_file(str(tmp_path / "moe" / "peft" / "peft.safetensors"))
    assert saved[name].shape[0] == 4  # the PEFT artifact holds every expert's factors
    for r, out in enumerate(ranks):
        torch.testing.assert_close(
            saved[name][r : r + 1].float(), torch.from_numpy(out["expert_lora_B"][name])
        )
