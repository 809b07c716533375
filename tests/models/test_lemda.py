"""LeMDA (smile.models.lemda): the method's invariants, the regression test for the official
code's dead augmenter, encoders and loaders on local fixtures, bad inputs, and (slow) a learning
experiment on wine through the Trainer and an MoE step on a simulated 2 nodes x 2 GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smile.hf import ConvertError
from smile.models.lemda import (
    FeatureAugmenter,
    LateFusionClassifier,
    LeMDA,
    LeMDAConfig,
    TabularMLP,
    consistency_loss,
    grad_reverse,
)
from smile.models.lemda.batches import WEIGHT, EvalBatches, TrainBatches
from smile.models.lemda.cli import bundled_configs, load_job_config
from smile.models.lemda.config import DataConfig, EncoderConfig, JobConfig
from smile.models.lemda.data import VALIDATION, load_split
from smile.models.lemda.featurize import Featurizer
from smile.models.lemda.job import build_model, layerwise_groups
from smile.models.lemda.metrics import make_eval_fn, quadratic_kappa, roc_auc
from smile.moe.topology import Topology
from smile.runtime import ConfigError, load_config
from smile.testing import run_distributed

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lemda"


def tabular_model(arch: str = "mlp_vae", norm: str = "layer", dropout: float = 0.1, **options) -> LeMDA:
    torch.manual_seed(0)
    encoders = {
        "a": TabularMLP(4, [], hidden=8, norm=norm, dropout=dropout),
        "b": TabularMLP(3, [5], hidden=8, norm=norm, dropout=dropout),
    }
    classifier = LateFusionClassifier(encoders, num_classes=3, fusion_hidden=[8], dropout=dropout)
    config = LeMDAConfig(arch=arch, z_dim=4, n_layer=2, n_head=2, tran_hidden=16, **options)
    return LeMDA(classifier, config)


def tabular_batch(rows: int = 6, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a": {"numerical": torch.randn(rows, 4, generator=gen)},
        "b": {
            "numerical": torch.randn(rows, 3, generator=gen),
            "categorical": torch.randint(0, 5, (rows, 1), generator=gen),
        },
        "label": torch.randint(0, 3, (rows,), generator=gen),
    }


# ---------------------------------------------------------------------------------------------
# The method's invariants.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp_vae", "trans_vae"])
def test_identity_at_init_and_decoder_last_layer_gets_gradient(arch):
    """f' == f exactly at initialisation, yet the zero-initialised last decoder layer receives a
    non-zero gradient from the first step (the official code's ReLU after it blocks that)."""
    model = tabular_model(arch).train()
    batch = tabular_batch()
    last = model.augmenter.last_layer
    assert not last.weight.any() and not last.bias.any()
    f = model.classifier.features(batch).detach()
    f_aug, mu, logvar = model.augmenter(f)
    assert torch.equal(f_aug, f)
    losses = model.training_step(batch)
    assert float(losses["aug_shift"]) == 0.0
    losses["loss"].backward()
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert last.bias.grad.abs().sum() > 0


def test_grad_reverse_is_identity_forward_and_exact_negative_scale_backward():
    x = torch.randn(5, 7, requires_grad=True)
    upstream = torch.randn(5, 7)
    y = grad_reverse(x, 1e-4)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, -1e-4 * upstream)


