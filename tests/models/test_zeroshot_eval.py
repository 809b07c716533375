"""Zero-shot evaluation harness (smile.models.zeroshot_eval): parsers and metrics on table cases,
the two-stage CoT flow, every registered task end to end on a tiny GPT-2 (and a tiny T5) over
local fixtures, determinism, 2-rank sharding equal to 1 rank, resume, an MoE export, the HTTP
backend against a stub on 127.0.0.1, and the spec's bad inputs. Nothing touches a hub."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from smile.models.zeroshot_eval import (
    PAPER_TASKS,
    TASKS,
    EndpointError,
    HFCausalBackend,
    HFSeq2SeqBackend,
    HFSource,
    OpenAICompatBackend,
    accuracy,
    answer_prompt,
    entity_f1,
    get_tasks,
    load_examples,
    rouge,
    run_eval,
)
from smile.models.zeroshot_eval import parsers as P
from smile.models.zeroshot_eval.metrics import rouge_scores
from smile.models.zeroshot_eval.report import format_table
from smile.testing import child_env, run_distributed

DATA = Path(__file__).parents[1] / "fixtures" / "zeroshot_eval" / "data"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub, and sockets may only reach loopback addresses."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            raise OSError(f"test socket guard: {address} is not loopback")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


# ---- parsers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "parser, text, expected",
    [
        (P.parse_number, "The answer is 1,234.", 1234.0),
        (P.parse_number, " 8 apples, then 3", 8.0),
        (P.parse_number, "-2.5 degrees", -2.5),
        (P.parse_number, "12,345,678 people", 12345678.0),
        (P.parse_number, "no number here", None),
        (P.option_parser("ABCDE"), "(C) because", "C"),
        (P.option_parser("ABCDE"), "Answer: B.", "B"),
        (P.option_parser("ABC"), "the answer is D", None),
        (P.parse_yes_no, "yes.", "yes"),
        (P.parse_yes_no, "No, it is not.", "no"),
        (P.parse_yes_no, "Yesterday maybe", None),
        (TASKS["rte"].parser, "not entailment.", "not_entailment"),
        (TASKS["rte"].parser, "Entailment", "entailment"),
        (TASKS["cb"].parser, "it is neutral", "neutral"),
        (TASKS["sst2"].parser, "Positive!", "positive"),
        (P.parse_letters, ' "nk".', "nk"),
        (P.parse_text, "  A summary. ", "A summary."),
        (P.parse_entities, "person: Peter Blackburn\nlocation: London",
         {("PER", "Peter Blackburn"), ("LOC", "London")}),
        (P.parse_entities, "- Organization: United Nations; EU\nmisc: German",
         {("ORG", "United Nations"), ("ORG", "EU"), ("MISC", "German")}),
        (P.parse_entities, "none", set()),
        (P.parse_entities, "I cannot tell.", None),
    ],
)  # fmt: skip
def test_parser_table(parser, text, expected):
    got = parser(text)
    assert (set(got) if isinstance(got, frozenset) else got) == expected


@pytest.mark.parametrize("name", list(TASKS))
def test_empty_generation_parses_to_none_and_counts_wrong(name):
    task = TASKS[name]
    parsed = task.parser("")
    assert parsed is None
    gold = load_examples(task, str(DATA), limit=1)[0].target
    from smile.models.zeroshot_eval.metrics import METRICS

    scores = METRICS[task.metric]([parsed], [gold])
    assert all(v == 0.0 for v in scores.values()) or task.metric == "entity_f1"


# ---- metrics ---------------------------------------------------------------------------------------------
def test_accuracy_tolerance_and_failures():
    assert accuracy([1234.0000001, 5.0, None], [1234.0, 6.0, 3.0])["accuracy"] == pytest.approx(1 / 3)
    assert accuracy(["C", None], ["C", "A"])["accuracy"] == 0.5


def test_entity_f1_hand_built():
    gold = [[["PER", "Peter Blackburn"], ["LOC", "London"]], [["ORG", "EU"]]]
    assert entity_f1(gold, gold)["f1"] == 1.0
    partial = [[["PER", "Peter"], ["LOC", "London"]], None]  # partial span wrong, failure = no entity
    scores = entity_f1(partial, gold)
    assert scores["precision"] == 0.5 and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4)
    assert entity_f1([[["LOC", "EU"]]], [[["ORG", "EU"]]])["f1"] == 0.0  # wrong type


def test_rouge():
    text = "Amanda baked cookies and will bring Jerry some."
    assert rouge_scores(text, text) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    scores = rouge([text, None], [text, text])
    assert scores["rouge1"] == 0.5 and scores["rouge_avg"] == 0.5
    assert 0 < rouge_scores("Amanda baked bread", text)["rouge1"] < 1
    assert rouge_scores("b a", "a b")["rouge2"] == 0.0 and rouge_scores("b a", "a b")["rougeL"] == 0.5


# ---- registry and the CoT flow ----------------------------------------------------------------------------
def test_registry_covers_the_study():
    assert len(PAPER_TASKS) == 20
    assert {TASKS[t].category for t in PAPER_TASKS} == {
        "arithmetic", "commonsense", "symbolic", "logical", "nli", "qa", "dialogue", "summarization", "ner",
        "sentiment",
    }  # fmt: skip
    assert TASKS["gsm8k"].answer_trigger == "Therefore, the answer (arabic numerals) is"
    assert TASKS["gsm8k"].zs_trigger == "The answer (arabic numerals) is"
    assert all(TASKS[t].cot_trigger == "Let's think step by step." for t in TASKS)
    with pytest.raises(ValueError, match="unknown task 'nope'; registered tasks: multiarith, gsm8k"):
        get_tasks(["gsm8k", "nope"])


class Recorder:
    """A stub backend: echoes each prompt's last line and records every call."""

    name = "recorder"

    def __init__(self, reply: str | None = None) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.reply = reply

    def generate(self, prompts, max_new_tokens, stop=()):
        self.calls.append((list(prompts), max_new_tokens))
        return [self.reply if self.reply is not None else f"echo<{p.splitlines()[-1]}>" for p in prompts]


