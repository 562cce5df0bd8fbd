"""normlab.eval: task files, lm-eval's log-likelihood convention, batched and KV-cached scoring,
metrics and the results JSON. Every expected number is computed here by hand, one unpadded
sequence at a time."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch

from normlab import ConfigError, DataError, ModelConfig, build_model
from normlab.config import DataConfig, RunConfig
from normlab.data import ByteTokenizer
from normlab.eval import (
    Request,
    Score,
    default_results_path,
    encode_pair,
    evaluate,
    evaluate_run,
    harness,
    load_task,
    rolling_windows,
    score,
    scoring,
)
from normlab.train.checkpoint import save_checkpoint
from normlab.train.rundir import RunDir
from reference import tree

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
BYTES = ByteTokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds spin-waiting, which on a busy 2-core
    machine made this file 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(max_seq_len: int = 64, strategy: str = "pre_norm", **overrides) -> torch.nn.Module:
    cfg = ModelConfig.from_strategy(strategy, vocab_size=257, d_model=32, n_layers=2, n_heads=2,
                                    max_seq_len=max_seq_len, **overrides)
    return build_model(cfg, seed=0).eval()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def by_hand(model, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's convention for UTF-8 bytes, one unpadded sequence: trailing spaces of the
    context move to the continuation, an empty context is the end-of-text id, the model reads
    the last max_seq_len + 1 tokens but the final one."""
    if context:
        kept = context.rstrip()
        ctx, cont = list(kept.encode()), list((context[len(kept):] + continuation).encode())
    else:
        ctx, cont = [BYTES.eos_id], list(continuation.encode())
    limit = model.config.max_seq_len
    window = (ctx + cont)[-(limit + 1):]
    targets = torch.tensor(cont[-limit:])
    with torch.no_grad():
        logprobs = model(torch.tensor([window[:-1]]))[0, -len(targets):].double().log_softmax(-1)
    loglik = float(logprobs.gather(1, targets[:, None]).sum())
    return loglik, bool((logprobs.argmax(-1) == targets).all())


# ---------------------------------------------------------------- log-likelihoods


ITEMS = [  # (context, continuations): one item = the choices of one question
    ("Q: 2+2 =", [" 4", " 5", " 22"]),  # shared context, fits
    ("x" * 40 + " long", [" a", " bcd"]),  # truncated, cut differently per choice: whole sequences
    ("y" * 40, [" ab", " cd"]),  # truncated at the same place: shared, truncated context
    ("", [" first", " second"]),  # empty context: the end-of-text id
    ("Trailing space ", [" x", " yz"]),  # the space moves to the continuation
    ("ctx", [" " + "z" * 40, " short"]),  # a continuation longer than max_seq_len
    ("a", [" b", " c"]),  # a one-token context cannot use the cache
]


@pytest.mark.parametrize("strategy, overrides", [
    ("pre_norm", {}), ("pre_norm", {"n_kv_heads": 1}), ("bhyt", {}), ("hybridnorm", {})])
@pytest.mark.parametrize("batch_size", [3, 64])
def test_loglikelihoods_equal_one_sequence_at_a_time(strategy, overrides, batch_size):
    model = tiny_model(32, strategy, **overrides)
    items = [[encode_pair(BYTES, ctx, cont) for cont in conts] for ctx, conts in ITEMS]
    shared = [scoring._shares_context(requests, 32) for requests in items]
    assert shared == [True, False, True, False, True, False, False]  # both paths are covered
    got = score(model, items, batch_size=batch_size, progress=False)
    for (ctx, conts), scores in zip(ITEMS, got, strict=True):
        for cont, result in zip(conts, scores, strict=True):
            loglik, greedy = by_hand(model, ctx, cont)
            assert result.loglik == pytest.approx(loglik, abs=1e-4), (ctx[:10], cont)
            assert result.greedy == greedy


