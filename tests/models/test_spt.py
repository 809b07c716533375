"""SPT invariants (spec §6) on a tiny random T5, offline; bad inputs (spec §7)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from smile.models.spt.config import SPTConfig
from smile.models.spt.model import SPTModel
from smile.models.spt.rank import rank_classify


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg).eval()


def batch(template: list[int], content: list[int]) -> dict[str, torch.Tensor]:
    ids = template + content + [1]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "prompt_token_mask": torch.tensor([[1] * len(template) + [0] * (len(content) + 1)]),
    }


def test_frozen_backbone_only_bank_gets_gradients():
    model = SPTModel(tiny_t5(), SPTConfig(bank_size=4, prompt_len=3, train_backbone=False))
    out = model(**batch([5, 6, 7], [20, 21]), labels=torch.tensor([[30, 1]]))
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"retriever.bank.prompts", "retriever.bank.keys"}


def test_retrieval_follows_the_template_not_the_example():
    model = SPTModel(tiny_t5(), SPTConfig(bank_size=8, prompt_len=2))
    model(**batch([5, 6, 7], [20, 21]), labels=torch.tensor([[30]]))
    a = model.last_retrieval.alpha
    model(**batch([5, 6, 7], [40, 41, 42, 43]), labels=torch.tensor([[30]]))
    assert torch.equal(a, model.last_retrieval.alpha)
    model(**batch([9, 10, 11], [20, 21]), labels=torch.tensor([[30]]))
    assert not torch.allclose(a, model.last_retrieval.alpha)


def test_soft_retrieval_with_one_prompt_is_plain_prompt_tuning():
    backbone = tiny_t5()
    model = SPTModel(backbone, SPTConfig(bank_size=1, prompt_len=5))
    b, labels = batch([5, 6], [20, 21, 22]), torch.tensor([[30, 31, 1]])
    ours = model(**b, labels=labels).logits
    prompt = model.retriever.bank.prompts[0].unsqueeze(0)
    embeds = torch.cat([prompt, backbone.get_input_embeddings()(b["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), b["attention_mask"]], dim=1)
    ref = backbone(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits
    assert torch.equal(ours, ref)


def test_attention_mask_length_and_padding_never_attends_across():
    model = SPTModel(tiny_t5(), SPTConfig(bank_size=4, prompt_len=3, fixed_prompt_len=2))
    short, long = batch([5, 6], [20]), batch([5, 6], [20, 21, 22, 23])
    embeds, mask = model.encoder_inputs(**long)
    assert mask.shape[1] == embeds.shape[1] == 5 + long["input_ids"].shape[1]
    padded = {k: torch.cat([v, torch.zeros(1, 3, dtype=v.dtype)], dim=1) for k, v in short.items()}
    padded["input_ids"][0, -3:] = torch.tensor([50, 60, 70])  # junk under padding
    labels = torch.tensor([[30, 1]])
    a = model(**short, labels=labels).logits
    b = model(**padded, labels=labels).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_rank_classification_picks_the_highest_summed_log_likelihood():
    from smile.models.spt.rank import choice_scores

    model = SPTModel(tiny_t5(), SPTConfig(bank_size=2, prompt_len=2))
    b = batch([5, 6], [20, 21])
    choices = [[30, 1], [31, 32, 1]]
    scores = choice_scores(model, b, choices)
    for i, c in enumerate(choices):  # by hand: teacher-forced log-likelihood summed over tokens
        with torch.no_grad():
            logits = model(**b, labels=torch.tensor([c])).logits[0].log_softmax(-1)
        assert math.isclose(
            float(scores[i]), float(sum(logits[t, tok] for t, tok in enumerate(c))), rel_tol=1e-5
        )
    assert rank_classify(model, b, [choices]) == [int(scores.argmax())]


def test_bad_inputs_raise_clear_errors():
    model = SPTModel(tiny_t5(), SPTConfig(bank_size=2, prompt_len=2))
    b = batch([5, 6], [20])
    with pytest.raises(ValueError, match="prompt_token_mask"):
        model(b["input_ids"], b["attention_mask"])
    with pytest.raises(ValueError, match="empty query"):
        model(b["input_ids"], b["attention_mask"], torch.zeros_like(b["input_ids"]))
    with pytest.raises(ValueError, match="top_k=5 > bank_size=2"):
        SPTConfig(bank_size=2, retrieval="topk", top_k=5).validate()
    with pytest.raises(ValueError, match="prompt length 2 \\+ input length 600 = 602 exceeds .* 512"):
        model.check_length(600)
    with pytest.raises(ValueError, match="at least one answer choice"):
        rank_classify(model, b, [[]])


def test_topk_retrieval_prepends_k_prompts():
    model = SPTModel(tiny_t5(), SPTConfig(bank_size=6, prompt_len=2, retrieval="topk", top_k=3))
    embeds, mask = model.encoder_inputs(**batch([5, 6], [20]))
    assert embeds.shape[1] == 6 + 4 and model.last_retrieval.indices.shape == (1, 3)


def test_synthetic_p3_and_glue_data_emit_the_template_mask(tmp_path):
    import json

    from smile.models.spt.config import DataConfig
    from smile.models.spt.data import collate, encode, load_task, word_tokenizer

    row = {"template_text": "Does {input} imply it ? yes or no", "input": "cats purr", "target": "yes",
           "choices": ["yes", "no"]}  # fmt: skip
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "train.jsonl").write_text(json.dumps(row) + "\n")
    rows = load_task("toy", DataConfig(source="p3", tasks=["toy"], data_dir=str(tmp_path)), "train")
    syn = load_task("copy", DataConfig(synthetic_train=4), "train")
    tok = word_tokenizer([s for r in rows + syn for s, _ in r["segments"]] + ["yes", "no"])
    enc = encode(rows[0], tok, 32, 4)
    words = tok.convert_ids_to_tokens(enc["input_ids"])
    assert [w for w, m in zip(words, enc["prompt_token_mask"]) if m] == [
        "Does",
        "imply",
        "it",
        "?",
        "yes",
        "or",
        "no",
    ]
    assert enc["gold"] == 0 and len(enc["choice_ids"]) == 2
    b = collate([enc, encode(syn[0], tok, 32, 4)], tok.pad_token_id)
    assert b["prompt_token_mask"].shape == b["input_ids"].shape


def test_heldout_templates_ask_for_their_skill_with_confusable_choices():
    """Each held-out (and tag) template scores its own skill against the answers of the other
    skills on the same sequence, like its training counterpart."""
    from smile.models.spt.config import DataConfig
    from smile.models.spt.data import synthetic_examples

    cfg = DataConfig()
    for task, answer in (("copy_heldout", lambda q: q), ("reverse_tag", lambda q: q[::-1])):
        for row in synthetic_examples(task, 8, cfg, 0):
            seq = row["segments"][1][0].split()
            assert row["target"] == " ".join(answer(seq))
            assert {" ".join(seq), " ".join(seq[::-1])} <= set(row["choices"])
    for row in synthetic_examples("first_heldout", 8, cfg, 0):
        seq = row["segments"][1][0].split()
        assert row["target"] == seq[0] and set(seq) <= set(row["choices"])
        assert all(len(c.split()) == 1 for c in row["choices"])


# ---------------------------------------------------------------------------------------------
# The method's effect and the MoE option (runtime jobs; 1 torch thread: 2 threads are far slower)
# ---------------------------------------------------------------------------------------------
CONFIG = "models/spt/configs/tiny_synthetic.yaml"


def spt_run(tmp: str, name: str, bank_size: int, prompt_len: int, overrides: list[str]) -> dict:
    from smile.models.spt.config import JobConfig
    from smile.models.spt.method import Experiment
    from smile.runtime import load_config

    torch.set_num_threads(1)
    job = load_config(JobConfig, CONFIG, [
        f"spt.bank_size={bank_size}", f"spt.prompt_len={prompt_len}", f"train.run_dir={tmp}/{name}",
        *overrides,
    ])  # fmt: skip
    exp = Experiment(job)
    out = exp.run(save=False)
    model = out.pop("model")
    return {"eval": exp.evaluate(model), "loss": float(out["losses"][-1]), "steps": out["steps"],
            "alpha": {t: a.tolist() for t, a in exp.alpha_by_task(model).items()}}  # fmt: skip


@pytest.mark.slow
def test_bank_beats_a_shared_prompt_of_equal_total_size(tmp_path):
    """Same seed (0), same 600 steps, same data, the backbone trained jointly: the bank (S=4
    prompts of 4, retrieved by the template) against one shared prompt of 16 (S=1: plain prompt
    tuning, equal total size). The template is the retrieval query only (not encoder input), so
    copy and reverse (same input, different output) are told apart only through retrieval; the
    shared prompt stays at chance between them. README: seeds 0-2, and the template-visible case."""
    tasks = ("copy", "reverse", "first")
    bank = spt_run(str(tmp_path), "bank", 4, 4, [])
    shared = spt_run(str(tmp_path), "shared", 1, 16, [])
    assert bank["steps"] == shared["steps"] == 600

    def accuracy(run, task):
        return run["eval"][f"train/{task}/accuracy"]

    for t in ("copy", "reverse"):  # seeds 0-2: bank >= 0.94, shared 0.42-0.63
        assert accuracy(bank, t) >= 0.9 and accuracy(bank, t) > accuracy(shared, t) + 0.2
    assert bank["loss"] < shared["loss"]
    # retrieval specialises per template: below uniform entropy on average, and copy and
    # reverse retrieve different mixtures
    entropy = sum(bank["eval"][f"train/{t}/retrieval_entropy"] for t in tasks) / len(tasks)
    assert entropy < math.log(4)
    a, b = torch.tensor(bank["alpha"]["copy"]), torch.tensor(bank["alpha"]["reverse"])
    assert float((a - b).abs().sum()) > 0.2


@pytest.mark.slow
def test_with_a_frozen_pretrained_lm_and_the_template_visible_the_bank_beats_a_shared_prompt(tmp_path):
    """The paper's input with setting B's regime: a tiny T5 pretrained on the skills behind tags
    (``pretrain``, saved with save_pretrained) is loaded frozen through ``spt.backbone_path``; only
    the prompts train. Same seed (0) and steps: the bank (S=4, L=4, retrieved per template)
    against one shared prompt of 16. Shortened here (pretraining 400 steps, tuning 300); at these
    lengths, seeds 0-2 gave `first` 0.95 / 0.83 / 0.97 (bank) vs 0.41 / 0.42 / 0.66 (shared) and a
    lower bank loss; copy/reverse stay near chance for both (README: seeds 0-4 at full length)."""
    from transformers import T5ForConditionalGeneration

    from smile.models.spt.config import JobConfig
    from smile.models.spt.method import Experiment, pretrain
    from smile.runtime import load_config

    torch.set_num_threads(1)
    pre = load_config(JobConfig, "models/spt/configs/tiny_pretrain.yaml",
                      [f"train.run_dir={tmp_path}", "train.max_steps=400"])  # fmt: skip
    path = pretrain(pre)["backbone"]

    def tune(bank_size: int, prompt_len: int) -> tuple[Experiment, dict]:
        job = load_config(JobConfig, "models/spt/configs/tiny_frozen.yaml", [
            f"spt.backbone_path={path}", f"spt.bank_size={bank_size}", f"spt.prompt_len={prompt_len}",
            f"train.run_dir={tmp_path}/tune", "train.max_steps=300", "data.synthetic_eval=64",
            "data.heldout=[copy_heldout]",
        ])  # fmt: skip
        exp = Experiment(job)
        return exp, exp.run(save=False)

    exp, bank = tune(4, 4)
    _, shared = tune(1, 16)
    assert bank["steps"] == shared["steps"] == 300
    # the held-out templates' words are in the pretrained tokenizer; the LM stays as saved
    assert exp.tokenizer.unk_token_id not in exp.eval_examples["copy_heldout"][0]["input_ids"]
    saved = T5ForConditionalGeneration.from_pretrained(path).state_dict()
    for run in (bank, shared):
        tuned = run["model"].backbone.state_dict()
        assert all(torch.equal(tuned[k], v) for k, v in saved.items())
    first = (bank["eval"]["train/first/accuracy"], shared["eval"]["train/first/accuracy"])
    assert first[0] >= 0.8 and first[0] > first[1] + 0.15, first
    loss = [sum(run["losses"][-20:]) / 20 for run in (bank, shared)]
    assert loss[0] < loss[1], loss


def moe_job(topology, tmp: str) -> dict:
    from smile.hf import moe_modules
    from smile.models.spt.config import JobConfig
    from smile.models.spt.method import Experiment
    from smile.runtime import load_config

    torch.set_num_threads(1)
    job = load_config(JobConfig, CONFIG, [
        f"train.run_dir={tmp}/moe", "train.max_steps=1", "train.micro_batch_size=8",
        "spt.bank_size=4", "spt.prompt_len=2", "spt.train_backbone=true",
        "model.moe={num_experts: 4, router: switch, capacity_factor: null}",
    ])  # fmt: skip
    exp = Experiment(job, topology)
    model = exp.build()
    result = exp.trainer(model).fit()
    return {
        "moe_layers": len(list(moe_modules(model))),
        "losses": result.losses,
        "metrics": sorted(result.train_metrics),
    }


@pytest.mark.slow
def test_moe_ffns_train_one_step_on_2_nodes_x_2_gpus(tmp_path):
    from smile.testing import run_distributed

    outs = run_distributed(moe_job, 2, 2, str(tmp_path), timeout=300)
    for out in outs:
        assert out["moe_layers"] > 0
        assert len(out["losses"]) == 1 and math.isfinite(out["losses"][0])
        # retrieval (prompt routing) and expert routing are logged apart
        assert "retrieval_entropy" in out["metrics"]
        assert any(m.startswith("moe_") for m in out["metrics"])


# ---------------------------------------------------------------------------------------------
# The full-scale configs on local fixtures in the real layouts (sizes and steps overridden)
# ---------------------------------------------------------------------------------------------
def _local_t5(root, texts: list[str]) -> str:
    """A tiny T5 and its word-level tokenizer saved like a hub checkpoint (``from_pretrained``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from smile.models.spt.data import word_tokenizer

    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    path = root / "t5-lm-adapt"
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _glue_fixture(
    root, benchmark: str, task: str, fields: tuple[str, ...], labels: tuple[str, ...]
) -> list[str]:
    """``<root>/<benchmark>/<task>/{train,validation}-00000-of-00001.parquet`` as on the hub."""
    import datasets

    words = ["red", "blue", "cat", "dog", "runs", "sleeps"]
    features = datasets.Features(
        {**{f: datasets.Value("string") for f in fields}, "label": datasets.ClassLabel(names=list(labels))}
    )
    folder = root / benchmark / task
    folder.mkdir(parents=True)
    for split, n in (("train", 16), ("validation", 8)):
        rows = {
            f: [f"{words[(i + j) % 6]} {words[(2 * i + j) % 6]}" for i in range(n)]
            for j, f in enumerate(fields)
        }
        rows["label"] = [i % len(labels) for i in range(n)]
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(folder / f"{split}-00000-of-00001.parquet")
        )
    return words + [f"{f}:" for f in fields] + list(labels) + [task]


