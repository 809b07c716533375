"""smile.data: corpora, tokenizers, objectives and the resumable, rank-sharded loader."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from smile.data import (
    DataConfig,
    DataConfigError,
    DocumentSource,
    ListSource,
    PretrainLoader,
    build_dataloader,
    build_tokenizer,
    compute_input_and_target_lengths,
    open_source,
    random_spans_noise_mask,
    span_corrupt,
)
from smile.data.cache import publish_text
from smile.data.embedded import embedded_documents, iter_stdlib_docstrings
from smile.data.objectives import span_counts
from smile.data.tokenizer import TextTokenizer, embedded_tokenizer_path, train_bpe

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
SMALL = {"max_docs": 120, "tokenizer_train_docs": 200, "vocab_size": 600, "seq_len": 48, "batch_size": 3}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("smile-cache"))


@pytest.fixture(scope="module")
def make_cfg(cache_dir: str):
    def make(**overrides) -> DataConfig:
        return DataConfig(**{**SMALL, "cache_dir": cache_dir, **overrides})

    return make


@pytest.fixture(scope="module")
def tokenizer(make_cfg) -> TextTokenizer:
    return build_tokenizer(make_cfg())


def take(loader: PretrainLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def token_stream(
    source: DocumentSource, tok: TextTokenizer, rank: int, size: int, epoch: int = 0
) -> np.ndarray:
    """The rank's tokens for one epoch, computed independently of the loader's cursor."""
    docs = list(source.documents(epoch, rank, size, 0))
    return np.concatenate([np.asarray([*ids, tok.eos_id]) for ids in tok.encode_batch(docs)])


def reconstruct(inputs: list[int], targets: list[int], tok: TextTokenizer) -> list[int]:
    """Put each target span back in place of its sentinel in the inputs."""
    sentinels = set(tok.sentinel_ids)
    assert inputs[-1] == tok.eos_id and targets[-1] == tok.eos_id
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs[:-1]:
        out.extend(spans.pop(t) if t in sentinels else [t])
    assert not spans, "every target span is used once"
    return out


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"objective": "mlm"}, ["objective", "'causal_lm'", "'span_corruption'"]),
        ({"source": "s3"}, ["source", "'embedded'", "'files'", "'c4'", "'hf'"]),
        ({"txt_doc": "line"}, ["txt_doc", "'paragraph'"]),
        ({"seq_len": 1}, ["seq_len", ">= 2"]),
        ({"batch_size": 0}, ["batch_size"]),
        ({"seed": -1}, ["seed"]),
        ({"max_docs": 0}, ["max_docs"]),
        ({"epochs": True}, ["epochs"]),
        ({"noise_density": 1.5}, ["noise_density"]),
        ({"mean_span_length": 0.5}, ["mean_span_length"]),
        ({"vocab_size": 300}, ["vocab_size", ">= 359"]),
        ({"source": "files"}, ["paths", "files"]),
        ({"source": "c4", "split": "test"}, ["split", "'train'", "'validation'"]),
        ({"source": "hf"}, ["hf_path"]),
        ({"shuffle": "yes"}, ["shuffle"]),
        ({"objective": "span_corruption", "n_sentinels": 0, "vocab_size": 600}, ["n_sentinels"]),
        ({"objective": "span_corruption", "seq_len": 3}, ["seq_len", ">= 4"]),
    ],
)
def test_config_errors_name_field_and_allowed_values(overrides, words):
    with pytest.raises(DataConfigError) as err:
        DataConfig(**overrides)
    for word in words:
        assert word in str(err.value)


def test_config_from_dict_rejects_unknown_keys_and_normalises_paths():
    with pytest.raises(DataConfigError, match="sorce.*fields are: source"):
        DataConfig.from_dict({"sorce": "files"})
    cfg = DataConfig.from_dict({"source": "files", "paths": str(FIXTURES / "txt")})
    assert cfg.paths == [str(FIXTURES / "txt")]
    assert DataConfig(tokenizer="/some/dir", vocab_size=10).vocab_size == 10  # only trained vocabs need room


# --- objectives -----------------------------------------------------------------------------


def test_input_and_target_lengths_match_t5():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    # 126 raw tokens: 19 noise in 6 spans -> inputs 107 + 6 + 1 = 114, targets 19 + 6 + 1 = 26
    assert compute_input_and_target_lengths(114, 0.15, 3.0) == (126, 26)
    for seq_len in [4, 5, 6, 7, *range(8, 600, 7)]:
        tokens, targets = compute_input_and_target_lengths(seq_len, 0.15, 3.0)
        assert span_counts(tokens, 0.15, 3.0).inputs_length <= seq_len
        assert span_counts(tokens + 1, 0.15, 3.0).inputs_length > seq_len
        assert span_counts(tokens, 0.15, 3.0).targets_length == targets


def test_span_corrupt_on_a_known_mask():
    tokens = np.arange(10, 20)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 1], dtype=bool)
    s0, s1, s2, eos = 100, 99, 98, 1
    inputs, targets = span_corrupt(tokens, mask, (s0, s1, s2), eos)
    assert inputs.tolist() == [10, 11, s0, 14, 15, 16, s1, 18, s2, eos]
    assert targets.tolist() == [s0, 12, 13, s1, 17, s2, 19, eos]
    with pytest.raises(ValueError, match="n_sentinels"):
        span_corrupt(tokens, mask, (s0, s1), eos)


@pytest.mark.parametrize("length", [10, 57, 568, 1137])
def test_noise_mask_has_t5_counts_and_is_seeded(length):
    counts = span_counts(length, 0.15, 3.0)
    mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(7))
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert mask.shape == (length,) and mask.sum() == counts.noise_tokens
    assert starts.sum() == counts.noise_spans
    assert not mask[0] and mask[-1]  # non-noise first, noise last, as in T5
    again = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(7))
    assert np.array_equal(mask, again)
    if length > 100:
        other = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(8))
        assert not np.array_equal(mask, other)


# --- tokenizer ------------------------------------------------------------------------------


def test_embedded_tokenizer_specials_and_round_trip(tokenizer, make_cfg):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert tokenizer.sentinel_ids == tuple(range(3, 103))
    assert tokenizer.vocab_size == make_cfg().vocab_size
    text = "Zoë's naïve café: ∑ x² — résumé 🚀"  # byte-level: nothing is unknown
    ids = tokenizer.encode_batch([text])[0]
    assert tokenizer.unk_id not in ids and tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(["<extra_id_5> a"])[0][0] == tokenizer.sentinel_ids[5]


def test_tokenizer_cache_is_reused_not_retrained(tmp_path, make_cfg):
    cfg = make_cfg(cache_dir=str(tmp_path))
    first = build_tokenizer(cfg)
    path = embedded_tokenizer_path(cfg)
    assert first.path == str(path) and path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left behind
    # Replace the cached file with a different tokenizer: a rebuild must load it, not retrain.
    other = train_bpe(["completely different text " * 50], vocab_size=400, n_sentinels=cfg.n_sentinels)
    path.write_text(other.to_str())
    reused = build_tokenizer(cfg)
    assert reused.vocab_size == other.get_vocab_size() != first.vocab_size
    assert reused.fingerprint != first.fingerprint
    # Another vocab size is another cache entry.
    assert embedded_tokenizer_path(make_cfg(cache_dir=str(tmp_path), vocab_size=700)) != path


def test_tokenizer_publish_is_atomic_and_first_writer_wins(tmp_path, make_cfg):
    target = tmp_path / "entry" / "tokenizer.json"
    assert publish_text(target, "first")
    assert not publish_text(target, "second")
    assert target.read_text() == "first" and [p.name for p in target.parent.iterdir()] == ["tokenizer.json"]

    cfg = make_cfg(cache_dir=str(tmp_path / "cache"))
    path = embedded_tokenizer_path(cfg)
    path.parent.mkdir(parents=True)
    (path.parent / ".tokenizer.json.crashed.tmp").write_text('{"trunc')  # a writer died mid-write
    results: list[TextTokenizer] = []
    threads = [threading.Thread(target=lambda: results.append(build_tokenizer(cfg))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0].fingerprint == results[1].fingerprint
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_tokenizer_from_local_file_and_transformers_dir(tmp_path, tokenizer, make_cfg):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    source = Tokenizer.from_file(tokenizer.path)
    file_path = tmp_path / "tokenizer.json"
    source.save(str(file_path))
    hf_dir = tmp_path / "hf"
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=source, **specials).save_pretrained(str(hf_dir))
    cfg = make_cfg(objective="span_corruption")
    expected = take(build_dataloader(cfg, tokenizer=tokenizer), 2)
    for local in (str(file_path), str(hf_dir)):
        loaded = build_tokenizer(make_cfg(tokenizer=local))
        assert (loaded.pad_id, loaded.eos_id, loaded.sentinel_ids) == (0, 1, tokenizer.sentinel_ids)
        assert_same_batches(take(build_dataloader(cfg, tokenizer=loaded), 2), expected)
    with pytest.raises(FileNotFoundError, match="DataConfig.tokenizer"):
        build_tokenizer(make_cfg(tokenizer=str(tmp_path / "missing")))


# --- corpora ----------------------------------------------------------------------------------


def test_embedded_corpus_is_deterministic_and_capped(tmp_path):
    docs = embedded_documents(max_docs=50, cache_dir=str(tmp_path))
    assert len(docs) == 50 and len(set(docs)) == 50
    assert all(isinstance(doc, str) and len(doc.split()) >= 3 for doc in docs)
    assert embedded_documents(max_docs=20, cache_dir=str(tmp_path)) == docs[:20]
    assert not (tmp_path / "corpora").exists()  # only the full corpus is cached


def test_stdlib_walker_skips_tests_and_broken_files(tmp_path):
    (tmp_path / "b.py").write_text(
        '"""Module b docstring here."""\ndef f():\n    """Function f does things."""\n'
    )
    (tmp_path / "a.py").write_text('"""Module a docstring here."""\nclass C:\n    """Too short."""\n')
    (tmp_path / "broken.py").write_text('"""Never seen because"""\ndef (:\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""A test module docstring."""\n')
    (tmp_path / "c.py").write_text('"""Module a docstring here."""\n')  # duplicate: dropped
    assert list(iter_stdlib_docstrings(tmp_path)) == [
        "Module a docstring here.",
        "Module b docstring here.",
        "Function f does things.",
    ]


