"""Multimodal-CoT (smile.models.mm_cot): the gated fusion's invariants, generation with image
features, prompts and the answer parser, stage chaining, bad inputs, the ScienceQA path on a local
fixture (made here) through the CLI, the ViT feature extraction, learning against ablations, and
MoE on a simulated 2 nodes x 2 GPUs. Offline: random tiny T5s and word-level tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import T5Config

from smile.models.mm_cot import (
    FAILED,
    MMCoTConfig,
    build_model,
    build_source,
    category_accuracy,
    extract_answer,
    method,
)
from smile.models.mm_cot.data import load_features, make_examples, read_rationales
from smile.models.mm_cot.prompts import categories
from smile.models.mm_cot.synthetic import task_texts, word_tokenizer
from smile.runtime import ConfigError, load_config
from smile.testing import run_distributed

TINY = Path(__file__).parents[2] / "models" / "mm_cot" / "configs" / "synthetic_tiny.yaml"
SHAPE = (5, 16)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # 2 shared cores: more threads oversubscribe them


def tiny_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=100,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return build_model(cfg, patch_shape=SHAPE, **kw).eval()


def inputs(m: int = 5, b: int = 2, n: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (b, n), generator=g)
    return ids, torch.ones_like(ids), torch.randn(b, m, SHAPE[1], generator=g)


# ---- fusion invariants ------------------------------------------------------------------------
def test_gate_bias_limits_give_text_or_attention_output():
    model = tiny_model()
    ids, mask, feats = inputs()
    with torch.no_grad():
        h_lang = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        model.fusion.gate_dense.weight.zero_()
        model.fusion.gate_dense.bias.fill_(-1e4)
        torch.testing.assert_close(
            model.encode(ids, mask, feats).last_hidden_state, h_lang, atol=1e-6, rtol=0
        )
        model.fusion.gate_dense.bias.fill_(1e4)
        h_attn = model.fusion.attention(h_lang, feats)
        torch.testing.assert_close(
            model.encode(ids, mask, feats).last_hidden_state, h_attn, atol=1e-6, rtol=0
        )
        assert not torch.allclose(h_attn, h_lang)


@pytest.mark.parametrize("m", [1, 5, 13])
def test_fusion_shape_for_any_number_of_patches(m):
    model = tiny_model()
    ids, mask, feats = inputs(m=m, b=3, n=9)
    assert model.encode(ids, mask, feats).last_hidden_state.shape == (3, 9, 32)


def test_generate_threads_image_feats():
    model = tiny_model()
    ids, mask, feats = inputs()
    with torch.no_grad():
        model.fusion.gate_dense.bias.fill_(1e4)  # non-trivial: the decoder sees the image only
        kw = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            output_scores=True,
            return_dict_in_generate=True,
        )
        with_img = model.generate(image_feats=feats, **kw)
        zeros = model.generate(image_feats=torch.zeros_like(feats), **kw)
        beams = model.generate(
            image_feats=feats, input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3
        )
    assert not torch.allclose(with_img.scores[0], zeros.scores[0])
    assert beams.shape[0] == 2


def test_missing_or_wrong_image_feats_are_clear_errors(tmp_path):
    model = tiny_model()
    ids, mask, feats = inputs()
    with pytest.raises(ValueError, match="image_feats missing"):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    with pytest.raises(ValueError, match="image_feats missing"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"feature dim 8 != patch_shape\[1\] 16"):
        model(input_ids=ids, attention_mask=mask, image_feats=torch.zeros(2, 5, 8), labels=ids)
    lenient = tiny_model(allow_missing_image=True)
    assert lenient(input_ids=ids, attention_mask=mask, labels=ids).loss.isfinite()
    np.save(tmp_path / "p1.npy", np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match=r"feature dim 8 != patch_shape\[1\] 16"):
        load_features(["p1"], {"p1": {"image": "image.png"}}, tmp_path, SHAPE)
    feats = load_features(["p2"], {"p2": {"image": None}}, None, SHAPE)  # no image: all-zero matrix
    assert feats["p2"].shape == SHAPE and not feats["p2"].any()


def test_vision_mask_gates_off_image_less_samples():
    model = tiny_model(vision_mask=True)
    ids, mask, feats = inputs()
    feats[1] = 0
    with torch.no_grad():
        h_lang = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        fused = model.encode(ids, mask, feats).last_hidden_state
    torch.testing.assert_close(fused[1], h_lang[1])
    assert not torch.allclose(fused[0], h_lang[0])


# ---- prompts, parser, categories --------------------------------------------------------------
PROBLEM = {
    "question": "Which is a mammal?",
    "choices": ["cat", "fish"],
    "answer": 0,
    "hint": "Look.",
    "image": "image.png",
    "lecture": "Mammals have fur.",
    "solution": "A cat has fur.",
    "subject": "natural science",
    "grade": "grade4",
}


@pytest.mark.parametrize(
    "text, letter",
    [
        ("Answer: The answer is (B).", "B"),
        ("The answer is (A).", "A"),
        ("Answer : The answer is ( C ).", "C"),
        ("The answer is B.", FAILED),
        ("The answer is (A). The answer is (B).", FAILED),
        ("garbage", FAILED),
        ("", FAILED),
    ],
)
def test_answer_parser(text, letter):
    assert extract_answer(text) == letter


def test_prompt_formats_and_unknown_format():
    src = build_source(PROBLEM, "QCM-E")
    assert src == "Question: Which is a mammal?\nContext: Look.\nOptions: (A) cat (B) fish"
    assert build_source(PROBLEM, "QCMG-A", "Solution: fur!").endswith("(B) fish\nSolution: fur!")
    with pytest.raises(
        ValueError, match="unknown prompt_format 'QCX-A'; valid: QCM-E, QCM-LE, QCMG-A, QCM-A"
    ):
        build_source(PROBLEM, "QCX-A")
    with pytest.raises(
        ConfigError, match="prompt_format='QCM-E' unknown for stage 'answer'; valid: QCMG-A, QCM-A"
    ):
        load_config(MMCoTConfig, TINY, ["stage=answer", "prompt_format=QCM-E"])


def test_category_accuracy_table():
    soc = {**PROBLEM, "subject": "social science", "hint": "", "image": None, "grade": "grade9"}
    assert categories(PROBLEM) == ["NAT", "TXT", "IMG", "G1-6"] and categories(soc) == ["SOC", "NO", "G7-12"]
    recs = [
        {"correct": True, "categories": categories(PROBLEM)},
        {"correct": False, "categories": categories(soc)},
    ]
    acc = category_accuracy(recs)
    assert acc == {
        "acc_NAT": 100.0,
        "acc_SOC": 0.0,
        "acc_TXT": 100.0,
        "acc_IMG": 100.0,
        "acc_NO": 0.0,
        "acc_G1-6": 100.0,
        "acc_G7-12": 0.0,
        "acc": 50.0,
    }


def test_long_input_truncated_with_warning():
    long = {**PROBLEM, "question": " ".join(["word"] * 50)}
    tok = word_tokenizer(task_texts({"p": long}))
    feats = {"p": np.zeros(SHAPE, np.float32)}
    with pytest.warns(UserWarning, match="1 of 1 inputs longer than input_len=16 were truncated"):
        ex = make_examples({"p": long}, ["p"], feats, tok, "QCM-E", 16, 32)
    assert len(ex[0].input_ids) == 16 and ex[0].input_ids[-1] == tok.eos_token_id


# ---- ScienceQA on a local fixture, both stages through the CLI --------------------------------
def scienceqa_fixture(root: Path) -> dict:
    """problems.json + pid_splits.json + <pid>.npy features + a local tiny T5 and tokenizer."""
    subjects = ["natural science", "social science", "language science"]
    problems, rng = {}, np.random.default_rng(0)
    (root / "feats").mkdir(parents=True)
    for i in range(24):
        pid = str(100 + i)
        problems[pid] = {
            **PROBLEM,
            "question": f"Question number {i % 4}?",
            "answer": i % 2,
            "subject": subjects[i % 3],
            "hint": "" if i % 4 else "Look.",
            "image": "image.png" if i % 2 else None,
            "grade": f"grade{1 + i % 12}",
        }
        if i % 2:
            np.save(root / "feats" / f"{pid}.npy", rng.standard_normal((7, 16)).astype(np.float32))
    pids = list(problems)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(
        json.dumps({"train": pids[:16], "val": pids[16:20], "test": pids[20:]})
    )
    tok = word_tokenizer(task_texts(problems) + ["Solution : A cat has fur ."])
    tok.save_pretrained(root / "t5")
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    build_model(cfg, patch_shape=(7, 16)).save_pretrained(root / "t5")
    return problems


def test_scienceqa_two_stages_through_the_cli(tmp_path, capsys):
    from smile.cli import main as smile_main

    problems = scienceqa_fixture(tmp_path / "sqa")
    run_dir = tmp_path / "run"
    common = [
        f"run_dir={run_dir}",
        f"base_model_path={tmp_path / 'sqa/t5'}",
        "data.source=scienceqa",
        f"data.root={tmp_path / 'sqa'}",
        f"data.features_dir={tmp_path / 'sqa/feats'}",
        "patch_shape=[7,16]",
        "max_steps=40",
        "batch_size=8",
        "output_len=12",
        "lr=1e-2",
        "eval_during_training=true",
    ]

    def run(*argv: str) -> None:
        assert smile_main(["zoo", "mm_cot", *argv, "--config", str(TINY), *common]) == 0

    with pytest.raises(SystemExit):  # stage 2 needs stage 1's predictions for its eval split: one line
        run("train", "--stage", "answer")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rationale file" in err and "predictions_val.json not found" in err
    run("train", "--stage", "rationale")
    run("eval", "--stage", "rationale")
    preds = read_rationales(run_dir / "rationale" / "predictions_test.json")
    assert sorted(preds) == ["120", "121", "122", "123"] and all(
        p.startswith("Solution") for p in preds.values()
    )
    # stage-1 predictions appear verbatim in the stage-2 inputs
    cfg = load_config(MMCoTConfig, TINY, common + ["stage=answer"])
    tok = method._saved_tokenizer(cfg, run_dir / "rationale")
    for ex in method.examples(cfg, "test", tok, training=False):
        assert ex.meta["source"].endswith("\n" + preds[ex.pid]) and preds[ex.pid] in ex.meta["source"]
    run("train", "--stage", "answer")
    run("eval", "--stage", "answer")
    result = json.loads((run_dir / "answer" / "eval.json").read_text())
    assert {"acc", "acc_NAT", "acc_SOC", "acc_LAN", "acc_IMG", "acc_NO", "acc_G7-12"} <= set(result["test"])
    lines = (run_dir / "answer" / "generations" / "eval_test_step_00000000.jsonl").read_text().splitlines()
    assert {json.loads(x)["id"] for x in lines} == set(preds) and all(
        "parsed" in json.loads(x) for x in lines
    )
    assert len(problems) == 24


def test_feature_extraction_with_a_local_vit(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from smile.models.mm_cot.extract import extract_features

    root = tmp_path / "sqa"
    root.mkdir()
    problems = {"1": {**PROBLEM}, "2": {**PROBLEM, "image": None}}
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1", "2"], "val": ["1"], "test": ["2"]}))
    (root / "images" / "train" / "1").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(root / "images" / "train" / "1" / "image.png")
    (root / "images" / "val" / "1").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 10, 200)).save(root / "images" / "val" / "1" / "image.png")
    vit_cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    ViTModel(vit_cfg).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    cfg = load_config(
        MMCoTConfig,
        TINY,
        [
            "data.source=scienceqa",
            f"data.root={root}",
            f"data.vit_path={root / 'vit'}",
            f"data.features_dir={root / 'feats'}",
            "patch_shape=[17,16]",
        ],
    )
    out = extract_features(cfg)
    assert out["images"] == {"train": 1, "val": 1, "test": 0}
    assert np.load(root / "feats" / "1.npy").shape == (17, 16)  # 4x4 patches + CLS
    feats = load_features(["1", "2"], problems, root / "feats", (17, 16))
    assert feats["1"].any() and not feats["2"].any()


# ---- learning against ablations ---------------------------------------------------------------
def _acc(cfg: MMCoTConfig) -> float:
    method.train(cfg)
    return method.evaluate(cfg, splits=("val",))["val"]["acc"]


@pytest.mark.parametrize("seed", [42])
def test_fusion_reads_the_image_and_gate_zero_stays_at_chance(tmp_path, seed):
    """image_vqa: the answer is the argmax of the image's first 4 channels, the text is constant.
    The fused model beats chance (25%); the same model with the gate forced to 0 stays at chance."""
    base = [
        "stage=answer",
        "prompt_format=QCM-A",
        "data.synthetic_task=image_vqa",
        "max_steps=100",
        "data.synthetic_train=512",
        f"train.seed={seed}",
    ]
    fused = _acc(load_config(MMCoTConfig, TINY, base + [f"run_dir={tmp_path}/fused"]))
    gate0 = _acc(load_config(MMCoTConfig, TINY, base + [f"run_dir={tmp_path}/gate0", "fusion_gate=0.0"]))
    print(f"image_vqa seed {seed}: fused {fused:.1f}% gate-0 {gate0:.1f}%")
    assert fused >= 60.0 and gate0 <= 37.0 and fused > gate0 + 20


@pytest.mark.parametrize("seed", [42])
def test_two_stage_rationale_beats_direct_answering(tmp_path, seed):
    """shift: answer = (image shape + text shift) mod 4. Rationale (QCM-E) then answer (QCMG-A on
    the generated rationale) against direct answering (QCM-A), same seed and answer-stage steps."""
    base = [f"train.seed={seed}"]  # the tiny config: 300 steps per run, lr 5e-3
    cot = [f"run_dir={tmp_path}/cot"]
    method.train(load_config(MMCoTConfig, TINY, base + cot + ["stage=rationale"]))
    rationale = method.evaluate(
        load_config(MMCoTConfig, TINY, base + cot + ["stage=rationale"]), splits=("val",)
    )
    two_stage = _acc(load_config(MMCoTConfig, TINY, base + cot + ["stage=answer"]))
    direct = _acc(
        load_config(
            MMCoTConfig, TINY, base + [f"run_dir={tmp_path}/direct", "stage=answer", "prompt_format=QCM-A"]
        )
    )
    print(
        f"shift seed {seed}: rationale exact {rationale['val']['rationale_exact']:.3f}, "
        f"two-stage {two_stage:.1f}%, direct {direct:.1f}%"
    )
    assert two_stage > direct + 15


# ---- MoE on a simulated 2 nodes x 2 GPUs ------------------------------------------------------
def _moe_step(topo, run_dir: str) -> dict:
    from smile.hf.moefy import moe_modules
    from smile.moe import MoEConfig

    torch.set_num_threads(1)
    cfg = load_config(
        MMCoTConfig,
        TINY,
        [
            f"run_dir={run_dir}",
            "max_steps=1",
            "batch_size=8",
            "data.synthetic_train=64",
            "train.zero_stage=2",
            "train.checkpoint.save_final=false",
        ],
    )
    cfg.moe = MoEConfig(num_experts=4, router="switch", capacity_factor=None)  # one expert per rank
    out = method.train(cfg)
    model = method.make_model(cfg, method.build_tokenizer(cfg), topo)
    return {"loss": out["loss"], "step": out["step"], "moe_layers": len(list(moe_modules(model)))}


def test_moe_ffns_train_a_step_on_2x2(tmp_path):
    ranks = run_distributed(_moe_step, 2, 2, str(tmp_path), timeout=300)
    for r in ranks:
        assert r["step"] == 1 and np.isfinite(r["loss"]) and r["moe_layers"] >= 2