def test_augmenter_gets_minus_adv_scale_times_task_gradient_of_f_aug():
    """With the other augmenter losses off, G's gradient is -adv_scale x d L_task / d f' pushed
    back through G; the task network's gradient does not depend on adv_scale."""
    grads = {}
    for scale in (1e-4, 3e-4):
        model = tabular_model(dropout=0.0, reg_w=0.0, kl_w=0.0, cons_w=0.0, adv_scale=scale)
        model.augmenter.net.out.weight.data.normal_(0, 0.1)  # a non-trivial G, so every layer has a path
        model.augmenter.eval()  # no dropout; the latent sample is seeded below
        batch = tabular_batch()
        torch.manual_seed(1)
        losses = model.training_step(batch)
        losses["loss"].backward()
        grads[scale] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if scale == 1e-4:
            # The same forward by hand: the plain gradient of the task loss w.r.t. f'.
            model.zero_grad()
            f = model.classifier.features(batch)
            torch.manual_seed(1)
            f_aug, _, _ = model.augmenter(f.detach())
            leaf = f_aug.detach().requires_grad_(True)
            logits = model.classifier.task(torch.cat([f, leaf]))
            (d_task_d_aug,) = torch.autograd.grad(F.cross_entropy(logits, batch["label"].repeat(2)), leaf)
            params = [p for _, p in model.augmenter.named_parameters()]
            expected = torch.autograd.grad(
                f_aug, params, grad_outputs=-scale * d_task_d_aug, allow_unused=True
            )
            for (name, _), want in zip(model.augmenter.named_parameters(), expected):
                got = grads[scale].get(f"augmenter.{name}")
                if want is None:
                    assert got is None or not got.any()
                else:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)
    for name, g in grads[1e-4].items():
        if name.startswith("augmenter."):
            torch.testing.assert_close(grads[3e-4][name], 3 * g, rtol=1e-4, atol=1e-12)
        else:
            torch.testing.assert_close(grads[3e-4][name], g, rtol=1e-5, atol=1e-12)


def test_consistency_mask_and_direction_are_exact():
    orig = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    aug = torch.randn(3, 3, dtype=torch.float32, requires_grad=True)
    p_aug, p_orig = aug.double().softmax(-1), orig.double().softmax(-1)
    kl_rows = (p_aug * (p_aug.log() - p_orig.log())).sum(-1)  # KL(p_aug || p_orig)
    assert p_orig.max(-1).values.tolist()[0] > 0.5 > p_orig.max(-1).values.tolist()[1]
    loss = consistency_loss(aug, orig, threshold=0.5)
    torch.testing.assert_close(loss.double(), kl_rows[0].detach() / 3, rtol=1e-6, atol=1e-9)
    loss.backward()
    assert orig.grad is None and aug.grad[1:].abs().sum() == 0 and aug.grad[0].abs().sum() > 0
    # All rows confident: the plain mean of the per-row KL.
    confident = torch.tensor([[5.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 3.0]])
    p_orig = confident.double().softmax(-1)
    kl_rows = (p_aug * (p_aug.log() - p_orig.log())).sum(-1)
    torch.testing.assert_close(
        consistency_loss(aug, confident, 0.5).double(), kl_rows.mean().detach(), rtol=1e-6, atol=1e-9
    )
    # max p exactly at the threshold does not count.
    assert float(consistency_loss(torch.randn(1, 2), torch.zeros(1, 2), 0.5)) == 0.0


def test_task_head_sees_2b_rows_with_tiled_labels():
    model = tabular_model().train()
    batch = tabular_batch(rows=5)
    seen = []
    model.classifier.task.head.register_forward_hook(lambda mod, inp, out: seen.append(out))
    losses = model.training_step(batch)
    task_calls = [out for out in seen if out.requires_grad and out.shape[0] == 10]
    assert len(task_calls) == 1
    expected = F.cross_entropy(task_calls[0], torch.cat([batch["label"], batch["label"]]))
    assert torch.equal(expected, losses["task"])
    baseline = tabular_model(augment=False).train()
    seen.clear()
    baseline.classifier.task.head.register_forward_hook(lambda mod, inp, out: seen.append(out))
    assert set(baseline.training_step(batch)) == {"loss", "task"} and [o.shape[0] for o in seen] == [5]