def docs_of(cfg: DataConfig) -> list[str]:
    return list(open_source(cfg).documents(0, 0, 1, 0))


def test_txt_files_as_documents_or_paragraphs(make_cfg):
    whole = docs_of(make_cfg(source="files", paths=[str(FIXTURES / "txt")], shuffle=False))
    assert [d.split(".")[0] for d in whole] == ["alpha paragraph 0", "beta paragraph 0"]
    paras = docs_of(
        make_cfg(source="files", paths=[str(FIXTURES / "txt")], shuffle=False, txt_doc="paragraph")
    )
    assert [d.split(".")[0] for d in paras] == [
        f"{n} paragraph {i}" for n in ("alpha", "beta") for i in range(6)
    ]
    assert "\n\n".join(paras[:6]) == whole[0]


def test_jsonl_and_parquet_files(make_cfg, tmp_path):
    jsonl = docs_of(make_cfg(source="files", paths=[str(FIXTURES / "jsonl")], shuffle=False))
    assert [d.split(".")[0] for d in jsonl] == [f"jsonl {p}-{i}" for p in range(2) for i in range(10)]
    summaries = docs_of(
        make_cfg(
            source="files", paths=[str(FIXTURES / "jsonl" / "*.jsonl")], text_field="summary", shuffle=False
        )
    )
    assert summaries[:3] == ["s0-0", "s0-1", "s0-2"] and len(summaries) == 20
    parquet = docs_of(
        make_cfg(source="files", paths=[str(FIXTURES / "parquet")], text_field="content", shuffle=False)
    )
    assert [d.split(".")[0] for d in parquet] == [f"parquet {i}" for i in range(16)]
    beta, alpha = (str(FIXTURES / "txt" / f"{n}.txt") for n in ("beta", "alpha"))
    ordered = docs_of(make_cfg(source="files", paths=[beta, str(FIXTURES / "txt"), alpha], shuffle=False))
    # paths keep their given order; a file named twice is read once
    assert [d.split(".")[0] for d in ordered] == ["beta paragraph 0", "alpha paragraph 0"]
    with pytest.raises(ValueError, match="text_field='body'.*record has"):
        docs_of(make_cfg(source="files", paths=[str(FIXTURES / "jsonl")], text_field="body"))
    with pytest.raises(ValueError, match=r"text_field='text'; columns are \['id', 'content'\]"):
        docs_of(make_cfg(source="files", paths=[str(FIXTURES / "parquet")]))
    bad = tmp_path / "notes.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="'.csv'; allowed: .txt, .jsonl, .parquet"):
        docs_of(make_cfg(source="files", paths=[str(bad)]))
    with pytest.raises(FileNotFoundError, match="DataConfig.paths"):
        docs_of(make_cfg(source="files", paths=[str(tmp_path / "nothing-*.jsonl")]))