def test_two_stage_cot_prompt_holds_the_reasoning_and_the_trigger():
    backend = Recorder()
    result = run_eval(
        ["multiarith"], backend, "zs-cot", data_dir=str(DATA), max_new_tokens=7, cot_max_new_tokens=11
    )
    (stage1, n1), (stage2, n2) = backend.calls
    assert (n1, n2) == (11, 7) and len(stage1) == len(stage2) == 5
    for p1, p2, record in zip(stage1, stage2, result["multiarith"]["predictions"]):
        assert p1.startswith("Q: ") and p1.endswith("A: Let's think step by step.")
        reasoning = "echo<A: Let's think step by step.>"
        assert record["reasoning"] == reasoning
        assert p2 == f"{p1} {reasoning} Therefore, the answer (arabic numerals) is"
        assert p2 == answer_prompt(TASKS["multiarith"], p1, reasoning)
    zs = Recorder()
    run_eval(["multiarith"], zs, "zs", data_dir=str(DATA))
    assert len(zs.calls) == 1 and zs.calls[0][0][0].endswith("\nA: The answer (arabic numerals) is")


def test_a_stub_that_always_answers_right_scores_one_and_empty_scores_zero(tmp_path):
    result = run_eval(["gsm8k"], Recorder(" 1,000 sheep"), "zs", data_dir=str(DATA), out_dir=tmp_path)
    assert result["gsm8k"]["scores"]["accuracy"] == 0.2  # one of five golds is 1,000
    empty = run_eval(None, Recorder(""), "zs-cot", limit=2, data_dir=str(DATA))
    assert len(empty) == 20 and all(r["n"] == 2 for r in empty.values())
    assert all(max(r["scores"].values()) == 0.0 for r in empty.values())
    assert all(p["parsed"] is None for r in empty.values() for p in r["predictions"])


# ---- tiny models ------------------------------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [ex.input for t in TASKS.values() for ex in load_examples(t, str(DATA))]
    texts += [t.answer_trigger + " " + t.cot_trigger for t in TASKS.values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A tiny GPT-2, the same made MoE (a smile export), and a tiny T5, all with the toy tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    from smile.hf import moefy
    from smile.moe import MoEConfig, Topology
    from smile.runtime import export_pretrained

    root = tmp_path_factory.mktemp("zs-models")
    tok = _tokenizer()
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gpt = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=512, bos_token_id=tok.eos_token_id, **ids)
    GPT2LMHeadModel(gpt).save_pretrained(root / "gpt2")
    moe = GPT2LMHeadModel(gpt)
    moefy(moe, MoEConfig(num_experts=4, every=1, router="switch", capacity_factor=None))
    export_pretrained(moe, root / "gpt2_moe", Topology(1, 1))
    t5 = T5Config(
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=tok.pad_token_id,
        **ids,
    )
    T5ForConditionalGeneration(t5).save_pretrained(root / "t5")
    for name in ("gpt2", "gpt2_moe", "t5"):
        tok.save_pretrained(root / name)
    (root / "no_tokenizer").mkdir()
    GPT2LMHeadModel(gpt).save_pretrained(root / "no_tokenizer")
    return root