def test_encoding_follows_lm_eval():
    assert encode_pair(BYTES, "ab  ", "c") == Request([97, 98], [32, 32, 99])
    assert encode_pair(BYTES, "", " c") == Request([256], [32, 99])
    request = encode_pair(BYTES, "abcdef", " gh")
    assert request.start(4) == 9 - 5 and request.start(8) == 0


def test_rolling_windows_match_lm_eval():
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    for length in (1, 15, 16, 17, 40, 48):
        ids = list(range(100, 100 + length))
        expected = [lm_eval_utils.make_disjoint_window(w) for w in
                    lm_eval_utils.get_rolling_token_windows(ids, 256, 16, context_len=1)]
        got = [(w.context, w.continuation) for w in rolling_windows(ids, 256, 16)]
        assert got == [(list(a), list(b)) for a, b in expected]


# ---------------------------------------------------------------- metrics


def test_choice_metrics_and_stderr_on_a_hand_checked_example(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"query": "q1", "choices": ["a", "bbbb"], "gold": 1},
        {"query": "q2", "choices": ["cc", "d"], "gold": 0},
        {"query": "q3", "choices": ["e", "f", "g"], "gold": 2},
    ])
    logliks = [[-2.0, -5.0], [-1.0, -3.0], [-1.0, -1.0, -5.0]]
    # acc: argmax 0 (wrong), 0 (right), 0 on a tie (wrong) -> 1/3
    # acc_norm: -2/1 < -5/4 (right; a tie if the space counted), -1/2 > -3/1 (right),
    # -1 = -1 > -5 (wrong) -> 2/3
    monkeypatch.setattr(harness, "score", lambda *args, **kwargs: [
        [Score(value, False) for value in item] for item in logliks])
    metrics = evaluate(tiny_model(), BYTES, [path], progress=False)["tasks"]["mc"]["metrics"]
    assert metrics["acc"]["value"] == pytest.approx(1 / 3)
    assert metrics["acc_norm"]["value"] == pytest.approx(2 / 3)
    # sample std (ddof 1) / sqrt(n) = sqrt(p (1 - p) / (n - 1)) = sqrt(2/9 / 2) = 1/3
    assert metrics["acc"]["stderr"] == pytest.approx(1 / 3)
    assert metrics["acc_norm"]["stderr"] == pytest.approx(1 / 3)


def test_choice_tasks_end_to_end(tmp_path):
    model = tiny_model(24)
    mc = [{"query": f"Question {i}: pick", "choices": ["one", "three", "a much longer answer"],
           "gold": i % 3} for i in range(6)]
    partial = [{"context_options": [f"Anna {i} sat", f"Bob {i} stood up"],
                "continuation": "and left.", "gold": i % 2} for i in range(5)]
    tasks = [write_jsonl(tmp_path / "mc.jsonl", mc), write_jsonl(tmp_path / "wino.jsonl", partial)]
    results = evaluate(model, BYTES, tasks, batch_size=4, progress=False)["tasks"]

    def accuracy(values: list[list[float]], records: list[dict]) -> float:
        return statistics.fmean(v.index(max(v)) == r["gold"]
                                for v, r in zip(values, records, strict=True))

    logliks = [[by_hand(model, r["query"], " " + c)[0] for c in r["choices"]] for r in mc]
    per_char = [[ll / len(c) for ll, c in zip(lls, r["choices"], strict=True)]
                for lls, r in zip(logliks, mc, strict=True)]
    assert results["mc"]["metrics"]["acc"]["value"] == pytest.approx(accuracy(logliks, mc))
    assert results["mc"]["metrics"]["acc_norm"]["value"] == pytest.approx(accuracy(per_char, mc))
    truncated = sum(len(r["query"]) + 1 + len(c) > 25 for r in mc for c in r["choices"])
    assert results["mc"]["truncated"] == truncated > 0
    assert (results["mc"]["format"], results["mc"]["items"], results["mc"]["requests"]) == (
        "multiple_choice", 6, 18)

    logliks = [[by_hand(model, option, " and left.")[0] for option in r["context_options"]]
               for r in partial]
    assert results["wino"]["format"] == "partial_scoring"
    assert results["wino"]["metrics"]["acc"]["value"] == pytest.approx(accuracy(logliks, partial))
    assert set(results["wino"]["metrics"]) == {"acc"}


