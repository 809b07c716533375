"""Masked-Diffuse LM (smile.models.masked_diffuse_lm): the spec's invariants (schedule, scorer,
loss), bad inputs, the real-data loaders on fixtures written here in the official formats, the
synthetic grammar's lexicon and recogniser, and (slow) the learning experiment against the
uniform-noise ablation with guided generation (content, POS, syntax span), the real-data path end
to end, and an MoE step on a simulated 2 nodes x 2 GPUs. No network."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import socket
from pathlib import Path

import pytest
import torch

from smile.models.masked_diffuse_lm import (
    ImportanceScorer,
    MaskedDiffuseLM,
    MDLMConfig,
    SoftMaskSchedule,
    Vocab,
    buckets,
    importance,
    masked_ce,
)
from smile.models.masked_diffuse_lm.data import grammar_corpus, load_e2e, load_roc
from smile.models.masked_diffuse_lm.schedule import ALPHA_MIN, base_alpha_bar
from smile.models.registry import get, resolve_config
from smile.runtime import ConfigError, load_config
from smile.testing import run_distributed

TINY = "grammar_tiny"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach the network: hub offline, non-loopback connects refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else ""
        if isinstance(address, tuple) and host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
            raise OSError(f"network access in a test: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


# ---------------------------------------------------------------------------------------------
# Schedule invariants (T=20, 4 buckets).
# ---------------------------------------------------------------------------------------------
def test_schedule_clean_at_0_noised_at_T_ordered_by_importance_and_monotone():
    sched = SoftMaskSchedule(20, 4)
    levels = torch.tensor([[sched.noise_level(t, b) for b in range(4)] for t in range(21)])
    assert torch.all(levels[0] == 1.0)  # t = 0: every token clean
    assert torch.allclose(levels[20], torch.full((4,), ALPHA_MIN))  # t = T: every token fully noised
    assert torch.all(levels[:, :-1] <= levels[:, 1:])  # more important bucket never less noised
    assert torch.all(levels[1:] <= levels[:-1])  # non-increasing in t
    # bucket 0 is noised during steps 1-5 only, bucket 3 during 16-20 only
    assert levels[5, 0] == ALPHA_MIN and levels[5, 1] == 1.0 and levels[15, 3] == 1.0 and levels[16, 3] < 1
    # one bucket is Diffusion-LM's uniform sqrt schedule over all T steps
    uniform = SoftMaskSchedule(20, 1)
    for t in range(1, 20):
        assert uniform.noise_level(t, 0) == pytest.approx(1 - math.sqrt(t / 20 + 1e-4), abs=1e-6)


@pytest.mark.parametrize("n_buckets", [0, 21])
def test_n_buckets_outside_1_to_T_is_an_error(n_buckets):
    with pytest.raises(ValueError, match=rf"n_buckets={n_buckets} must be in \[1, T=20\]"):
        SoftMaskSchedule(20, n_buckets)
    with pytest.raises(ConfigError, match=rf"n_buckets={n_buckets} must be in \[1, T=20\]"):
        load_config(MDLMConfig, resolve_config("masked_diffuse_lm", TINY), [f"n_buckets={n_buckets}"])


def test_base_schedule_is_monotone_from_clean_to_noised():
    tau = torch.linspace(0, 1, 101)
    values = base_alpha_bar(tau)
    assert values[0] == 1.0 and values[-1] == ALPHA_MIN and torch.all(values[1:] <= values[:-1])


# ---------------------------------------------------------------------------------------------
# Importance scorer.
# ---------------------------------------------------------------------------------------------
CORPUS = [[1, 2, 3], [1, 4, 5, 5], [1, 2, 6], [1, 7]]  # id 1 ("the") is in every sentence


def test_scorer_idf_zero_for_ubiquitous_words_deterministic_equivariant_and_serialisable(tmp_path):
    scorer = ImportanceScorer().fit(CORPUS, vocab_size=9)
    assert scorer.idf[1] == 0.0
    assert scorer.idf[7] == pytest.approx(math.log(4))  # in one sentence of four
    assert scorer.idf[8] == pytest.approx(math.log(4))  # unseen: df counted as 1
    sentence = [1, 4, 5, 5, 2]
    scores = scorer.score(sentence)
    assert torch.equal(scores, scorer.score(sentence))
    perm = [3, 0, 4, 2, 1]
    assert torch.allclose(scorer.score([sentence[i] for i in perm]), scores[perm])
    assert scores[0] < scores[1]  # "the" is the least important here
    scorer.save(tmp_path / "importance.json")
    assert torch.equal(ImportanceScorer.load(tmp_path / "importance.json").score(sentence), scores)


def test_scorer_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="call fit"):
        ImportanceScorer().score([1, 2])


def test_buckets_put_the_most_important_tokens_first_in_equal_groups():
    scorer = ImportanceScorer().fit(CORPUS, vocab_size=9)
    ids = torch.tensor([[4, 1, 7, 2, 0, 0], [1, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    scores = importance(ids, mask, scorer.idf, scorer.entropy)
    b = buckets(scores, mask, 4)
    assert b[0, 1] == 3  # "the": last bucket (noised last)
    assert sorted(b[0, :4].tolist()) == [0, 1, 2, 3]
    assert b[0, scores[0].argmax()] == 0
    assert b[1, 0] > b[1, 1]  # in a 2-token sentence, buckets 0 and 2
    assert torch.all(b[mask == 0] == 3)


# ---------------------------------------------------------------------------------------------
# Loss.
# ---------------------------------------------------------------------------------------------
def _tiny_model(n_buckets: int = 4, vocab: int = 12, objective: str = "paper"):
    from smile.models.masked_diffuse_lm.denoiser import Denoiser, bert_config
    from smile.models.masked_diffuse_lm.diffusion import MaskedDiffuseLM

    torch.manual_seed(0)
    denoiser = Denoiser(bert_config(32, 2, 2, 64, 0.0, 8), 16, vocab + (objective == "paper"))
    model = MaskedDiffuseLM(denoiser, vocab, 16, 20, n_buckets, 8, objective=objective)
    scorer = ImportanceScorer().fit(CORPUS, vocab_size=vocab)
    model.set_statistics(scorer.idf, scorer.entropy, [3, 4, 3, 2])
    return model.eval()


def test_loss_ignores_padding_and_is_zero_for_the_one_hot_truth():
    ids = torch.tensor([[2, 3, 4, 0, 0], [5, 6, 0, 0, 0]])
    mask = (ids != 0).long()
    logits = torch.randn(2, 5, 12)
    changed = logits.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), 12) * 50
    assert masked_ce(changed, ids, mask) == masked_ce(logits, ids, mask)
    assert masked_ce(100.0 * torch.nn.functional.one_hot(ids, 12).float(), ids, mask) < 1e-6
    # The whole training loss: other words in the padded slots change nothing.
    model = _tiny_model()
    other = ids.clone()
    other[mask == 0] = 7
    losses = []
    for batch_ids in (ids, other):
        torch.manual_seed(3)
        losses.append(model.training_loss({"input_ids": batch_ids, "attention_mask": mask})[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_paper_objective_gamma_masked_sentence_and_reduction_to_the_single_ce():
    from smile.models.masked_diffuse_lm.diffusion import paper_ce

    ids = torch.tensor([[4, 1, 7, 2, 0, 0], [1, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    model = _tiny_model()  # T=20, 4 buckets, [MASK] = id 12
    bucket = model.buckets(ids, mask)
    real = mask.bool()

    def d_hat(t_prev: int, m: MaskedDiffuseLM = model, b: torch.Tensor = bucket) -> torch.Tensor:
        return m.masked_sentence(ids, torch.full((2,), t_prev), b, mask)

    assert torch.equal(d_hat(0), ids)  # t = 1: nothing is masked at t - 1 = 0, d_hat = d
    # "masked at t-1" = the bucket's band has started (bands 1-5, 6-10, 11-15, 16-20 at T=20)
    for t_prev in range(20):
        started = torch.tensor([(b * 20) // 4 < t_prev for b in range(4)])[bucket]
        assert torch.equal(d_hat(t_prev) == 12, started & real)
    # the most important bucket is masked first: at t-1 = 1 exactly bucket 0's words are [MASK]
    assert torch.equal(d_hat(1) == 12, (bucket == 0) & real)
    assert torch.all(d_hat(19)[real] == 12) and torch.all(d_hat(19)[~real] == 0)  # padding kept
    uniform = _tiny_model(n_buckets=1)  # one bucket: every word is [MASK] from t = 2 to T
    b1 = uniform.buckets(ids, mask)
    for t_prev in (1, 19):
        assert torch.all(d_hat(t_prev, uniform, b1)[real] == 12)
    # the training loss is gamma_t CE(d) + CE(d_hat) with gamma_t = (T - t) / T, t ~ U{1..T}
    batch = {"input_ids": ids, "attention_mask": mask}
    torch.manual_seed(5)
    loss, metrics = model.training_loss(batch)
    torch.manual_seed(5)
    t = torch.randint(1, 21, (2,))
    logits = model.denoiser(model.q_sample(model.embeddings()[ids], t, bucket), t, mask)
    expected = paper_ce(logits, ids, model.masked_sentence(ids, t - 1, bucket, mask), (20 - t) / 20, mask)
    assert torch.allclose(loss, expected) and torch.allclose(
        metrics["ce"], masked_ce(logits[..., :12], ids, mask)
    )
    # By construction: without the d_hat term and with gamma = 1 it is the single CE
    logits = torch.randn(2, 6, 13)
    zero, one = torch.zeros(2), torch.ones(2)
    assert torch.allclose(paper_ce(logits, ids, ids, zero, mask), masked_ce(logits, ids, mask))
    assert torch.allclose(paper_ce(logits, ids, ids, one, mask), 2 * masked_ce(logits, ids, mask))
    changed = logits.clone()  # padding is ignored by both terms
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), 13) * 50
    masked_ids = d_hat(7)
    assert paper_ce(changed, ids, masked_ids, one, mask) == paper_ce(logits, ids, masked_ids, one, mask)
    # objective=ce is the single CE; a head without the [MASK] class is refused for paper
    ce_model = _tiny_model(objective="ce")
    torch.manual_seed(5)
    ce_loss, ce_metrics = ce_model.training_loss(batch)
    assert torch.equal(ce_loss, ce_metrics["ce"])
    with pytest.raises(ValueError, match=r"objective=paper needs a denoiser head of 13 classes"):
        MaskedDiffuseLM(ce_model.denoiser, 12, 16, 20, 4, 8, objective="paper")


def test_sampling_never_emits_mask_and_mbr_picks_the_consensus_sample():
    from smile.models.masked_diffuse_lm.diffusion import mbr_select

    model = _tiny_model()
    with torch.no_grad():
        model.denoiser.head.bias[12] = 1e4  # the denoiser wants [MASK] everywhere
    torch.manual_seed(0)
    ids = model.sample(4, lengths=torch.tensor([2, 3, 5, 8]), steps=5, x0_mode="expected")
    assert ids.max() < 12 and torch.all((ids > 0) == (torch.arange(8) < torch.tensor([2, 3, 5, 8])[:, None]))
    # MBR by token-level disagreement: the candidate closest to the others wins (hand-built)
    group = torch.tensor([[5, 6, 7, 0], [4, 6, 7, 0], [4, 6, 8, 0], [4, 9, 7, 0], [9, 9, 9, 0]])
    # risks (differing positions, summed over the others): 7, 5, 7, 7, 11 -> candidate 1
    picked = mbr_select(torch.stack([group, group.flip(0)]))
    assert picked.tolist() == [[4, 6, 7, 0], [4, 6, 7, 0]]
    tie = torch.tensor([[[3, 4], [5, 6]]])  # equal risk: the earlier candidate
    assert mbr_select(tie).tolist() == [[3, 4]]
    torch.manual_seed(0)
    out = model.sample(2, lengths=torch.tensor([3, 6]), steps=2, mbr_samples=3)
    assert out.shape == (2, 8) and torch.equal(out > 0, torch.arange(8) < torch.tensor([3, 6])[:, None])
    with pytest.raises(ValueError, match="mbr_samples=0 must be >= 1"):
        model.sample(2, mbr_samples=0)


def test_sampling_respects_lengths_and_ddim_skipping():
    model = _tiny_model()
    torch.manual_seed(0)
    ids = model.sample(3, lengths=torch.tensor([2, 5, 8]), steps=5, x0_mode="argmax")
    assert ids.shape == (3, 8) and torch.all(ids[0, 2:] == 0) and torch.all(ids[1, 5:] == 0)
    from smile.models.masked_diffuse_lm.diffusion import timesteps

    assert timesteps(20, 5) == [20, 16, 12, 8, 4] and timesteps(20, 50) == list(range(20, 0, -1))


# ---------------------------------------------------------------------------------------------
# Bad inputs.
# ---------------------------------------------------------------------------------------------
def test_vocab_unknown_token_and_overlong_sequences():
    strict = Vocab(["the", "cat"], unk=False)
    with pytest.raises(KeyError, match=r"token 'dog' is not in the vocabulary and no \[UNK\]"):
        strict.encode(["the", "dog"], max_len=8)
    assert Vocab(["the", "cat"]).encode(["the", "dog"], max_len=8) == [2, 1]
    with pytest.raises(ValueError, match="longer than max_len=2; raise max_len or set truncate=true"):
        strict.encode(["the", "cat", "cat"], max_len=2)
    assert strict.encode(["the", "cat", "cat"], max_len=2, truncate=True) == [1, 2]


def test_pretrained_embeddings_need_a_local_encoder(tmp_path):
    with pytest.raises(FileNotFoundError, match="use_pretrained_emb=true needs a local encoder_path"):
        load_config(MDLMConfig, resolve_config("masked_diffuse_lm", TINY), ["use_pretrained_emb=true"])
    with pytest.raises(FileNotFoundError, match="encoder_path"):
        load_config(MDLMConfig, None, ["use_pretrained_emb=true", f"encoder_path={tmp_path / 'missing'}"])


def test_pretrained_encoder_embeddings_from_a_local_tiny_bert(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    from smile.models.masked_diffuse_lm.method import build_model

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    BertModel(
        BertConfig(
            vocab_size=8, hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    ).save_pretrained(tmp_path)
    cfg = load_config(
        MDLMConfig,
        resolve_config("masked_diffuse_lm", TINY),
        ["use_pretrained_emb=true", f"encoder_path={tmp_path}"],
    )
    model = build_model(cfg, Vocab(["the", "cats"]))
    assert model.word_emb.weight.shape == (4, 12) and not model.word_emb.weight.requires_grad


def test_configs_load_and_the_method_is_registered():
    from smile.models.masked_diffuse_lm.method import train_config

    for name in ("grammar_tiny", "e2e_full", "roc_full"):
        cfg = load_config(MDLMConfig, resolve_config("masked_diffuse_lm", name))
        assert cfg.train.ema.enabled
    full = load_config(MDLMConfig, resolve_config("masked_diffuse_lm", "e2e_full"))
    # the paper's numbers (§6.3): m = 3, T = 500, 20k steps, batch 32, 1k warm-up, MBR decoding
    paper = (full.T, full.lr, full.steps, full.batch_size, full.warmup_steps, full.schedule, full.n_buckets)
    assert paper == (500, 3e-4, 20_000, 32, 1_000, "sqrt", 3)
    assert (full.objective, full.decode, full.mbr_samples) == ("paper", "mbr", 10)
    assert full.backbone.hidden_size == 768 and full.emb_dim == 16
    roc = load_config(MDLMConfig, resolve_config("masked_diffuse_lm", "roc_full"))
    assert (roc.n_buckets, roc.objective, roc.decode, roc.steps, roc.batch_size) == (
        3,
        "paper",
        "mbr",
        400_000,
        64,
    )
    assert train_config(full, world=4).optimizers[0].schedule.warmup_steps == 1_000
    assert get("masked_diffuse_lm").load_config_class() is MDLMConfig
    for bad in ("x0_mode=mean", "objective=l2", "decode=beam", "mbr_samples=0", "warmup_steps=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(MDLMConfig, None, [bad])


# ---------------------------------------------------------------------------------------------
# Real-data loaders on fixtures in the official formats.
# ---------------------------------------------------------------------------------------------
E2E_TRAIN = [
    ("name[The Eagle], food[Italian]", "The Eagle serves Italian food."),
    ("name[Aromi], eatType[pub]", "Aromi is a pub near the river."),
    ("name[Zizzi], food[French]", "Zizzi serves French food in the centre."),
    ("name[The Mill], area[riverside]", "The Mill is a riverside pub."),
]


def write_e2e(root: Path) -> Path:
    import datasets

    def split(rows):
        return datasets.Dataset.from_dict(
            {"meaning_representation": [m for m, _ in rows], "human_reference": [r for _, r in rows]}
        )

    ds = datasets.DatasetDict(
        {
            "train": split(E2E_TRAIN * 16),
            "validation": split(E2E_TRAIN[:2] * 4),
            "test": split([("name[Wok], food[Chinese]", "Wok serves Chinese food.")]),
        }
    )
    ds.save_to_disk(str(root / "e2e"))
    return root / "e2e"


def write_roc(root: Path) -> Path:
    folder = root / "roc"
    folder.mkdir()
    with (folder / "ROCStories_winter2017.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["storyid", "storytitle", "sentence1", "sentence2", "sentence3", "sentence4", "sentence5"]
        )
        for i in range(40):
            writer.writerow(
                [
                    f"id{i}",
                    "Title",
                    f"Tom had {i} cats.",
                    "He fed them.",
                    "They ate.",
                    "They slept.",
                    "Tom was happy.",
                ]
            )
    return folder


def test_e2e_and_rocstories_loaders_and_train_only_statistics(tmp_path):
    from smile.models.masked_diffuse_lm.method import prepare

    e2e = load_e2e(str(write_e2e(tmp_path)), "e2e_nlg", None)
    assert e2e["train"][0] == ["the", "eagle", "serves", "italian", "food", "."]
    assert len(e2e["valid"]) == 8 and e2e["test"] == [["wok", "serves", "chinese", "food", "."]]
    roc = load_roc(str(write_roc(tmp_path)))
    assert sum(len(v) for v in roc.values()) == 40 and roc["train"][0][-3:] == ["was", "happy", "."]
    assert all(len(s) > 10 for s in roc["train"])
    cfg = load_config(
        MDLMConfig,
        resolve_config("masked_diffuse_lm", TINY),
        ["data.source=e2e", f"data.data_dir={tmp_path / 'e2e'}", "max_len=16"],
    )
    prep = prepare(cfg)
    # "wok" only occurs in the test split: it is [UNK] and the statistics never saw it
    assert "wok" not in prep.vocab.index
    n_train = len(prep.rows["train"])
    serves = prep.vocab.index["serves"]
    assert prep.scorer.idf[serves] == pytest.approx(math.log(n_train / 32))
    with pytest.raises(FileNotFoundError, match="data.data_dir: no E2E dataset folder"):
        load_e2e(str(tmp_path / "nope"), "e2e_nlg", None)
    with pytest.raises(FileNotFoundError, match="data.data_dir: no ROCStories folder"):
        load_roc(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.csv").write_text("storyid,text\n1,hello\n")
    with pytest.raises(KeyError, match="missing ROCStories columns"):
        load_roc(str(tmp_path / "bad"))


def test_grammar_corpus_is_seeded_and_in_grammar():
    from smile.models.masked_diffuse_lm.data import Grammar, bigram_rate

    a, b = grammar_corpus(200, 0), grammar_corpus(200, 0)
    assert a == b and len(a["train"]) == 160
    assert bigram_rate(a["train"], Grammar().bigrams()) == 1.0
    assert len({w for s in a["train"] for w in s}) == 20


# ---------------------------------------------------------------------------------------------
# POS / syntax-span control: the grammar's lexicon and recogniser, targets, the real-data path.
# ---------------------------------------------------------------------------------------------
def test_grammar_lexicon_and_recogniser_on_hand_built_sentences():
    from smile.models.masked_diffuse_lm.data import Grammar, Parse, grammar_treebank

    g = Grammar()
    assert g.tag(["the", "big", "dog", "eats", "a", "bird", "[UNK]"]) == [
        "DET", "ADJ", "NOUN", "VERB", "DET", "NOUN", "X",
    ]  # fmt: skip
    assert g.parse(["the", "cat", "eats"]) == Parse(
        ("DET", "NOUN", "VERB"), frozenset({(0, 2, "S"), (0, 1, "NP"), (2, 2, "VP")})
    )
    assert g.parse("a red dog sees the old bird".split()).spans == {
        (0, 6, "S"), (0, 2, "NP"), (3, 6, "VP"), (4, 6, "NP"),
    }  # fmt: skip
    assert g.parse("the ship hits a train".split()).spans == {
        (0, 4, "S"), (0, 1, "NP"), (2, 4, "VP"), (3, 4, "NP"),
    }  # fmt: skip
    for bad in (
        "the cat moves",  # a topic-1 verb after a topic-0 noun
        "the cat eats a car",  # cross-topic object (every bigram of it is in grammar)
        "cat the eats",
        "the big eats",
        "the cat eats a",
        "the cat eats a dog bird",
        "",
    ):
        assert g.parse(bad.split()) is None and g.parses(bad.split()) == [], bad
    # Ambiguous words: the lexicon takes the first part of speech in DET, ADJ, NOUN, VERB order;
    # the recogniser still reads the word in every role the grammar allows.
    odd = Grammar(adjs=(("red", "cat"), ("blue",)))
    assert odd.lexicon()["cat"] == "ADJ" and odd.tag(["the", "cat", "eats"]) == ["DET", "ADJ", "VERB"]
    assert odd.parse(["the", "cat", "eats"]).tags == ("DET", "NOUN", "VERB")
    assert odd.parse(["the", "cat", "cat", "eats"]).tags == ("DET", "ADJ", "NOUN", "VERB")
    # The default grammar is unambiguous: every generated sentence has exactly one parse, its
    # gold derivation, and the lexicon gives the gold tags.
    for split in grammar_treebank(2000, 0).values():
        for words, gold in split:
            assert g.parses(words) == [gold] and tuple(g.tag(words)) == gold.tags


def test_control_targets_and_the_real_data_path_need_their_inputs():
    from smile.models.masked_diffuse_lm.control import parse_pos_target, parse_span_target
    from smile.models.masked_diffuse_lm.data import POS_TAGS, SPAN_LABELS
    from smile.models.masked_diffuse_lm.method import Prepared, pos_annotations, span_annotations

    assert parse_pos_target("DET NOUN VERB", POS_TAGS, 8) == ["DET", "NOUN", "VERB"]
    with pytest.raises(ConfigError, match=r"control.target='DET NN': unknown POS tag\(s\) \['NN'\]; "
                       "allowed tags: DET, ADJ, NOUN, VERB"):  # fmt: skip
        parse_pos_target("DET NN", POS_TAGS, 8)
    for bad in ("", None, "DET " * 9):
        with pytest.raises(ConfigError, match="control.target"):
            parse_pos_target(bad, POS_TAGS, 8)
    assert parse_span_target("3, 5, NP", SPAN_LABELS, 8) == (3, 5, "NP")
    for bad in ("2,4,PP", "5,3,NP", "1,8,NP", "a,b,NP", "1,2", None):
        with pytest.raises(ConfigError, match=r"control.target=.*'i,j,LABEL' .*one of S, NP, VP"):
            parse_span_target(bad, SPAN_LABELS, 8)
    import argparse

    from smile.models.masked_diffuse_lm import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["eval", "--control", "span", "--target", "3,5,NP"])
    assert (args.control, args.target) == ("span", "3,5,NP")
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--control", "tree"])
    # Real data: no tagger / parser is bundled; asking for pos / span control without one names
    # the missing field; a user-supplied callable (argument or "module:function") is used.
    words = [["the", "eagle", "serves", "food"], ["aromi", "is", "a", "pub"]]
    vocab = Vocab.build(words)
    rows = [vocab.encode(w, 8) for w in words]
    prep = Prepared(vocab, {"train": words}, {"train": rows}, ImportanceScorer(), set())
    cfg = load_config(MDLMConfig, None, ["data.source=e2e", "control.task=pos"])
    with pytest.raises(ConfigError, match=r"control.tagger: pos control on data.source=e2e needs a POS"):
        pos_annotations(cfg, prep)
    cfg.control.task = "span"
    with pytest.raises(ConfigError, match=r"control.parser: span control on data.source=e2e needs a"):
        span_annotations(cfg, prep)
    _, tags, tagset = pos_annotations(cfg, prep, tagger=lambda w: ["N" if len(x) > 3 else "F" for x in w])
    assert tags[0] == ["F", "N", "N", "N"] and tagset == ("F", "N")
    with pytest.raises(ValueError, match="control.tagger gave 1 tags for the 4 words"):
        pos_annotations(cfg, prep, tagger=lambda w: ["N"])
    cfg.control.tagger = "builtins:list"  # words -> themselves: a valid (if silly) tagger
    assert pos_annotations(cfg, prep)[2] == tuple(sorted({w for s in words for w in s}))
    cfg.control.tagger = "no_function_named"
    with pytest.raises(ConfigError, match="control.tagger='no_function_named' must be 'module:function'"):
        pos_annotations(cfg, prep)
    _, spans, labels = span_annotations(cfg, prep, parser=lambda w: [(0, len(w) - 1, "S")])
    assert spans[1] == {(0, 3, "S")} and labels == ("S",)


# ---------------------------------------------------------------------------------------------
# Slow: learning vs. the uniform-noise ablation, guided generation, real data end to end, MoE.
# ---------------------------------------------------------------------------------------------
SEEDS = (0, 1, 2)


def learning_job(topo, tmp: str) -> dict:
    from smile.models.masked_diffuse_lm import method

    out: dict = {"runs": {}}
    for seed in SEEDS:
        for arm, n_buckets in (("soft_masked", 4), ("uniform", 1)):
            cfg = load_config(
                MDLMConfig,
                resolve_config("masked_diffuse_lm", TINY),
                [f"run_dir={tmp}/{arm}_{seed}", f"n_buckets={n_buckets}", f"train.seed={seed}"],
            )
            result = method.train(cfg)
            losses = result["losses"]
            out["runs"][f"{arm}_{seed}"] = {
                "ce_first": sum(losses[:10]) / 10,
                "ce_last": sum(losses[-20:]) / 20,
                "eval_ce": result["eval"]["ce"],
                "bigram": result["eval"]["gen_bigram_rate"],
                "fluent": result["eval"]["gen_fluent_sentences"],
                "steps": len(losses),
            }
    # The method's run, reloaded from its checkpoint (EMA weights, statistics from the weights).
    cfg = load_config(MDLMConfig, resolve_config("masked_diffuse_lm", TINY), [f"run_dir={tmp}/soft_masked_0"])
    model, prep = method.load_trained(cfg)
    saved = json.loads((Path(tmp) / "soft_masked_0" / "importance.json").read_text())
    out["stats_saved"] = torch.allclose(model.idf, torch.tensor(saved["idf"])) and torch.equal(
        model.idf, prep.scorer.idf
    )
    out["control"] = method.controlled_generation(cfg, model, prep)
    cfg.control.task = "length"
    out["length"] = method.controlled_generation(cfg, model, prep)
    # POS and syntax-span control on the same model; the README's settings for these tasks
    control = dataclasses.replace(cfg.control, classifier_steps=200, classifier_lr=0.01, step_size=8.0)
    cfg.control = dataclasses.replace(control, task="pos", target="DET NOUN VERB DET ADJ NOUN")
    out["pos"] = method.controlled_generation(cfg, model, prep)
    cfg.control = dataclasses.replace(control, task="span", target="0,0,NP")
    try:
        method.controlled_generation(cfg, model, prep)
    except ConfigError as err:
        out["span_error"] = str(err)
    cfg.control.target = "3,5,NP"
    out["span"] = method.controlled_generation(cfg, model, prep)
    return out


@pytest.mark.slow
def test_soft_masked_noise_beats_uniform_noise_and_guidance_steers(tmp_path):
    out = run_distributed(learning_job, 1, 1, str(tmp_path), timeout=600)[0]
    runs = out["runs"]
    print(json.dumps(out, indent=1))
    for seed in SEEDS:
        method = runs[f"soft_masked_{seed}"]
        assert method["steps"] == 300
        assert method["ce_last"] <= 0.7 * method["ce_first"]  # 300 steps cut CE by >= 30%
        assert method["bigram"] >= 0.6  # samples from T=20: >= 60% in-grammar bigrams
    # The ablation (same seeds, steps, model, sampler), under the paper's objective: soft-masked
    # noise writes more fully grammatical sentences (seeds 0-2: 0.470 vs 0.376; 0-4: 0.464 vs
    # 0.414). The bigram-rate gap is within noise under this objective (0-4: 0.770 vs 0.765,
    # seed 3 reversed), so it is not asserted (README).
    mean = {
        arm: sum(runs[f"{arm}_{s}"]["fluent"] for s in SEEDS) / len(SEEDS)
        for arm in ("soft_masked", "uniform")
    }
    assert mean["soft_masked"] >= mean["uniform"] + 0.03
    assert out["stats_saved"]
    guided, unguided = out["control"]["guided"], out["control"]["unguided"]
    # the target word appears more often, from the same noise (paired; n=256, SE of the gap ~0.03)
    assert guided["success"] >= unguided["success"] + 0.1
    assert out["length"]["success"] == 1.0
    # POS control toward the rarer length-6 pattern (length 6 is the only length where this
    # grammar leaves the structure open): exact match and per-token accuracy rise, same noise
    pos = out["pos"]
    assert pos["target"] == ["DET", "NOUN", "VERB", "DET", "ADJ", "NOUN"]
    assert pos["guided"]["success"] >= pos["unguided"]["success"] + 0.05
    assert pos["guided"]["token_accuracy"] >= pos["unguided"]["token_accuracy"] + 0.1
    # span control: words 3..5 form an NP (only possible as that same pattern), by the parser
    span = out["span"]
    assert span["target"] == [3, 5, "NP"] and span["guided"]["success"] >= span["unguided"]["success"] + 0.04
    assert "no train sentence has this constituent; frequent ones: 0,2,NP" in out["span_error"]


def real_data_job(topo, tmp: str) -> dict:
    from smile.models.masked_diffuse_lm import cli, method
    from smile.runtime import latest_checkpoint

    root = Path(tmp)
    data_dir = write_e2e(root)
    overrides = [
        f"run_dir={root / 'run'}",
        "data.source=e2e",
        f"data.data_dir={data_dir}",
        "max_len=12",
        "steps=4",
        "batch_size=8",
        "eval_samples=4",
        "train.eval_every=2",
    ]
    cfg = load_config(MDLMConfig, resolve_config("masked_diffuse_lm", TINY), overrides)
    result = method.train(cfg)
    ckpt = latest_checkpoint(root / "run" / "checkpoints")
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    samples = sorted(p.name for p in (root / "run" / "samples").iterdir())
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["eval", *overrides, "--config", TINY, "--control", "length"])
    code = cli.main(args)
    return {
        "eval": result["eval"],
        "ema_files": [f for f in files if f.startswith("ema")],
        "samples": samples,
        "vocab": (root / "run" / "vocab.txt").is_file(),
        "cli": code,
    }


@pytest.mark.slow
def test_e2e_fixture_trains_generates_with_ema_and_evaluates_through_the_cli(tmp_path):
    out = run_distributed(real_data_job, 1, 1, str(tmp_path), timeout=300)[0]
    assert out["ema_files"] == ["ema.safetensors"] and out["vocab"] and out["cli"] == 0
    assert out["samples"] == ["step_00000002.jsonl", "step_00000004.jsonl"]
    assert "gen_bigram_rate" in out["eval"] and math.isfinite(out["eval"]["ce"])


def moe_job(topo, tmp: str) -> dict:
    from smile.models.masked_diffuse_lm import method

    overrides = [
        f"run_dir={tmp}/moe",
        "steps=1",
        "batch_size=8",
        "eval_samples=4",
        "data.grammar_sentences=200",
        "moe={num_experts: 4, router: switch, every: 1, capacity_factor: null}",
        "train.zero_stage=2",
    ]
    cfg = load_config(MDLMConfig, resolve_config("masked_diffuse_lm", TINY), overrides)
    result = method.train(cfg)
    model = result["model"]
    experts = [p for n, p in model.named_parameters() if "experts" in n]
    return {
        "losses": result["losses"],
        "moe_aux": result["train"].get("moe_aux"),
        "n_moe": sum("moe" in n for n, _ in model.named_modules() if n.endswith(".moe")),
        "expert0": experts[0].detach().flatten()[:4].tolist(),
        "head": model.denoiser.head.weight.detach().flatten()[:4].tolist(),
    }


@pytest.mark.slow
def test_moe_denoiser_trains_a_step_on_2_nodes_x_2_gpus(tmp_path):
    outs = run_distributed(moe_job, 2, 2, str(tmp_path), timeout=600)
    for out in outs:
        assert out["n_moe"] == 2 and all(math.isfinite(x) for x in out["losses"]) and out["moe_aux"] > 0
        assert out["head"] == outs[0]["head"]  # dense weights identical on every rank
    assert outs[0]["expert0"] != outs[1]["expert0"]  # each expert-parallel rank holds its own experts
