"""Cross-check with lm-evaluation-harness: its ``hf`` backend on an exported normlab model gives
the same per-choice log-likelihoods and the same accuracy as ``normlab evaluate``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from normlab import ModelConfig, build_model
from normlab.data import ByteTokenizer, train_bpe
from normlab.eval import encode_pair, evaluate, load_task, score

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _items(n: int) -> list[dict]:
    """COPA items when the shared data is there (real text, trailing punctuation), else made up."""
    source = SHARED_EVAL / "copa" / "copa.jsonl"
    if source.is_file():
        return [json.loads(line) for line in source.read_text().splitlines()[:n]]
    return [{"query": f"Item {i} says that the sky is", "choices": ["blue today.", "not green, or red", "x"],
             "gold": i % 3} for i in range(n)]


def _lm_eval_samples(export_dir: Path, task_dir: Path, name: str, monkeypatch, tmp_path) -> dict:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={export_dir},trust_remote_code=True,dtype=float32",
                          tasks=[name], task_manager=TaskManager(include_path=str(task_dir)), batch_size=4,
                          device="cpu", log_samples=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy,tokenizer_kind", [("hybridnorm_star", "byte"), ("pre_norm", "bpe")])
def test_lm_eval_matches_normlab_evaluate(strategy, tokenizer_kind, tmp_path, monkeypatch):
    from normlab.hf import export

    items = _items(24)
    if tokenizer_kind == "byte":
        tokenizer = ByteTokenizer()
    else:
        texts = [item["query"] + " " + choice for item in items for choice in item["choices"]]
        tokenizer = train_bpe(texts * 4, 300)
    pairs = [encode_pair(tokenizer, item["query"], " " + choice) for item in items for choice in item["choices"]]
    longest_continuation = max(len(r.continuation) for r in pairs)
    longest = max(len(r.context) + len(r.continuation) for r in pairs)
    max_seq_len = longest_continuation + 4  # every continuation fits (lm-eval requires it) ...
    assert max_seq_len < longest  # ... and some inputs are cut on the left
    cfg = ModelConfig.from_strategy(strategy, vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2,
                                    n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len)
    model = build_model(cfg, seed=3).eval()
    with torch.no_grad():  # gains away from 1 so that every norm matters
        for p in model.parameters():
            if p.ndim <= 1:
                p.mul_(1.5)
    export_dir = tmp_path / "export"
    export(model, export_dir, tokenizer, format="auto")

    data = tmp_path / "local_mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "local_mc.yaml").write_text(TASK_YAML.format(name="local_mc", path=data))
    theirs = _lm_eval_samples(export_dir, task_dir, "local_mc", monkeypatch, tmp_path)

    ours = evaluate(model, tokenizer, [str(data)], batch_size=5, progress=False)["tasks"]["local_mc"]
    assert ours["items"] == len(items)
    assert ours["truncated"] > 0, "the test should cover inputs cut to max_seq_len"
    for metric in ("acc", "acc_norm"):
        assert ours["metrics"][metric]["value"] == pytest.approx(theirs["results"]["local_mc"][f"{metric},none"])
        assert ours["metrics"][metric]["stderr"] == pytest.approx(
            theirs["results"]["local_mc"][f"{metric}_stderr,none"])

    task = load_task(data)
    requests = [[encode_pair(tokenizer, c, x) for c, x in task.pairs(i)] for i in range(len(items))]
    our_scores = score(model, requests, batch_size=3, progress=False)
    for sample in theirs["samples"]["local_mc"]:
        their_logliks = [resp[0][0] for resp in sample["resps"]]
        mine = [s.loglik for s in our_scores[sample["doc_id"]]]
        assert all(math.isfinite(v) for v in mine)
        assert mine == pytest.approx(their_logliks, abs=2e-4, rel=1e-5), sample["doc_id"]
