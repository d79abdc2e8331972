"""A run's report card: `report.md` and its loss plot, from what the run folder holds.

What was trained (model, parameters, FLOPs per token, tokenizer, data and token counts: config.yaml, data.json), how
(the recipe, each session's hardware and software: environment.json; wall time, tokens/s and MFU: metrics.jsonl), the
loss against steps, tokens and wall time, the final val loss and bits per byte, every evaluation found in the folder
(eval.json: benchmarks; stories.json: story quality; finetune.json: held-out loss and answer accuracy) and the last
sample (samples.txt). Several runs go side by side: one table, one plot with their curves overlaid.

Figures a folder does not hold (a run trained before environment.json existed, an imported model with no metrics)
are shown as "not recorded", never guessed.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.config import config_from_dict
from tinylm.errors import TinylmError
from tinylm.model.budget import architecture, model_budget
from tinylm.runs import (
    CONFIG_FILE,
    DATA_FILE,
    ENVIRONMENT_FILE,
    EVAL_RESULT_FILE,
    FINETUNE_CONFIG_FILE,
    FINETUNE_RESULT_FILE,
    METRICS_FILE,
    REPORT_FILE,
    SAMPLES_FILE,
    STORIES_REPORT_FILE,
    STORIES_RESULT_FILE,
    output_kind,
    read_json,
    read_yaml,
    write_atomically,
)

LOSS_FIGURE = "report-loss.png"
NOT_RECORDED = "not recorded"
RECIPE_KEYS = ("max_steps", "batch_size", "optimizer", "learning_rate", "schedule", "warmup_steps", "weight_decay")


@dataclass
class RunRecord:
    """Everything a report shows of one run folder (or fine-tune output)."""

    path: Path
    kind: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] | None = None
    sessions: list[dict[str, Any]] = field(default_factory=list)
    benchmarks: dict[str, Any] = field(default_factory=dict)
    stories: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    sample: str | None = None

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def tokens_per_step(self) -> int | None:
        if self.kind != "run":
            return None
        return self.config["train"]["batch_size"] * self.config["model"]["block_size"]

    def figures(self) -> dict[str, str]:
        """The run's figures as text, in the order of a report's tables."""
        train, evals = self.train_records, self.eval_records
        figures: dict[str, str] = {}
        if self.kind == "run":
            config = config_from_dict(self.config)
            budget = model_budget(config.model, config.train.batch_size)
            figures["model"] = architecture(config.model)
            figures["parameters"] = f"{budget.parameters:,}"
            figures["FLOPs per token"] = (
                f"{budget.forward_flops_per_token:,} forward, {budget.training_flops_per_token:,} training"
            )
            figures["tokenizer"] = f"{config.data.tokenizer}, vocabulary {config.model.vocab_size:,}"
            figures["data"] = config.data.source + (f" ({config.data.subset})" if config.data.subset else "")
            figures["data tokens"] = self.data_tokens()
        else:
            figures["base"] = str(self.config.get("base"))
            figures["method"] = f"{self.config.get('method', 'sft')}, {self.config.get('weights', 'lora')} weights"
            figures["data"] = str(self.config.get("data"))
            if self.finetune:
                figures["parameters trained"] = f"{self.finetune.get('trainable_parameters', 0):,}"
        steps = max((r["step"] for r in self.metrics), default=0)
        figures["steps"] = f"{steps:,}" if self.metrics else NOT_RECORDED
        if self.tokens_per_step:
            figures["tokens trained"] = f"{steps * self.tokens_per_step:,}"
        figures["recipe"] = ", ".join(
            f"{k} {self.config['train'][k]}" for k in RECIPE_KEYS if k in self.config["train"]
        )
        figures["hardware"] = (
            "; ".join(
                f"{s['hardware']} x {s['processes']}, {s['precision']} (from step {s['from_step']})"
                for s in self.sessions
            )
            or NOT_RECORDED
        )
        last = self.sessions[-1] if self.sessions else None
        figures["software"] = (
            f"python {last['python']}, torch {last['torch']}, tinylm {last['tinylm']}" if last else NOT_RECORDED
        )
        elapsed = max((r.get("elapsed_s", 0.0) for r in self.metrics), default=None)
        figures["wall time"] = f"{elapsed:,.1f} s" if elapsed else NOT_RECORDED
        speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
        figures["tokens/s"] = f"{statistics.median(speeds):,.0f} (median)" if speeds else NOT_RECORDED
        mfu = [r["mfu"] for r in train if "mfu" in r]
        figures["MFU"] = f"{statistics.median(mfu):.1%} (median)" if mfu else "not measured (device peak unknown)"
        if evals:
            best = min(evals, key=lambda r: r["val_loss"])
            figures["final val loss"] = f"{evals[-1]['val_loss']:.4f} nats/token (step {evals[-1]['step']:,})"
            figures["best val loss"] = f"{best['val_loss']:.4f} (step {best['step']:,})"
            bpb = self.bits_per_byte(evals[-1]["val_loss"])
            figures["final val bpb"] = f"{bpb:.4f}" if bpb is not None else NOT_RECORDED
        return figures

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if "loss" in r]

    @property
    def eval_records(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if "val_loss" in r]

    def data_tokens(self) -> str:
        if not self.data:
            return NOT_RECORDED
        return "; ".join(
            f"{split} {info['tokens']:,} tokens, {info['documents']:,} documents, {info['bytes']:,} bytes"
            for split, info in self.data["splits"].items()
        )

    def bits_per_byte(self, loss: float) -> float | None:
        """nats/token -> bits/byte with the val split's bytes per token (data.json)."""
        val = (self.data or {}).get("splits", {}).get("val")
        if not val or not val.get("bytes"):
            return None
        return loss / math.log(2) * val["tokens"] / val["bytes"]

    def evaluation_scores(self) -> dict[str, str]:
        """Every evaluation's headline numbers, one row each (for the side-by-side table)."""
        scores = {}
        for task, score in self.benchmarks.items():
            for metric, value in score["metrics"].items():
                if not metric.endswith("_stderr"):
                    scores[f"{task} {metric}"] = f"{value:.4f}"
        if self.stories:
            for name, value in flat_scores(self.stories["scores"]).items():
                scores[f"stories {name}"] = format_score(value)
        for name, (before, after) in before_and_after(self.finetune).items():
            scores[name] = f"{before:.4f} -> {after:.4f}"
        return scores