def _smile(*argv: str, capsys) -> tuple[int, str, str]:
    from smile.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_task_end_to_end_through_the_cli_deterministic_twice(models_dir, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"backend: hf_causal\nmodel: {models_dir / 'gpt2'}\ntasks: [paper+]\nmode: zs\ndata_dir: {DATA}\n"
        "batch_size: 4\nmax_new_tokens: 6\ncot_max_new_tokens: 6\nseed: 0\n"
    )
    runs = []
    for out in ("a", "b"):
        code, stdout, err = _smile("zoo", "zeroshot_eval", "eval", "--config", str(config),
                                   f"out_dir={tmp_path / out}", capsys=capsys)  # fmt: skip
        assert code == 0, err
        assert "| arithmetic | gsm8k | acc |" in stdout and "| summarization | samsum | R-1/2/L |" in stdout
        files = sorted((tmp_path / out / "gpt2").glob("*.json"))
        assert [f.name.split(".")[0] for f in files] == sorted(TASKS)
        runs.append({f.name: json.loads(f.read_text()) for f in files})
    assert runs[0] == runs[1]  # greedy with a fixed seed: identical outputs, scores, files
    for result in runs[0].values():
        assert result["n"] == 5 and len(result["predictions"]) == 5
        assert all(0.0 <= v <= 1.0 for v in result["scores"].values())
        assert result["protocol"] and all("output" in p for p in result["predictions"])
    code, table, _ = _smile("zoo", "zeroshot_eval", "eval", "--report", str(tmp_path), capsys=capsys)
    assert code == 0 and table.count("\n| ") == len(TASKS) and "| a/gpt2 zs | b/gpt2 zs |" in table


def test_seq2seq_backend_runs_the_cot_flow(models_dir):
    backend = HFSeq2SeqBackend(str(models_dir / "t5"), batch_size=3)
    results = run_eval(["coin_flip", "samsum"], backend, "zs-cot", data_dir=str(DATA),
                       max_new_tokens=4, cot_max_new_tokens=4)  # fmt: skip
    assert all(r["n"] == 5 and r["model"] == "t5" for r in results.values())
    assert all(p["reasoning"] is not None for r in results.values() for p in r["predictions"])


def _rank_eval(topology, model_dir, data_dir, out_dir, late_reader=False):
    """``late_reader``: rank 1 reads each task's partial files 1 s late, after rank 0 has written
    its first predictions there unless the ranks wait for each other (a race seen once in CI)."""
    if late_reader and topology.rank == 1:
        from smile.models.zeroshot_eval import evaluate

        read = evaluate._read_partials
        evaluate._read_partials = lambda *a: time.sleep(1.0) or read(*a)
    backend = HFCausalBackend(model_dir, batch_size=1)
    results = run_eval(["gsm8k", "conll03", "copa"], backend, "zs-cot", data_dir=data_dir, out_dir=out_dir,
                       max_new_tokens=4, cot_max_new_tokens=4)  # fmt: skip
    return {name: r["predictions"] for name, r in results.items()}


def test_two_ranks_equal_one_rank_and_resume_skips_finished_examples(models_dir, tmp_path):
    model = str(models_dir / "gpt2")
    one = _rank_eval(None, model, str(DATA), str(tmp_path / "one"))
    two = run_distributed(_rank_eval, 1, 2, model, str(DATA), str(tmp_path / "two"), True, timeout=240)
    assert two[0] == two[1] == one
    for name in one:
        assert json.loads((tmp_path / "one" / f"{name}.zs-cot.json").read_text()) == json.loads(
            (tmp_path / "two" / f"{name}.zs-cot.json").read_text()
        )
    # Resume: rank 1 of an interrupted 2-rank run had finished examples 1 and 3 of gsm8k.
    done = json.loads((tmp_path / "one" / "gsm8k.zs-cot.json").read_text())
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    lines = [json.dumps({**done["predictions"][i], "protocol": done["protocol"]}) for i in (1, 3)]
    (resume_dir / "gsm8k.zs-cot.partial.rank1.jsonl").write_text("\n".join(lines) + "\n{cut off")
    backend = HFCausalBackend(model, batch_size=1)
    calls = []
    generate = backend.generate
    backend.generate = lambda prompts, *a: calls.append(len(prompts)) or generate(prompts, *a)
    result = run_eval(["gsm8k"], backend, "zs-cot", data_dir=str(DATA), out_dir=resume_dir,
                      max_new_tokens=4, cot_max_new_tokens=4)["gsm8k"]  # fmt: skip
    assert calls == [3, 3] and result["resumed"] == 2  # stage 1 and 2 of examples 0, 2, 4 only
    assert result["predictions"] == done["predictions"]
    assert not list(resume_dir.glob("*.partial.*"))