def test_c4_and_hf_streams_from_local_files(make_cfg, tmp_path):
    c4 = make_cfg(source="c4", paths=[str(FIXTURES / "c4")], max_docs=None, shuffle=False)
    train = docs_of(c4)
    assert [d.split(".")[0] for d in train] == [f"c4 train {s}-{i}" for s in range(2) for i in range(24)]
    assert len(docs_of(make_cfg(source="c4", paths=[str(FIXTURES / "c4")], split="validation"))) == 12
    parquet = str(FIXTURES / "parquet" / "docs.parquet")
    hf = docs_of(
        make_cfg(source="hf", hf_path="parquet", paths=[parquet], text_field="content", shuffle=False)
    )
    assert hf == docs_of(make_cfg(source="files", paths=[parquet], text_field="content", shuffle=False))
    with pytest.raises(ValueError, match="text_field='body'"):
        docs_of(make_cfg(source="c4", paths=[str(FIXTURES / "c4")], text_field="body"))
    with pytest.raises(FileNotFoundError, match="allenai/c4 mirror"):
        docs_of(make_cfg(source="c4", paths=[str(tmp_path)]))


@pytest.mark.parametrize("source", ["embedded", "c4"])
@pytest.mark.parametrize("dp_size", [2, 3])
def test_ranks_get_disjoint_documents_covering_the_corpus(make_cfg, source, dp_size):
    paths = [str(FIXTURES / "c4")] if source == "c4" else []
    cfg = make_cfg(source=source, paths=paths, shuffle_buffer=8)
    src = open_source(cfg)
    for epoch in (0, 1):
        shards = [list(src.documents(epoch, rank, dp_size, 0)) for rank in range(dp_size)]
        flat = [doc for shard in shards for doc in shard]
        assert len(flat) == len(set(flat)) == len(list(src.documents(epoch, 0, 1, 0)))
        assert all(abs(len(s) - len(flat) / dp_size) < 1 for s in shards)
    assert list(src.documents(0, 0, dp_size, 0)) != list(src.documents(1, 0, dp_size, 0))  # reshuffled