# a few steps of a full-scale job's train section on CPU (prefix with "train." / "finetune_train.")
SHORT_RUN = [
    "max_steps=3",
    "micro_batch_size=8",
    "grad_accum_steps=1",
    "zero_stage=0",
    "eval_every=0",
    "log={every: 1, progress_bar: false, plot: false}",
    "checkpoint={save_final: false, resume: never}",
]
SMALL_MODEL = ["spt.bank_size=4", "spt.prompt_len=2"]


def test_glue2superglue_config_pretrains_the_bank_then_finetunes_from_it(tmp_path):
    """Setting B's full-scale config on GLUE / SuperGLUE parquet fixtures in the hub layout: stage
    1 trains only the bank (the local LM frozen), stage 2 starts from stage 1's bank."""
    from safetensors.torch import load_file

    from smile.models.spt.config import JobConfig
    from smile.models.spt.method import Experiment, train
    from smile.runtime import load_config

    torch.set_num_threads(1)
    data = tmp_path / "data"
    words = _glue_fixture(data, "glue", "rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"))
    cb_labels = ("entailment", "contradiction", "neutral")
    words += _glue_fixture(data, "super_glue", "cb", ("premise", "hypothesis"), cb_labels)
    job = load_config(
        JobConfig,
        "models/spt/configs/glue2superglue.yaml",
        [
            f"spt.backbone_path={_local_t5(tmp_path, words)}",
            *SMALL_MODEL,
            "data.tasks=[glue/rte]",
            f"data.data_dir={data}",
            "data.max_length=32",
            "finetune_data.tasks=[super_glue/cb]",
            f"finetune_data.data_dir={data}",
            "finetune_data.max_length=32",
            *(f"train.{o}" for o in SHORT_RUN),
            f"train.run_dir={tmp_path}/stage1",
            *(f"finetune_train.{o}" for o in SHORT_RUN),
            f"finetune_train.run_dir={tmp_path}/stage2",
        ],
    )
    out = train(job)
    assert out["stage1"]["steps"] == out["stage2"]["steps"] == 3
    assert set(out["stage2"]["eval"]) >= {
        "train/super_glue/cb/accuracy",
        "train/super_glue/cb/retrieval_entropy",
    }
    stage1_bank = load_file(out["stage1"]["bank"])
    assert not (tmp_path / "stage1" / "spt" / "model.safetensors").exists()  # the frozen LM is not saved
    # stage 2's model starts from stage 1's bank (every bank tensor loaded, none left at its init)
    stage2 = dataclasses.replace(job, spt=dataclasses.replace(job.spt, init_bank=out["stage1"]["bank"]))
    start = Experiment(stage2, data=job.finetune_data).build().bank_state_dict()
    assert start.keys() == stage1_bank.keys()
    assert all(torch.equal(start[k], stage1_bank[k]) for k in start)
    assert not torch.equal(load_file(out["stage2"]["bank"])[next(iter(start))], start[next(iter(start))])