def greedy_bytes(model, text: str, count: int) -> list[int]:
    """Argmax decoding by hand, one full forward per byte."""
    ids = list(text.encode())
    for _ in range(count):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-count:]


def test_lambada_greedy_accuracy_and_perplexity_by_hand(tmp_path):
    model = tiny_model(48)
    with torch.no_grad():  # make ' ' a frequent argmax, so that some words are greedy
        model.lm_head.weight[ord(" ")] *= 20
    records = []
    for i in range(24):
        context = f"Story {i} goes"
        space, letter = greedy_bytes(model, context, 2)
        greedy_word = space == ord(" ") and 33 <= letter <= 126
        records.append({"context": context, "continuation": chr(letter) if greedy_word else "b"})
    results = evaluate(model, BYTES, [write_jsonl(tmp_path / "lambada.jsonl", records)],
                       progress=False)["tasks"]["lambada"]
    scored = [by_hand(model, r["context"], " " + r["continuation"]) for r in records]
    hits = [greedy for _, greedy in scored]
    assert 0 < sum(hits) < len(hits)  # the test can tell right from wrong
    p, n = statistics.fmean(hits), len(hits)
    assert results["format"] == "continuation"
    assert results["metrics"]["acc"]["value"] == pytest.approx(p)
    assert results["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    perplexity = math.exp(-statistics.fmean(loglik for loglik, _ in scored))
    assert results["metrics"]["perplexity"]["value"] == pytest.approx(perplexity, rel=1e-5)


def test_text_perplexity_and_bits_per_byte_by_hand(tmp_path):
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    model = tiny_model(16)
    documents = ["the quick brown fox jumps over the lazy dog near the café by the river",
                 "short one"]
    (tmp_path / "story.txt").write_text(documents[0], encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents])
    results = evaluate(model, BYTES, [tmp_path / "story.txt", jsonl], progress=False)["tasks"]

    def nll(document: str) -> float:
        ids = list(document.encode())
        total = 0.0
        for ctx, cont in map(lm_eval_utils.make_disjoint_window,
                             lm_eval_utils.get_rolling_token_windows(ids, 256, 16, 1)):
            with torch.no_grad():
                logits = model(torch.tensor([(ctx + cont)[:-1]]))[0, -len(cont):]
            total -= float(logits.double().log_softmax(-1).gather(1, torch.tensor(cont)[:, None]).sum())
        return total

    for name, docs in (("story", documents[:1]), ("docs", documents)):
        total = sum(map(nll, docs))
        n_bytes = sum(len(d.encode()) for d in docs)  # 'é' is two bytes, one character
        n_words = sum(len(d.split()) for d in docs)
        metrics = results[name]["metrics"]
        assert results[name]["format"] == "text"
        assert metrics["perplexity"]["value"] == pytest.approx(math.exp(total / n_bytes), rel=1e-5)
        assert metrics["bits_per_byte"]["value"] == pytest.approx(total / n_bytes / math.log(2),
                                                                  rel=1e-5)
        assert metrics["word_perplexity"]["value"] == pytest.approx(math.exp(total / n_words),
                                                                    rel=1e-5)
    assert results["story"]["requests"] == math.ceil(len(documents[0].encode()) / 16) == 5


# ---------------------------------------------------------------- few-shot