# --- loader ------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["causal_lm", "span_corruption"])
def test_loader_is_deterministic_and_seeded(make_cfg, tokenizer, objective):
    cfg = make_cfg(objective=objective)
    first = take(build_dataloader(cfg, 1, 2, tokenizer), 3)
    assert_same_batches(first, take(build_dataloader(cfg, 1, 2, tokenizer), 3))
    other = take(build_dataloader(make_cfg(objective=objective, seed=1), 1, 2, tokenizer), 1)
    assert not torch.equal(other[0]["input_ids"], first[0]["input_ids"])
    rank0 = take(build_dataloader(cfg, 0, 2, tokenizer), 1)
    assert not torch.equal(rank0[0]["input_ids"], first[0]["input_ids"])


def test_causal_batches_pack_the_rank_stream_with_next_token_labels(make_cfg, tokenizer):
    cfg = make_cfg(epochs=1)
    loader = build_dataloader(cfg, 1, 3, tokenizer)
    batches = list(loader)
    stream = token_stream(open_source(cfg), tokenizer, 1, 3)
    seq = cfg.seq_len
    examples = [
        (b["input_ids"][i], b["labels"][i], b["attention_mask"][i])
        for b in batches
        for i in range(cfg.batch_size)
    ]
    assert len(examples) == (len(stream) - 1) // seq // cfg.batch_size * cfg.batch_size and len(examples) > 10
    for k, (inputs, labels, mask) in enumerate(examples):
        assert inputs.shape == labels.shape == (seq,) and inputs.dtype == torch.long and bool(mask.all())
        assert np.array_equal(inputs.numpy(), stream[k * seq : (k + 1) * seq])
        assert np.array_equal(labels.numpy(), stream[k * seq + 1 : (k + 1) * seq + 1])
    with pytest.raises(StopIteration):
        next(loader)


def test_packing_runs_across_epochs_and_stops_after_the_last(make_cfg, tokenizer):
    docs = [f"Document number {i} says {'hello ' * (i + 1)}" for i in range(5)]
    cfg = make_cfg(epochs=2, seq_len=8, batch_size=1, shuffle=True)
    source = ListSource(docs, seed=cfg.seed, shuffle=True)
    batches = list(PretrainLoader(cfg, tokenizer, 0, 1, source=source))
    epochs = [token_stream(source, tokenizer, 0, 1, epoch) for epoch in (0, 1)]
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled, same length
    stream = np.concatenate(epochs)
    assert len(batches) == (len(stream) - 1) // 8
    packed = np.concatenate([b["input_ids"][0].numpy() for b in batches])
    assert np.array_equal(packed, stream[: len(packed)])