@pytest.mark.parametrize("updates_task", [False, True])
def test_consistency_updates_task_network_only_if_asked(updates_task):
    """Paper: the consistency term trains G only (h frozen); the official code also updates h."""
    model = tabular_model(cons_updates_task=updates_task, cons_threshold=0.0).train()
    model.augmenter.net.out.weight.data.normal_(0, 1.0)
    losses = model.training_step(tabular_batch(rows=16))
    assert float(losses["cons"].detach()) > 0
    task_params = list(model.classifier.task.parameters())
    grads = torch.autograd.grad(
        losses["cons"], task_params + [model.augmenter.last_layer.weight], allow_unused=True
    )
    task_moved = any(g is not None and g.abs().sum() > 0 for g in grads[:-1])
    assert task_moved == updates_task
    assert grads[-1].abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    model = tabular_model().train()
    batch = tabular_batch()
    with pytest.raises(KeyError, match="'b'"):
        model.training_step({k: v for k, v in batch.items() if k != "b"})
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        model.training_step({**batch, "a": {"numerical": torch.randn(6, 5)}})
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model.training_step({**batch, "label": torch.tensor([0, 1, 2, 3, 0, 1])})
    with pytest.raises(ValueError, match="cons_threshold"):
        tabular_model(cons_threshold=1.5)
    for arch, z_dim in (("mlp_vae", 16), ("trans_vae", 8)):
        with pytest.raises(ValueError, match="z_dim"):
            FeatureAugmenter(LeMDAConfig(arch=arch, z_dim=z_dim, n_head=2), n_modalities=2, d=8)
    bn = tabular_model(norm="batch").train()
    with pytest.raises(ValueError, match="BatchNorm"):
        bn.training_step(tabular_batch(rows=1))
    bn.training_step(tabular_batch(rows=2))  # two rows are fine
    bn.eval()
    assert bn(tabular_batch(rows=1)).shape == (1, 3)  # and inference on one row too


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    labels = rng.integers(0, 2, 40)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_quadratic_kappa_matches_sklearn_and_runs_in_eval():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    preds = np.clip(labels + rng.integers(-2, 3, 200), 0, 4)
    want = cohen_kappa_score(labels, preds, weights="quadratic")
    assert quadratic_kappa(preds, labels, 5) == pytest.approx(want)
    assert quadratic_kappa(labels, labels, 5) == pytest.approx(1.0)
    assert quadratic_kappa(np.full(4, 3), np.array([0, 1, 0, 1]), 5) < 0.3  # off by 2-3 grades
    with pytest.raises(ValueError, match="two distinct labels"):
        quadratic_kappa(preds[:3], np.zeros(3), 5)

    table = load_split(DataConfig(source="sklearn", name="wine"), "test")
    encoders = [EncoderConfig(name="a", kind="tabular", numerical=["f0", "f1", "f2"])]
    featurizer = Featurizer(encoders, table, "label", None)
    torch.manual_seed(0)
    model = LateFusionClassifier({"a": TabularMLP(3, [], hidden=8)}, num_classes=3).eval()
    ctx = type("Ctx", (), {"device": torch.device("cpu")})()
    batch = featurizer(table.take(list(range(len(table)))))
    with torch.no_grad():
        got = make_eval_fn("quadratic_kappa")(model, EvalBatches(table, featurizer, 16, 0, 1), ctx)
        preds = model(batch).argmax(-1).numpy()
    assert got["quadratic_kappa"] == pytest.approx(quadratic_kappa(preds, batch["label"].numpy(), 3))


def test_noise_ablation_is_gaussian_noise_in_the_augmenters_place():
    """``noise_std`` (with augment=false): h sees [f; f.detach() + noise_std * std(f) * eps] with
    tiled labels, exactly LeMDA's task loss with G replaced by fixed Gaussian noise."""
    model = tabular_model(augment=False, noise_std=0.5, dropout=0.0).train()
    assert model.augmenter is None
    batch = tabular_batch(rows=64)
    seen = []
    model.classifier.task.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    torch.manual_seed(3)
    losses = model.training_step(batch)
    (rows,) = seen
    f, f_noise = rows[:64], rows[64:]
    ratio = (f_noise - f).std(dim=0) / f.std(dim=0, correction=0)
    assert rows.shape[0] == 128 and 0.35 < float(ratio.mean().detach()) < 0.65
    torch.manual_seed(3)
    f_ref = model.classifier.features(batch).detach()
    want = f_ref + 0.5 * f_ref.std(dim=0, correction=0, keepdim=True) * torch.randn_like(f_ref)
    torch.testing.assert_close(f_noise, want)
    torch.testing.assert_close(
        losses["task"], F.cross_entropy(model.classifier.task(rows), batch["label"].repeat(2))
    )
    # The encoders learn from the clean rows only, as under LeMDA (G is fed f.detach()).
    noisy_only = F.cross_entropy(model.classifier.task(rows[64:]), batch["label"])
    encoder = next(model.classifier.encoders.parameters())
    assert not torch.autograd.grad(noisy_only, encoder)[0].any()
    with pytest.raises(ConfigError, match="noise_std"):
        LeMDAConfig(noise_std=0.5).validate()