def before_and_after(finetune: dict[str, Any] | None) -> dict[str, tuple[float, float]]:
    """A fine-tune's held-out loss, answer accuracy and (DPO) preference accuracy and reward margin when measured,
    each before and after."""
    pairs = {}
    for key in ("held_out_loss", "answer_accuracy", "preference_accuracy", "reward_margin"):
        if finetune and finetune.get(f"{key}_before") is not None:
            pairs[key.replace("_", " ")] = (finetune[f"{key}_before"], finetune[f"{key}_after"])
    return pairs


def flat_scores(scores: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested scores as one level: {"judge": {"plot": 5}} -> {"judge.plot": 5}."""
    found = {}
    for name, value in scores.items():
        if isinstance(value, dict):
            found.update(flat_scores(value, f"{prefix}{name}."))
        else:
            found[prefix + name] = value
    return found


def format_score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def benchmark_table(scores: dict[str, dict[str, Any]]) -> str:
    """A markdown table of benchmark scores (eval.json's): one row per task and metric, its standard error beside
    it."""
    lines = ["| task | n-shot | examples | metric | value | ± stderr |", "|---|--:|--:|---|--:|--:|"]
    for task, score in scores.items():
        metrics = score["metrics"]
        for name, value in metrics.items():
            if name.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{name}_stderr")
            spread = f"{stderr:.4f}" if isinstance(stderr, float) else ""
            shots, examples = score.get("num_fewshot"), score.get("examples")
            lines.append(f"| {task} | {shots} | {examples} | {name} | {value:.4f} | {spread} |")
    return "\n".join(lines)


def read_run(path: str | Path) -> RunRecord:
    """What a run folder or fine-tune output holds, for the report."""
    folder = Path(path).expanduser()
    try:
        kind = output_kind(folder)
    except TinylmError:
        kind = None
    if kind not in ("run", "finetune"):
        raise TinylmError(f"{path} is not a run folder or fine-tune output; give the --out folder of a `tinylm train`")
    config = read_yaml(folder / (CONFIG_FILE if kind == "run" else FINETUNE_CONFIG_FILE))
    record = RunRecord(folder, kind, config)
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        record.metrics = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    optional = {name: folder / name for name in (DATA_FILE, ENVIRONMENT_FILE, EVAL_RESULT_FILE, STORIES_RESULT_FILE)}
    found = {name: read_json(path) for name, path in optional.items() if path.is_file()}
    record.data = found.get(DATA_FILE)
    record.sessions = found.get(ENVIRONMENT_FILE, {}).get("sessions", [])
    record.benchmarks = found.get(EVAL_RESULT_FILE, {}).get("benchmarks", {})
    record.stories = found.get(STORIES_RESULT_FILE)
    if (folder / FINETUNE_RESULT_FILE).is_file():
        record.finetune = read_json(folder / FINETUNE_RESULT_FILE)
    if (folder / SAMPLES_FILE).is_file():
        blocks = (folder / SAMPLES_FILE).read_text().strip().split("\n--- ")
        record.sample = blocks[-1].split("\n", 1)[-1].strip() if blocks[-1] else None
    return record


def write_report(runs: list[str | Path], out: str | Path | None = None, appendix: str = "") -> Path:
    """report.md and its plot for one run (into its folder, or `out`) or several side by side (into `out`), with the
    markdown `appendix` at the end (a pipeline's stage times and figures)."""
    if not runs:
        raise TinylmError("name at least one run folder")
    if len(runs) > 1 and out is None:
        raise TinylmError("several runs need a folder for their joint report: give --out DIR")
    records = [read_run(run) for run in runs]
    folder = Path(out).expanduser() if out is not None else records[0].path
    folder.mkdir(parents=True, exist_ok=True)
    plotted = plot_losses(records, folder / LOSS_FIGURE)
    text = single_report(records[0], plotted) if len(records) == 1 else joint_report(records, plotted)
    write_atomically(folder / REPORT_FILE, text + appendix)
    return folder / REPORT_FILE


def table(rows: dict[str, list[str]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join([name, *(v.replace("|", "\\|") for v in values)]) + " |" for name, values in rows.items()
    ]
    return lines


def single_report(run: RunRecord, plotted: bool) -> str:
    figures = run.figures()
    what = [key for key in figures if key not in ("recipe", "hardware", "software", "wall time", "tokens/s", "MFU")]
    lines = [f"# Report card: {run.name}", "", "## What was trained", ""]
    lines += table({key: [figures[key]] for key in what if "loss" not in key and "bpb" not in key}, ["", ""])
    lines += ["", "## How", ""]
    lines += table(
        {key: [figures[key]] for key in ("recipe", "hardware", "software", "wall time", "tokens/s", "MFU")}, ["", ""]
    )
    lines += ["", "## Loss", ""]
    lines += [f"![loss against steps, tokens and wall time]({LOSS_FIGURE})", ""] if plotted else []
    losses = {key: [figures[key]] for key in figures if "loss" in key or "bpb" in key}
    lines += table(losses, ["", ""]) if losses else [f"Loss curves: {NOT_RECORDED} ({METRICS_FILE} is missing)."]
    lines += evaluation_sections(run)
    if run.sample:
        lines += ["", "## Sample (best weights)", "", "```text", run.sample, "```"]
    return "\n".join(lines) + "\n"


def evaluation_sections(run: RunRecord) -> list[str]:
    lines = []
    if run.benchmarks:
        lines += ["", f"## Benchmarks ({EVAL_RESULT_FILE})", "", benchmark_table(run.benchmarks)]
    if run.stories:
        scores = {name: [format_score(value)] for name, value in flat_scores(run.stories["scores"]).items()}
        lines += ["", f"## Story quality ({STORIES_RESULT_FILE})", ""]
        lines += [
            f"{len(run.stories['stories'])} completions of the TinyStories evaluation prompts; read them in "
            f"[{STORIES_REPORT_FILE}]({STORIES_REPORT_FILE}).",
            "",
        ]
        lines += table(scores, ["score", "value"])
    if run.finetune:
        rows = {
            name: [f"{before:.4f}", f"{after:.4f}"] for name, (before, after) in before_and_after(run.finetune).items()
        }
        lines += ["", f"## Fine-tune ({FINETUNE_RESULT_FILE})", "", *table(rows, ["", "before", "after"])]
    return lines


def joint_report(runs: list[RunRecord], plotted: bool) -> str:
    names = [run.name for run in runs]
    every = [run.figures() | run.evaluation_scores() for run in runs]
    keys = list(dict.fromkeys(key for figures in every for key in figures))
    lines = [f"# Report card: {', '.join(names)}", ""]
    lines += table({key: [figures.get(key, "") for figures in every] for key in keys}, ["", *names])
    if plotted:
        lines += ["", "## Loss", "", f"![loss of every run against steps, tokens and wall time]({LOSS_FIGURE})"]
    return "\n".join(lines) + "\n"


def plot_losses(runs: list[RunRecord], path: Path) -> bool:
    """The loss against steps, tokens and wall time, every run overlaid; False (and no file) without matplotlib or
    without any metrics."""
    if not any(run.metrics for run in runs):
        return False
    try:
        from matplotlib.figure import Figure  # a Figure of its own: no window, a notebook's backend left alone
    except ImportError:
        return False
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    axes = figure.subplots(1, 3, sharey=True)
    colors = [f"C{i}" for i in range(10)]
    for index, run in enumerate(runs):
        color, per_step = colors[index % 10], run.tokens_per_step
        for records, key, style, label in (
            (run.train_records, "loss", {"lw": 0.8, "alpha": 0.5}, "train"),
            (run.eval_records, "val_loss", {"marker": "o", "ms": 3}, "val"),
        ):
            steps = [r["step"] for r in records]
            values = [r[key] for r in records]
            name = f"{run.name} {label}" if len(runs) > 1 else label
            axes[0].plot(steps, values, color=color, label=name, **style)
            if per_step:
                axes[1].plot([s * per_step for s in steps], values, color=color, **style)
            timed = [(r["elapsed_s"], r[key]) for r in records if "elapsed_s" in r]
            axes[2].plot([t for t, _ in timed], [v for _, v in timed], color=color, **style)
    for ax, label in zip(axes, ("step", "tokens", "wall time (s)")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    write_atomically(path, png.getvalue())
    return True