def test_span_corruption_batches_reconstruct_the_rank_stream(make_cfg, tokenizer):
    cfg = make_cfg(objective="span_corruption", epochs=1, seq_len=64)
    loader = build_dataloader(cfg, 0, 2, tokenizer)
    tokens, targets_length = compute_input_and_target_lengths(64, 0.15, 3.0)
    counts = span_counts(tokens, 0.15, 3.0)
    assert loader.targets_length == targets_length
    stream = token_stream(open_source(cfg), tokenizer, 0, 2)
    k = 0
    for batch in loader:
        assert batch["input_ids"].shape == (cfg.batch_size, 64)
        assert batch["labels"].shape == batch["decoder_input_ids"].shape == (cfg.batch_size, targets_length)
        assert torch.equal(batch["decoder_input_ids"][:, 0], torch.zeros(cfg.batch_size, dtype=torch.long))
        assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
        for row in range(cfg.batch_size):
            n = int(batch["attention_mask"][row].sum())
            assert n == counts.inputs_length and bool((batch["input_ids"][row, n:] == tokenizer.pad_id).all())
            inputs, labels = batch["input_ids"][row, :n].tolist(), batch["labels"][row].tolist()
            expected = list(tokenizer.sentinel_ids[: counts.noise_spans])
            assert [t for t in inputs if t in tokenizer.sentinel_ids] == expected
            assert [t for t in labels if t in tokenizer.sentinel_ids] == expected and labels[0] == expected[0]
            assert reconstruct(inputs, labels, tokenizer) == stream[k * tokens : (k + 1) * tokens].tolist()
            k += 1
    assert k > 6 and (k + cfg.batch_size) * tokens > len(stream)  # consumed all full batches


@pytest.mark.parametrize(
    ("objective", "source"),
    [
        ("causal_lm", "embedded"),
        ("span_corruption", "embedded"),
        ("causal_lm", "c4"),
        ("span_corruption", "c4"),
    ],
)
def test_resume_yields_exactly_the_uninterrupted_batches(make_cfg, tokenizer, objective, source):
    paths = [str(FIXTURES / "c4")] if source == "c4" else []
    # A small corpus so the run crosses epoch boundaries; resume at several points, one mid-epoch.
    cfg = make_cfg(objective=objective, source=source, paths=paths, max_docs=24, shuffle_buffer=8)
    reference = take(build_dataloader(cfg, 1, 2, tokenizer), 19)
    loader = build_dataloader(cfg, 1, 2, tokenizer)
    epochs_seen = set()
    for consumed in (0, 3, 4, 14):
        while loader.state_dict()["batches"] < consumed:
            next(loader)
        state = json.loads(json.dumps(loader.state_dict()))
        epochs_seen.add(state["epoch"])
        assert all(isinstance(v, (int, str)) for v in state.values())
        resumed = build_dataloader(cfg, 1, 2, tokenizer)
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 5), reference[consumed : consumed + 5])
    assert len(epochs_seen) > 1
    assert_same_batches(take(loader, 5), reference[14:19])  # the saved loader itself continues unchanged


def test_resume_rejects_state_from_another_setup(make_cfg, tokenizer):
    loader = build_dataloader(make_cfg(), 0, 2, tokenizer)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="dp_rank=0, this loader has dp_rank=1"):
        build_dataloader(make_cfg(), 1, 2, tokenizer).load_state_dict(state)
    with pytest.raises(ValueError, match="objective"):
        build_dataloader(make_cfg(objective="span_corruption"), 0, 2, tokenizer).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        loader.load_state_dict({"format": 1})


def test_loader_errors_are_clear(make_cfg, tokenizer):
    with pytest.raises(ValueError, match="dp_rank"):
        build_dataloader(make_cfg(), 2, 2, tokenizer)
    with pytest.raises(ValueError, match="fewer documents than ranks"):
        next(build_dataloader(make_cfg(max_docs=2), 2, 3, tokenizer))
    few = build_tokenizer(make_cfg(n_sentinels=4))
    with pytest.raises(ValueError, match="4 sentinels.*n_sentinels"):
        build_dataloader(make_cfg(objective="span_corruption", seq_len=256, n_sentinels=4), tokenizer=few)
    with pytest.raises(ValueError, match="no documents"):
        ListSource([], seed=0, shuffle=True)


@pytest.mark.slow
def test_embedded_default_builds_full_corpus_and_tokenizer_once(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), seq_len=128, batch_size=2)
    tok = build_tokenizer(cfg)
    assert tok.vocab_size == cfg.vocab_size and len(tok.sentinel_ids) == cfg.n_sentinels
    corpus_files = list((tmp_path / "corpora").iterdir())
    assert len(corpus_files) == 1
    docs = embedded_documents(cache_dir=str(tmp_path))
    assert len(docs) > 1000 and docs == json.loads(corpus_files[0].read_text())
    assert embedded_documents(max_docs=10, cache_dir=str(tmp_path)) == docs[:10]
    batch = next(build_dataloader(cfg, 0, 4, tok))
    assert batch["input_ids"].shape == (2, 128)
