"""Zero- and few-shot evaluation: multiple choice (ARC, PIQA, COPA, ...), partial scoring
(WinoGrande), continuation accuracy and perplexity (LAMBADA), and plain-text perplexity, scored
with lm-evaluation-harness's log-likelihood convention.

>>> results = evaluate(model, tokenizer, ["arc_easy", "my/task.jsonl"], data_dir="data/eval")
>>> results["tasks"]["arc_easy"]["metrics"]["acc"]  # {"value": ..., "stderr": ...}
"""

from normlab.eval.harness import default_results_path, evaluate, evaluate_run
from normlab.eval.scoring import Request, Score, encode_pair, rolling_windows, score
from normlab.eval.tasks import FORMATS, Task, find_task, load_task

__all__ = [
    "FORMATS", "Request", "Score", "Task", "default_results_path", "encode_pair", "evaluate",
    "evaluate_run", "find_task", "load_task", "rolling_windows", "score",
]
