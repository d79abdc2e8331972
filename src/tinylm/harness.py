"""Benchmarks through lm-evaluation-harness (the optional extra: `pip install 'tinylm[eval]'`): HellaSwag, ARC,
MMLU, GSM8K, ... or any task YAML of the user's own, scored the same way for every model `tinylm.load` takes.

`TinylmLM` is lm-eval's model interface on top of a `Run`:
- `loglikelihood`: lm-eval's own tokenization of (context, continuation) pairs (TemplateLM), scored in right-padded
  batches by `evaluate.continuation_logprobs`, cut as lm-eval's `hf` model cuts them; the answers to one context
  read it once (its KV cache repeated for each), which is what makes multiple-choice tasks faster than `hf`;
- `loglikelihood_rolling`: lm-eval's disjoint windows of the model's context over a whole text, scored the same way;
- `generate_until`: tinylm's batched, KV-cached sampling (`Run.stream_ids`), cut before the first `until` string.

It is registered as lm-eval's model `tinylm`; lm-eval finds models only among its own modules or those imported
before it runs (it reads no entry points), so its command line is reached through this module:

    python -m tinylm.harness run --model tinylm --model_args pretrained=out/tinystories --tasks hellaswag
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from tinylm.config import SampleConfig
from tinylm.errors import TinylmError
from tinylm.evaluate import continuation_logprobs
from tinylm.report import benchmark_table
from tinylm.run import Run, load
from tinylm.runs import EVAL_RESULT_FILE, results_folder, update_json

DEFAULT_BATCH_SIZE = 16
GENERATION_SEED = 1234
"""Seed of sampled generations (tasks whose generation_kwargs set do_sample), so a rerun gives the same scores."""


@register_model("tinylm")
class TinylmLM(TemplateLM):
    """lm-eval's model interface for any model `tinylm.load` takes (`--model_args pretrained=PATH`)."""

    def __init__(
        self,
        pretrained: str | Run,
        device: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,  # lm-eval's command line passes it; tinylm's batches have one fixed size
    ):
        super().__init__()
        self.run = pretrained if isinstance(pretrained, Run) else load(pretrained, device or "auto")
        # lm-eval's "auto" asks the model to find its largest batch; a fixed size is what tinylm offers.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        if self.batch_size < 1:
            raise TinylmError(f"--batch-size must be at least 1, not {batch_size}")

    @property
    def eot_token_id(self) -> int:
        return self.run.tokenizer.end_of_text

    @property
    def max_length(self) -> int:
        return self.run.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.run.tokenizer.encode(string)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        answers = continuation_logprobs(self.run.model, [(c, x) for _, c, x in requests], self.batch_size)
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), self.eot_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests that share their generation settings are sampled together, batch_size prompts at a time, longest
        first: a batch's prompts advance in lockstep from its shortest one, so prompts of like lengths waste the
        fewest one-token steps."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        answers = [""] * len(requests)
        for indices in groups.values():
            sampling, max_new_tokens = self._sampling(requests[indices[0]].args[1])
            prompts = {i: self._prompt(requests[i].args[0], max_new_tokens) for i in indices}
            indices = sorted(indices, key=lambda i: -len(prompts[i]))
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first : first + self.batch_size]
                for piece in self.run.stream_ids([prompts[i] for i in chunk], sampling):
                    answers[chunk[piece.row]] += piece.text
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", request.args, answer)
        return answers

    def _sampling(self, options: dict[str, Any]) -> tuple[SampleConfig, int]:
        """The sampling settings of a task's generation_kwargs (greedy unless do_sample; no other filter than a
        task's top_p) and its max_gen_toks."""
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(options.get("max_gen_toks", 256))
        sampling = self.run.sampling(
            max_new_tokens=max_new_tokens,
            temperature=float(options.get("temperature", 1.0)) if options.get("do_sample") else 0.0,
            top_k=None,
            top_p=float(options.get("top_p", 1.0)),
            min_p=0.0,
            repetition_penalty=1.0,
            stop=[stop for stop in until if stop],
            seed=GENERATION_SEED,
        )
        return sampling, max_new_tokens

    def _prompt(self, context: str, max_new_tokens: int) -> list[int]:
        """The context's ids, cut on the left to leave room for the answer (an empty one becomes end-of-text)."""
        ids = self.tok_encode(context)[-max(self.max_length - max_new_tokens, 1) :]
        return ids or [self.eot_token_id]


@dataclass
class BenchmarkResult:
    scores: dict[str, dict[str, Any]]
    """Per task: its metrics (acc, acc_norm, exact_match, ... and their stderr), n-shot and examples scored."""
    samples: dict[str, list[dict[str, Any]]]
    """Per task, with log_samples: every example's requests and the model's answers (lm-eval's records)."""

    def record(self) -> dict[str, Any]:
        return {"lm_eval": lm_eval.__version__, "benchmarks": self.scores}

    def table(self) -> str:
        return benchmark_table(self.scores)