def test_fewshot_examples_are_deterministic_and_never_the_item(tmp_path):
    records = [{"query": f"Q{i}?", "choices": [f"A{i}", "no"], "gold": 0} for i in range(10)]
    task = load_task(write_jsonl(tmp_path / "fs.jsonl", records))
    solved = {f"Q{i}? A{i}" for i in range(10)}
    for index in range(10):
        prefix = task.fewshot_prefix(index, 3, seed=5)
        assert prefix == task.fewshot_prefix(index, 3, seed=5)
        examples = prefix.split("\n\n")
        assert examples[-1] == "" and len(set(examples[:-1])) == 3
        assert set(examples[:-1]) <= solved - {f"Q{index}? A{index}"}
        assert task.pairs(index, prefix)[0] == (prefix + f"Q{index}?", f" A{index}")
    assert any(task.fewshot_prefix(i, 3, seed=5) != task.fewshot_prefix(i, 3, seed=6)
               for i in range(10))
    assert task.fewshot_prefix(0, 0, seed=5) == ""
    with pytest.raises(DataError, match="too few for 10 few-shot"):
        task.fewshot_prefix(0, 10, seed=5)
    model = tiny_model(128)
    first, second = (evaluate(model, BYTES, [task.path], num_fewshot=2, progress=False)["tasks"]["fs"]
                     for _ in range(2))
    assert first["metrics"] == second["metrics"] and first["num_fewshot"] == 2


# ---------------------------------------------------------------- task files