@pytest.mark.slow
def test_nproc_runs_the_cli_on_two_torchrun_workers_like_one_process(models_dir, tmp_path, capsys):
    """``--nproc 2`` starts two workers through the runtime's launcher (torchrun's agent): the
    examples are sharded and gathered back, and the result files equal those of one process."""
    import subprocess
    import sys

    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"backend: hf_causal\nmodel: {models_dir / 'gpt2'}\ntasks: [gsm8k, conll03, copa]\nmode: zs-cot\n"
        f"data_dir: {DATA}\nbatch_size: 2\nmax_new_tokens: 4\ncot_max_new_tokens: 4\nseed: 0\n"
    )
    one_dir = f"out_dir={tmp_path / 'one'}"
    code, _, err = _smile("zoo", "zeroshot_eval", "eval", "--config", str(config), one_dir, capsys=capsys)
    assert code == 0, err
    env = child_env(OMP_NUM_THREADS="1")
    argv = [
        "zoo",
        "zeroshot_eval",
        "eval",
        "--nproc",
        "2",
        "--config",
        str(config),
        f"out_dir={tmp_path / 'two'}",
    ]
    out = subprocess.run([sys.executable, "-m", "smile.cli", *argv], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    logs = list((tmp_path / "two" / "logs").glob("*/attempt_0/*/stderr.log"))  # under the config's out_dir
    assert len(logs) == 2, logs
    one = sorted((tmp_path / "one" / "gpt2").glob("*.json"))
    assert [f.name for f in one] == [f.name for f in sorted((tmp_path / "two" / "gpt2").glob("*.json"))]
    for f in one:
        assert json.loads(f.read_text()) == json.loads((tmp_path / "two" / "gpt2" / f.name).read_text()), (
            f.name
        )


def test_moe_export_evaluates_like_any_model_and_logs_expert_load(models_dir, tmp_path, caplog):
    from smile.moe import MoEConfig

    with pytest.raises(ValueError, match="is a smile MoE export: set model.moe"):
        HFCausalBackend(str(models_dir / "gpt2_moe"))
    moe = MoEConfig(num_experts=4, every=1, router="switch", capacity_factor=None)
    backend = HFCausalBackend(str(models_dir / "gpt2_moe"), batch_size=2, moe=moe)
    with caplog.at_level("INFO", logger="smile.models.zeroshot_eval"):
        results = run_eval(
            ["sst2", "svamp"], backend, "zs", data_dir=str(DATA), out_dir=tmp_path, max_new_tokens=3
        )
    for name, result in results.items():
        load = result["expert_load"]
        assert set(load) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}
        assert all(len(c) == 4 and sum(c) > 0 for c in load.values())
        assert json.loads((tmp_path / f"{name}.zs.json").read_text())["expert_load"] == load
    assert "sst2 zs expert load" in caplog.text
    assert results["sst2"]["expert_load"] != results["svamp"]["expert_load"]  # counted per task
    dense = run_eval(
        ["sst2"], HFCausalBackend(str(models_dir / "gpt2")), "zs", data_dir=str(DATA), max_new_tokens=3
    )
    assert dense["sst2"]["expert_load"] is None
    assert "| sentiment | sst2 | acc |" in format_table([results["sst2"], dense["sst2"]])