def benchmark(
    model: str | Run,
    tasks: Sequence[str],
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    include_path: Sequence[str] = (),
    log_samples: bool = False,
) -> BenchmarkResult:
    """Score `model` on lm-eval `tasks`: task or group names, task YAML files, or folders of task YAMLs (every task
    in them); `include_path` adds folders of YAMLs whose tasks can then be named."""
    if not tasks:
        raise TinylmError("--tasks is empty; name lm-eval tasks (e.g. hellaswag,arc_easy) or task YAML files")
    if limit is not None and limit < 1:
        raise TinylmError(f"--limit must be at least 1, not {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise TinylmError(f"--num-fewshot must be at least 0, not {num_fewshot}")
    folders = [str(Path(folder).expanduser()) for folder in include_path]
    for folder in folders:
        if not Path(folder).is_dir():
            raise TinylmError(f"--include-path {folder} is not a folder of task YAML files")
    files = [Path(task).expanduser() for task in tasks if Path(task).expanduser().exists()]
    folders += [str(path if path.is_dir() else path.parent) for path in files]
    # Indexing lm-eval's thousands of built-in YAMLs takes seconds: skipped when every task is a file of the user's.
    manager = TaskManager(include_path=folders or None, include_defaults=len(files) < len(tasks))
    names = [name for task in tasks for name in task_names(manager, task)]
    lm = TinylmLM(model, batch_size=batch_size)
    try:
        results = simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=log_samples
        )
    except ConnectionError as error:  # datasets' "Couldn't reach 'owner/name' on the Hub", offline or unreachable
        raise TinylmError(hub_failure(manager, names, error)) from None
    scores = {
        task: {
            "metrics": {
                key.removesuffix(",none"): value
                for key, value in metrics.items()
                if key not in ("alias", "sample_len") and isinstance(value, int | float)
            },
            "num_fewshot": results["n-shot"].get(task),
            "examples": results["n-samples"].get(task, {}).get("effective"),
            "limit": limit,
        }
        for task, metrics in results["results"].items()
    }
    return BenchmarkResult(scores, results.get("samples", {}))


def save_benchmarks(result: BenchmarkResult, model: str, out: str | None = None) -> Path | None:
    """Merge the scores into eval.json of `results_folder(model, out)`; the file written, or None where there is
    no folder to write into."""
    folder = results_folder(model, out)
    if folder is None:
        return None
    record = result.record()
    update_json(folder / EVAL_RESULT_FILE, "benchmarks", record["benchmarks"], lm_eval=record["lm_eval"])
    return folder / EVAL_RESULT_FILE


def task_names(manager: TaskManager, task: str) -> list[str]:
    """lm-eval's names for one --tasks entry: a task/group name, a YAML file's task, or every task of a folder."""
    path = Path(task).expanduser()
    if path.is_dir():
        found = [
            name
            for name, entry in manager.task_index.items()
            if entry.yaml_path and path.resolve() in Path(entry.yaml_path).resolve().parents
        ]
        if not found:
            raise TinylmError(f"{task} holds no lm-eval task YAML (a file with a `task:` name)")
        return sorted(found)
    if path.is_file():
        found = [
            name
            for name, entry in manager.task_index.items()
            if entry.yaml_path and Path(entry.yaml_path).resolve() == path.resolve()
        ]
        if not found:
            raise TinylmError(f"{task} is not an lm-eval task YAML: it needs a `task:` name (and dataset and prompts)")
        return found
    if task not in manager.all_tasks:
        close = manager.match_tasks([task]) or [n for n in manager.all_tasks if task.lower() in n.lower()][:5]
        hint = f"; did you mean {', '.join(close)}" if close else ""
        raise TinylmError(f"no lm-eval task, group or file named '{task}'{hint}? (`lm_eval ls tasks` lists them)")
    return [task]


def hub_failure(manager: TaskManager, names: list[str], error: Exception) -> str:
    """One line naming the task and the dataset it could not fetch."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    culprit = next((name for name in names if manager.task_index[name].cfg.get("dataset_path") in reason), None)
    if culprit is None:
        culprit = next(
            (name for name in names if manager.task_index[name].cfg.get("dataset_path") not in (None, "json", "csv")),
            names[0],
        )
    dataset = manager.task_index[culprit].cfg.get("dataset_path") or "its dataset"
    return (
        f"task '{culprit}' needs the dataset {dataset} from the Hugging Face hub, which cannot be reached ({reason}); "
        "go online once (datasets caches it), or evaluate on local files with a task YAML (--tasks FILE.yaml)"
    )


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the `tinylm` model registered (see the module docstring)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