# ---------------------------------------------------------------------------------------------
# Encoders, data and configs on local fixtures.
# ---------------------------------------------------------------------------------------------
def pets_config(*overrides: str) -> JobConfig:
    paths = [
        f"data.name={FIXTURES / 'pets'}",
        f"model.encoders.text.tokenizer={FIXTURES / 'tokenizer'}",
    ]
    return load_job_config(str(FIXTURES / "pets.yaml"), paths + list(overrides))


def test_text_image_tabular_encoders_on_csv_fixture():
    cfg = pets_config()
    train = load_split(cfg.data, "train")
    assert len(train) == 24 and train.column("Fee").count(None) > 0
    featurizer = Featurizer(cfg.model.encoders, train, cfg.data.label, FIXTURES / "pets")
    assert featurizer.classes == [0, 1, 2] and featurizer.cardinalities("tabular") == [3, 5]
    batch = featurizer(train.take([0, 1, 2, 3]))
    assert batch["image"]["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["text"]["input_ids"].shape[0] == 4 and batch["text"]["input_ids"].shape[1] <= 16
    assert batch["tabular"]["numerical"].shape == (4, 2) and batch["tabular"]["categorical"].shape == (4, 2)
    assert torch.isfinite(batch["tabular"]["numerical"]).all()  # missing Fee -> the train mean
    unseen = featurizer({**train.take([0]), "Breed": ["poodle"]})
    assert int(unseen["tabular"]["categorical"][0, 1]) == 0

    torch.manual_seed(0)
    model = build_model(cfg, featurizer, Topology(1, 1)).train()
    assert model.classifier.d == 16 and model.augmenter.in_features == 48
    losses = model.training_step(batch)
    losses["loss"].backward()
    for name in ("text", "image", "tabular"):
        grads = [p.grad for p in model.classifier.encoders[name].parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    assert model.eval()(batch).shape == (4, 3)

    groups = {round(g.lr_scale, 6): g.params for g in layerwise_groups(model, 0.8)}
    prefix = "classifier.encoders.text.model."
    assert f"{prefix}encoder.layer.1.attention.self.query.weight" in groups[0.8]
    assert f"{prefix}encoder.layer.0.attention.self.query.weight" in groups[0.64]
    assert f"{prefix}embeddings.word_embeddings.weight" in groups[0.512]
    grouped = {n for names in groups.values() for n in names}
    assert not any(n.startswith(("classifier.task.", "classifier.adapters.", "augmenter.")) for n in grouped)

    with pytest.raises(ValueError, match="not a train-split class"):
        featurizer.encode_labels(["7"])
    with pytest.raises(KeyError, match="no column 'Nope'"):
        Featurizer(
            [EncoderConfig(name="t", kind="tabular", numerical=["Nope"])], train, "AdoptionSpeed", None
        )


def test_hf_jsonl_and_wine_loaders(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["no", "yes"]),
        }
    )
    data = {
        "image": images,
        "caption": ["a dog", "a cat", "calm dog", "shy cat", "old dog", "young cat"],
        "label": [0, 1, 0, 1, 0, 1],
    }
    dataset = datasets.Dataset.from_dict(data, features=features)
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(
        str(tmp_path / "hf")
    )
    data_cfg = DataConfig(source="hf", name=str(tmp_path / "hf"))
    train = load_split(data_cfg, "train")
    encoders = [
        EncoderConfig(
            name="image", kind="image", columns=["image"], hf_config={"model_type": "vit", "image_size": 8}
        ),
        EncoderConfig(
            name="text",
            kind="text",
            columns=["caption"],
            tokenizer=str(FIXTURES / "tokenizer"),
            hf_config={"model_type": "bert"},
        ),
    ]
    featurizer = Featurizer(encoders, train, "label", None)
    batch = featurizer(train.take([0, 3]))
    assert batch["image"]["pixel_values"].shape == (2, 3, 8, 8) and batch["label"].tolist() == [0, 1]
    with pytest.raises(KeyError, match="no split 'dev'"):
        load_split(data_cfg, "dev")

    memes = tmp_path / "memes"
    memes.mkdir()
    rows = [{"id": 1, "img": "img/1.png", "label": 0, "text": "hi"}, {"id": 2, "img": "i/2.png", "label": 1}]
    (memes / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = load_split(DataConfig(source="jsonl", name=str(memes)), "train")
    assert table.columns == ["id", "img", "label", "text"] and table.column("text") == ["hi", None]

    wine = DataConfig(source="sklearn", name="wine", noise_std=0.5, test_fraction=0.3)
    train, test = load_split(wine, "train"), load_split(wine, "test")
    assert len(train) + len(test) == 178 and len(test) == 54
    clean = load_split(DataConfig(source="sklearn", name="wine", test_fraction=0.3), "train")
    assert clean.column("label") == train.column("label") and clean.column("f0") != train.column("f0")

    digits = DataConfig(source="sklearn", name="digits", test_fraction=0.5, val_fraction=0.15, train_rows=50)
    splits = {name: load_split(digits, name) for name in ("train", VALIDATION, "test")}
    assert [len(t) for t in splits.values()] == [50, 270, 899] and len(splits["train"].columns) == 65
    assert sorted(splits["train"].column("label")) == sorted(list(range(10)) * 5)  # stratified
    shifted = {name: load_split(DataConfig(**{**vars(digits), "shift_std": 1.0}), name) for name in splits}
    assert shifted["train"].column("f20") == splits["train"].column("f20")
    assert shifted["test"].column("f20") != splits["test"].column("f20")
    noisy = {name: load_split(DataConfig(**{**vars(digits), "label_noise": 0.3}), name) for name in splits}
    flipped = np.array(noisy["train"].column("label")) != np.array(splits["train"].column("label"))
    assert flipped.sum() == 15 and noisy["train"].column("f20") == splits["train"].column("f20")
    assert noisy["test"].column("label") == splits["test"].column("label")
    with pytest.raises(KeyError, match="validation"):
        load_split(wine, VALIDATION)  # only with val_fraction > 0


def test_batches_cover_every_row_once_across_ranks():
    table = load_split(DataConfig(source="sklearn", name="wine"), "test")
    encoders = [EncoderConfig(name="a", kind="tabular", numerical=["f0"])]
    featurizer = Featurizer(encoders, table, "label", None)
    weights = []
    for rank in range(3):
        batches = list(EvalBatches(table, featurizer, 10, rank, 3))
        assert len(batches) == len(EvalBatches(table, featurizer, 10, 0, 3))
        weights.append(torch.cat([b[WEIGHT] for b in batches]))
    assert sum(float(w.sum()) for w in weights) == len(table)
    train = TrainBatches(table, featurizer, 8, 1, 2, seed=0)
    first = [b["label"] for b in train]
    train.set_epoch(1)
    assert len(first) == len(table) // 16 and not all(
        torch.equal(a, b["label"]) for a, b in zip(first, train)
    )