# ---- the HTTP backend against a stub on 127.0.0.1 ----------------------------------------------------------
class Stub(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        server = self.server
        server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        try:
            if server.delay:
                time.sleep(server.delay)
            if len(server.bodies) <= server.fail_first:
                self.send_response(503)
                self.end_headers()
                return
            body = server.bodies[-1]
            text = "The answer is 1,234.\nQ: next" if "messages" in body else "(C) because"
            choice = {"message": {"content": text}} if "messages" in body else {"text": text}
            payload = json.dumps({"choices": [choice]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.daemon_threads = True
    server.bodies, server.fail_first, server.delay = [], 0, 0.0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_backend_chat_and_completions(stub):
    url = f"http://127.0.0.1:{stub.server_address[1]}/v1"
    chat = OpenAICompatBackend(url, "gpt-3.5-turbo", backoff_s=0)
    assert chat.generate(["Q: x\nA:"], 32, stop=["\nQ:"]) == ["The answer is 1,234."]
    assert stub.bodies[-1] == {"model": "gpt-3.5-turbo", "temperature": 0, "max_tokens": 32, "stop": ["\nQ:"],
                               "messages": [{"role": "user", "content": "Q: x\nA:"}]}  # fmt: skip
    davinci = OpenAICompatBackend(url, "text-davinci-003", api="completions", backoff_s=0)
    result = run_eval(["aqua"], davinci, "zs", data_dir=str(DATA))["aqua"]
    assert result["scores"]["accuracy"] == 0.6 and stub.bodies[-1]["prompt"].endswith(
        "\nA: Among A through E, the answer is"
    )


def test_http_backend_retries_as_configured_then_fails_naming_the_url(stub):
    url = f"http://127.0.0.1:{stub.server_address[1]}/v1"
    stub.fail_first = 2
    assert OpenAICompatBackend(url, "m", max_retries=2, backoff_s=0).generate(["q"], 4) == [
        "The answer is 1,234.\nQ: next"
    ]
    assert len(stub.bodies) == 3
    stub.bodies.clear()
    stub.fail_first = 10
    with pytest.raises(
        EndpointError, match=rf"{url}/chat/completions unreachable after 2 attempts: HTTP 503"
    ):
        OpenAICompatBackend(url, "m", max_retries=1, backoff_s=0).generate(["q"], 4)
    assert len(stub.bodies) == 2
    stub.bodies.clear()
    stub.fail_first, stub.delay = 0, 1.0
    start = time.monotonic()
    with pytest.raises(EndpointError, match="unreachable after 1 attempts: timed out"):
        OpenAICompatBackend(url, "m", timeout_s=0.2, max_retries=0).generate(["q"], 4)
    assert time.monotonic() - start < 1.0


def test_unreachable_endpoint_fails_fast_through_the_cli(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(EndpointError, match=f"{url}/completions unreachable after 3 attempts"):
        OpenAICompatBackend(url, "m", api="completions", max_retries=2, backoff_s=0).generate(["q"], 4)
    overrides = ["backend=openai", "model=m", f"endpoint.base_url={url}", "endpoint.max_retries=0",
                 "tasks=[sst2]", f"data_dir={DATA}", f"out_dir={tmp_path}"]  # fmt: skip
    code, _, err = _smile("zoo", "zeroshot_eval", "eval", *overrides, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and f"{url}/chat/completions unreachable" in err


# ---- data loaders and bad inputs ----------------------------------------------------------------------
def test_hf_loader_reads_a_local_dataset_offline(tmp_path):
    folder = tmp_path / "sst2_hf"
    folder.mkdir()
    (folder / "test.jsonl").write_text((DATA / "sst2.jsonl").read_text())
    task = dataclasses.replace(TASKS["sst2"], hf=HFSource(str(folder), None, "test"))
    examples = load_examples(task, data_dir=None, cache_dir=str(tmp_path / "cache"), limit=3, seed=1)
    assert len(examples) == 3 and [e.idx for e in examples] == sorted(e.idx for e in examples)
    assert examples == load_examples(task, None, str(tmp_path / "cache"), limit=3, seed=1)
    assert examples[0].target in ("positive", "negative")


def test_bad_inputs_are_clear_one_line_errors(models_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"task 'multiarith' not found locally .*MultiArith.json"):
        load_examples(TASKS["multiarith"], str(tmp_path))
    missing_hf = dataclasses.replace(TASKS["gsm8k"], hf=HFSource(str(tmp_path / "nowhere"), "main"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded.*cache HF dataset"):
        load_examples(missing_hf, str(tmp_path))
    for limit in (0, -1):
        with pytest.raises(ValueError, match="limit must be a positive number"):
            run_eval(["sst2"], Recorder(), "zs", limit=limit, data_dir=str(DATA))
    with pytest.raises(ValueError, match="mode must be one of zs, zs-cot"):
        run_eval(["sst2"], Recorder(), "cot", data_dir=str(DATA))
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        HFCausalBackend(str(models_dir / "no_tokenizer"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFCausalBackend(str(tmp_path))
    for argv, expected in (
        (("train",), "zeroshot_eval is an evaluation-only method"),
        (("eval", "tasks=[nope]"), "unknown task 'nope'; registered tasks: multiarith"),
        (("eval", "limit=0"), "limit=0 must be a positive number"),
        (("eval", "--report", str(tmp_path / "none")), "no results directory"),
    ):
        code, _, err = _smile("zoo", "zeroshot_eval", *argv, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and expected in err, err