def test_task_lookup_by_name(tmp_path, monkeypatch):
    record = {"query": "q", "choices": ["a", "b"], "gold": 0}
    for path in ("alpha/alpha.jsonl", "alpha/raw.jsonl", "beta/only.jsonl", "gamma/x.jsonl",
                 "gamma/y.jsonl"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        write_jsonl(tmp_path / path, [record])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a task")

    assert load_task("alpha", tmp_path).path == tmp_path / "alpha" / "alpha.jsonl"
    beta = load_task("beta", tmp_path)
    assert (beta.name, beta.path.name, beta.format) == ("beta", "only.jsonl", "multiple_choice")
    with pytest.raises(DataError, match=r"several \.jsonl files \(x\.jsonl, y\.jsonl\)"):
        load_task("gamma", tmp_path)
    with pytest.raises(DataError, match=r"unknown task 'alpah'.*did you mean 'alpha'.*"
                                        r"available: alpha, beta, gamma$"):
        load_task("alpah", tmp_path)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path))
    assert load_task("beta").name == "beta"
    monkeypatch.delenv("NORMLAB_DATA")
    with pytest.raises(DataError, match="pass --data-dir or set NORMLAB_DATA"):
        load_task("beta")
    with pytest.raises(DataError, match="does not exist"):
        load_task(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a"], "gold": 0', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"query": "q", "choices": ["a", "b"]}', "missing field 'gold'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": "1"}', "'gold' should be a JSON integer"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', "'gold' should be a JSON integer"),
    ('{"query": 3, "choices": ["a", "b"], "gold": 0}', "'query' should be a JSON string"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold 2 is out of range for 2 choices"),
    ('{"query": "q", "choices": [], "gold": 0}', "'choices' is empty"),
    ('{"query": "q", "choices": ["a", 3], "gold": 0}', "should hold non-empty strings"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 1})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the blank line 2 is skipped
    with pytest.raises(DataError) as err:
        load_task(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_format_and_bad_options(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"^{path}:1: fields answer, question match no task"):
        load_task(path)
    good = write_jsonl(tmp_path / "good.jsonl", [{"context": "c", "continuation": "d"}])
    model = tiny_model()
    for options, message in (({"num_fewshot": -1}, "num_fewshot"), ({"limit": 0}, "limit"),
                             ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ConfigError, match=message):
            evaluate(model, BYTES, [good], progress=False, **options)
    with pytest.raises(ConfigError, match="'good' is given twice"):
        evaluate(model, BYTES, [good, good], progress=False)


# ---------------------------------------------------------------- runs and results JSON


def make_run(path: Path, step: int = 3) -> Path:
    cfg = ModelConfig.from_strategy("pre_norm", vocab_size=257, d_model=32, n_layers=2,
                                    n_heads=2, max_seq_len=64)
    run = RunDir(path)
    run.create()
    run.write_config(RunConfig(model=cfg, data=DataConfig(tokenizer="byte")).to_dict())
    BYTES.save(run.tokenizer_path)
    save_checkpoint(run.checkpoints, step, build_model(cfg, seed=1), {"step": step}, keep_last=1)
    return path


def test_evaluate_run_writes_results_json(tmp_path):
    run = make_run(tmp_path / "run")
    records = [{"context": f"line {i}", "continuation": "end"} for i in range(5)]
    task = write_jsonl(tmp_path / "cont.jsonl", records)
    results = evaluate_run(run, [task], limit=2, batch_size=4, seed=7, progress=False)
    path = default_results_path(run, 3)
    assert path == run / "eval" / "step_000003.json"
    assert json.loads(path.read_text()) == results
    assert (results["checkpoint_step"], results["tokenizer"], results["seed"], results["limit"],
            results["batch_size"], results["run_dir"]) == (3, "byte", 7, 2, 4, str(run))
    assert results["normlab_version"] and results["elapsed_s"] >= 0
    entry = results["tasks"]["cont"]
    assert (entry["items"], entry["num_fewshot"], entry["truncated"], entry["path"]) == (
        2, 0, 0, str(task))
    assert set(entry["metrics"]["acc"]) == {"value", "stderr"}
    out = tmp_path / "elsewhere" / "r.json"
    assert evaluate_run(run, [task], out=out, limit=1, progress=False)["tasks"]["cont"]["items"] == 1
    assert json.loads(out.read_text())["tasks"]["cont"]["items"] == 1


def test_bad_task_fails_before_scoring_and_writes_nothing(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    good = write_jsonl(tmp_path / "good.jsonl", [{"context": "c", "continuation": "d"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "continuation": "d"},
                                               {"context": "c"}])

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before every task was validated")

    monkeypatch.setattr(harness, "score", no_scoring)
    with pytest.raises(DataError, match=rf"^{bad}:2: missing field 'continuation'"):
        evaluate_run(run, [good, bad], progress=False)
    assert not (run / "eval").exists()



def evaluate_cli(run: Path, task: Path, *extra: str) -> int:
    from normlab.cli import main

    return main(["evaluate", str(run), "--tasks", str(task), "--device", "cpu", "-q", *extra])


@pytest.mark.parametrize("target, message", [
    ("", "is empty"),
    ("run/config.yaml", "inside the run directory"),
    ("run/checkpoints/new.json", "inside the run directory"),
    ("notes.txt", "holds something other than"),
    ("other.json", "holds something other than"),
    ("folder", "is a directory"),
    ("notes.txt/r.json", "is not a directory"),
    ("/dev/null", "not a regular file"),
])
def test_out_holding_something_else_is_refused_before_scoring(tmp_path, monkeypatch, capsys,
                                                              target, message):
    run = make_run(tmp_path / "run")
    task = write_jsonl(tmp_path / "cont.jsonl", [{"context": "c", "continuation": "d"}])
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "other.json").write_text('{"loss": 1.5}\n')
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "inside.txt").write_text("keep me too")
    before = tree(tmp_path)

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before --out was checked")

    monkeypatch.setattr(harness, "score", no_scoring)
    out = target if target in ("", "/dev/null") else str(tmp_path / target)
    assert evaluate_cli(run, task, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: ") and err.count("\n") == 1 and message in err, err
    assert tree(tmp_path) == before  # nothing written, replaced or left behind
    assert not Path("/dev/null").is_file()
    with pytest.raises(ConfigError, match=message):
        evaluate_run(run, [task], out=out, progress=False)
    assert tree(tmp_path) == before


def test_out_replaces_an_earlier_results_file(tmp_path):
    run = make_run(tmp_path / "run")
    task = write_jsonl(tmp_path / "cont.jsonl",
                       [{"context": f"line {i}", "continuation": "end"} for i in range(3)])
    for out in (tmp_path / "results.json", run / "eval" / "mine.json"):
        assert evaluate_cli(run, task, "--out", str(out), "--limit", "1") == 0
        assert evaluate_cli(run, task, "--out", str(out), "--limit", "2") == 0  # replaced
        assert json.loads(out.read_text())["tasks"]["cont"]["items"] == 2
    assert evaluate_cli(run, task) == 0
    assert evaluate_cli(run, task) == 0  # the default file is replaced too
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["mine.json", "step_000003.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cont.jsonl", "results.json", "run"]


def test_an_earlier_results_file_in_a_read_only_folder_is_refused_before_scoring(tmp_path, monkeypatch, capsys):
    """Replacing results writes a temporary file beside them: a folder that takes no new file
    is refused before the (possibly long) scoring, not after it."""
    import normlab.errors

    run = make_run(tmp_path / "run")
    task = write_jsonl(tmp_path / "cont.jsonl", [{"context": "c", "continuation": "d"}])
    out = tmp_path / "kept" / "results.json"
    assert evaluate_cli(run, task, "--out", str(out)) == 0
    before = tree(tmp_path)
    writable = os.access
    monkeypatch.setattr(normlab.errors.os, "access",  # root may write anywhere: pretend it may not here
                        lambda path, mode: Path(path) != out.parent and writable(path, mode))

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before --out was checked")

    monkeypatch.setattr(harness, "score", no_scoring)
    assert evaluate_cli(run, task, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert f"no permission to write in '{out.parent}'" in err and err.count("\n") == 1, err
    assert tree(tmp_path) == before


def test_another_task_scored_later_joins_the_earlier_results(tmp_path):
    """Scoring task b after task a keeps a's numbers in the run's results file; with other
    options (another --limit) the file holds only the new scores."""
    run = make_run(tmp_path / "run")
    first = write_jsonl(tmp_path / "a.jsonl", [{"context": f"line {i}", "continuation": "end"} for i in range(3)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"context": f"row {i}", "continuation": "stop"} for i in range(3)])
    results = run / "eval" / "step_000003.json"
    assert evaluate_cli(run, first) == 0
    a_scores = json.loads(results.read_text())["tasks"]["a"]
    assert evaluate_cli(run, second) == 0
    merged = json.loads(results.read_text())["tasks"]
    assert sorted(merged) == ["a", "b"] and merged["a"] == a_scores
    assert evaluate_cli(run, second, "--limit", "2") == 0
    assert sorted(json.loads(results.read_text())["tasks"]) == ["b"]


def test_empty_continuation_is_malformed(tmp_path):
    for record in ({"context": "abc", "continuation": ""},
                   {"context_options": ["a", "b"], "continuation": "", "gold": 0}):
        path = write_jsonl(tmp_path / "empty.jsonl", [{**record, "continuation": "x"}, record])
        with pytest.raises(DataError, match=rf"^{path}:2: 'continuation' is empty$"):
            load_task(path)


# ---------------------------------------------------------------- the shared evaluation data


REAL_TASKS = {"arc_easy": ("multiple_choice", 2376), "boolq": ("multiple_choice", 3270),
              "copa": ("multiple_choice", 100), "lambada": ("continuation", 5153),
              "openbookqa": ("multiple_choice", 500), "piqa": ("multiple_choice", 1838)}


def test_reads_every_shared_eval_file():
    if not SHARED_EVAL.is_dir():
        pytest.skip(f"{SHARED_EVAL} is absent")
    for name, (fmt, count) in REAL_TASKS.items():
        task = load_task(name, SHARED_EVAL)
        assert (task.format, len(task.records)) == (fmt, count), name
    assert load_task("piqa", SHARED_EVAL).path.name == "piqa.jsonl"
    results = evaluate(tiny_model(64), BYTES, list(REAL_TASKS), data_dir=SHARED_EVAL, limit=3,
                       progress=False)["tasks"]
    for name in REAL_TASKS:
        assert results[name]["items"] == 3
        assert 0 <= results[name]["metrics"]["acc"]["value"] <= 1