def test_configs_load_and_bad_configs_name_the_field():
    for name in bundled_configs():
        cfg = load_job_config(name, [])
        assert cfg.model.encoders, name
    with pytest.raises(ConfigError, match=r"lemda\.cons_threshold"):
        load_job_config("wine_tiny", ["lemda.cons_threshold=2"])
    with pytest.raises(ConfigError, match=r"train\.optimizers is derived"):
        load_job_config("wine_tiny", ["train.optimizers=[{name: x}]"])
    with pytest.raises(ConfigError, match="a tabular MLP has no FFN"):
        load_job_config("wine_tiny", ["model.encoders.a.moe=true", "model.moe={num_experts: 2}"])
    with pytest.raises(ConfigError, match="model.moe is set but no encoder"):
        load_job_config("wine_tiny", ["model.moe={num_experts: 2}"])
    with pytest.raises(ConfigError, match=r"arch='gru' is not allowed"):
        load_job_config("wine_tiny", ["lemda.arch=gru"])
    bert_moe = pets_config("model.encoders.text.moe=true", "model.moe={num_experts: 2, every: 1}")
    train = load_split(bert_moe.data, "train")
    featurizer = Featurizer(bert_moe.model.encoders, train, "AdoptionSpeed", None)
    with pytest.raises(ConvertError, match="model_type 'bert' is not supported"):
        build_model(bert_moe, featurizer, Topology(1, 1))
    with pytest.raises(ConfigError, match="model.encoders must list at least one encoder"):
        load_config(JobConfig, None, [])
    with pytest.raises(ConfigError, match=r"data\.label_noise must be in"):
        load_job_config("digits_fewshot", ["data.label_noise=1.5"])
    frozen = load_job_config("wine_tiny", ["lemda.freeze_encoders=true"])
    table = load_split(frozen.data, "train")
    model = build_model(frozen, Featurizer(frozen.model.encoders, table, "label", None), Topology(1, 1))
    for name, param in model.named_parameters():  # h and G train, the encoders and adapters do not
        assert param.requires_grad == name.startswith(("classifier.task.", "augmenter.")), name