def test_t0_multitask_config_trains_on_promptsource_jsonl_and_scores_heldout_zero_shot(tmp_path):
    """Setting A's full-scale config on local promptsource-rendered JSONL (the P3 layout)."""
    import json

    from smile.models.spt.config import JobConfig
    from smile.models.spt.method import train
    from smile.runtime import load_config

    torch.set_num_threads(1)
    templates = {
        "sentiment": "Is {input} good or bad ?",
        "topic": "{input} . Topic : animal or colour ?",
        "nli_heldout": "Does {input} follow ? yes or no",
    }
    answers = {"sentiment": ["good", "bad"], "topic": ["animal", "colour"], "nli_heldout": ["yes", "no"]}
    words: list[str] = []
    for task, template in templates.items():
        (tmp_path / "p3" / task).mkdir(parents=True)
        for split in ("train", "validation"):
            rows = [
                {
                    "template_text": template,
                    "input": f"the cat {i}",
                    "target": answers[task][i % 2],
                    "choices": answers[task],
                }
                for i in range(8)
            ]
            (tmp_path / "p3" / task / f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
        words += (
            template.replace("{input}", "").split()
            + answers[task]
            + ["the", "cat"]
            + [str(i) for i in range(8)]
        )
    job = load_config(
        JobConfig,
        "models/spt/configs/t0_multitask.yaml",
        [
            f"spt.backbone_path={_local_t5(tmp_path, words)}",
            f"data.data_dir={tmp_path / 'p3'}",
            "data.tasks=[sentiment, topic]",
            "data.heldout=[nli_heldout]",
            "data.max_target_length=4",
            "data.max_length=32",
            *SMALL_MODEL,
            *(f"train.{o}" for o in SHORT_RUN),
            f"train.run_dir={tmp_path}/run",
        ],
    )
    out = train(job)
    assert out["steps"] == 3
    assert 0.0 <= out["eval"]["heldout/nli_heldout/accuracy"] <= 1.0
    assert (tmp_path / "run" / "spt" / "model.safetensors").is_file()  # the fine-tuned LM is saved