# ---------------------------------------------------------------------------------------------
# Through the runtime (slow): learning on wine; an MoE text backbone on 2 nodes x 2 GPUs.
# ---------------------------------------------------------------------------------------------
# The Gaussian-noise ablation's scale, chosen on the validation split by the README's command
# (python -m smile.models.lemda.ablation --config digits_fewshot ...), not on the test split.
DIGITS_NOISE_STD = 0.25
DIGITS_SEEDS = (0, 1)


def learning_job(topology, run_root: str) -> dict:
    """Wine through both CLI actions (LeMDA and no augmentation), then the few-row digits
    setting: LeMDA, no augmentation and Gaussian noise on f, same seeds and steps."""
    import argparse

    from smile.models.lemda import ablation, cli, job

    out = {}
    for variant, extra in (("lemda", []), ("baseline", ["lemda.augment=false"])):
        run_dir = f"{run_root}/{variant}"
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        cli.main(parser.parse_args(["train", "--config", "wine_tiny", f"train.run_dir={run_dir}", *extra]))
        out[variant] = json.loads(Path(run_dir, "lemda_result.json").read_text())
    cfg = load_job_config("wine_tiny", [f"train.run_dir={run_root}/lemda"])
    out["reevaluated"] = job.evaluate(cfg)
    built = job.build_job(cfg)
    from smile.runtime import load_weights

    load_weights(built.model, out["lemda"]["checkpoint"])
    batch = built.featurizer(built.eval_table.take(list(range(len(built.eval_table)))))
    with torch.no_grad():
        built.model.eval()
        f = built.model.classifier.features(batch)
        out["shift"] = float((built.model.augmenter(f)[0] - f).norm(dim=-1).mean())
        out["last_layer_norm"] = float(built.model.augmenter.last_layer.weight.norm())
    variants = {
        "lemda": [],
        "none": ["lemda.augment=false"],
        "noise": ["lemda.augment=false", f"lemda.noise_std={DIGITS_NOISE_STD}"],
    }
    out["digits"] = {
        name: [
            ablation.run("digits_fewshot", [f"train.run_dir={run_root}/digits", *extra], s)["test"]
            for s in DIGITS_SEEDS
        ]
        for name, extra in variants.items()
    }
    return out


@pytest.mark.slow
def test_lemda_learns_against_no_augmentation_and_gaussian_noise(tmp_path):
    out = run_distributed(learning_job, 1, 1, str(tmp_path), timeout=600)[0]
    lemda, baseline = out["lemda"]["eval"]["accuracy"], out["baseline"]["eval"]["accuracy"]
    print(f"\nwine (noise 0.5 std, 200 steps, seed 0): LeMDA {lemda:.4f}, no augmentation {baseline:.4f}")
    assert lemda >= 0.85
    assert baseline >= 0.5  # reported beside LeMDA; the same model, steps and seed without G
    assert out["lemda"]["steps"] == out["baseline"]["steps"] == 200
    assert out["reevaluated"]["accuracy"] == pytest.approx(lemda)
    assert out["shift"] > 0 and out["last_layer_norm"] > 0  # f' != f after training
    assert out["lemda"]["train"]["aug_shift"] > 0
    digits = {name: float(np.mean(accs)) for name, accs in out["digits"].items()}
    print(f"digits, 50 train rows, seeds {DIGITS_SEEDS}, test accuracy: {out['digits']}")
    # What is robust over the README's seeds: all three learn (chance 0.1), and LeMDA is within
    # 0.03 of both ablations. LeMDA beating them was NOT observed (README, "Effect of the augmenter").
    assert min(min(accs) for accs in out["digits"].values()) >= 0.7
    assert digits["lemda"] >= digits["none"] - 0.03 and digits["lemda"] >= digits["noise"] - 0.03


def moe_job(topology, run_dir: str, overrides: list[str]) -> dict:
    from smile.hf import moe_modules
    from smile.models.lemda import job
    from smile.moe.experts import is_expert_parameter

    cfg = load_job_config(str(FIXTURES / "pets.yaml"), overrides + [f"train.run_dir={run_dir}"])
    built = job.build_job(cfg)
    model = built.model
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if is_expert_parameter(p)}
    result = built.trainer().fit()
    head = model.classifier.task.head.weight.detach()
    return {
        "moe_layers": len(list(moe_modules(model))),
        "augmenter_experts": [n for n in experts if n.startswith("augmenter.")],
        "experts_moved": all(
            not torch.equal(p, experts[n]) for n, p in model.named_parameters() if n in experts
        ),
        "expert0": next(iter(experts.values())).flatten()[:4].tolist(),
        "head": head.flatten()[:8].tolist(),
        "losses": result.losses,
        "moe_aux": result.train_metrics.get("moe_aux"),
        "eval": result.eval_metrics,
        "micro_batch": built.train_config.micro_batch_size,
    }


@pytest.mark.slow
def test_moe_text_backbone_trains_on_2_nodes_x_2_gpus(tmp_path):
    overrides = [
        f"data.name={FIXTURES / 'pets'}",
        f"model.encoders.text.tokenizer={FIXTURES / 'tokenizer'}",
        "model.encoders.text.hf_config="
        "{model_type: gpt2, vocab_size: 32, n_embd: 16, n_layer: 2, n_head: 2, n_positions: 64,"
        " bos_token_id: 0, eos_token_id: 0}",
        "model.encoders.text.pooling=mean",
        "model.encoders.text.moe=true",
        "model.moe={num_experts: 4, router: bilevel, every: 1, capacity_factor: null}",
        "train.zero_stage=2",
        "lemda.max_steps=2",
    ]
    outs = run_distributed(moe_job, 2, 2, str(tmp_path), overrides, timeout=600)
    for out in outs:
        assert out["moe_layers"] == 2 and out["augmenter_experts"] == [] and out["micro_batch"] == 2
        assert out["experts_moved"] and all(np.isfinite(out["losses"])) and out["moe_aux"] > 0
        assert out["head"] == outs[0]["head"] and out["eval"] == outs[0]["eval"]
    assert outs[0]["expert0"] != outs[1]["expert0"]  # each expert-parallel rank holds its own experts
