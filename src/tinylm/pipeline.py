"""One pipeline: from text to an exported chat model in one command, each stage resumable and skipped once done.

    tinylm pipeline configs/pipeline-tinystories-cpu.yaml [--out DIR] [--from STAGE] [--overwrite] [--KEY VALUE ...]

    tokenizer   prepare the pretraining text: train the tokenizer, write the token shards   OUT/tokenizer/
    pretrain    train the model of a train recipe                                           OUT/pretrain/
    sft         instruction fine-tuning of it (`tinylm finetune`, merged into model/)       OUT/sft/
    preference  preference tuning (method dpo) of the model so far                          OUT/preference/
    rl          reinforcement learning (method grpo) of the model so far                    OUT/rl/
    eval        bits per byte of every model; story quality and chat replies of the last    OUT/eval/
    report      the trained stages' report cards side by side, with the stage times         OUT/report/
    export      the last model as a GGUF file and/or a Hugging Face folder                  OUT/export/

A recipe (`PipelineConfig`) gives each stage's settings; a fine-tuning stage it leaves out (null) is not run. Each
stage calls the library function of the verb it stands for (prepare, train, finetune, Run.evaluate,
evaluate_stories, write_report, export_gguf, export_hf), so its folder is what that verb writes. `pipeline.json`
records each stage's settings, whether it finished, its seconds and its figures.

Run again, the pipeline skips each stage that finished with the same settings and whose output is still there,
continues an interrupted training stage from its last checkpoint, and runs every stage after one it ran (their input
changed). A stage whose settings changed since it ran is refused before anything runs: `start_from` (`--from`) runs
it and every later stage again, `overwrite` every stage. Everything a recipe says is checked before the first stage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm  # widgets in notebooks, text bars elsewhere

from tinylm.config import (
    Config,
    FinetuneConfig,
    PipelineConfig,
    finetune_config_from_dict,
    pipeline_config_from_dict,
)
from tinylm.data.instructions import check_instruction_data
from tinylm.data.prepare import META_FILE, prepare
from tinylm.errors import TinylmError
from tinylm.gguf_export import export_gguf, gguf_architecture
from tinylm.hf import export_hf, hf_family
from tinylm.recipes import load_config
from tinylm.report import before_and_after, flat_scores, format_score, table, write_report
from tinylm.run import load
from tinylm.runs import (
    FINETUNE_RESULT_FILE,
    MERGED_MODEL_FOLDER,
    PIPELINE_FILE,
    REPORT_FILE,
    STORIES_REPORT_FILE,
    OutputKind,
    check_output,
    is_run,
    output_kind,
    read_json,
    read_yaml,
    remove_stale_staging,
    staged,
    write_json,
)
from tinylm.stories import evaluate_stories, quote, save_stories
from tinylm.training import FINETUNE_TASKS, finetune, train
from tinylm.training.checkpoint import latest_checkpoint
from tinylm.training.tasks.sft import check_finetune_config

FINETUNE_STAGES = {"sft": "sft", "preference": "dpo", "rl": "grpo"}
"""The fine-tuning stages in the order they run, each with its default method."""
SET_BY_PIPELINE = {
    "base": "each fine-tune starts from the model of the stage before it",
    "out": "each stage writes its own folder of the pipeline",
    "merge": "each fine-tune is merged into model/, which the next stage and the export take",
    "bits": "the pipeline's models are tinylm runs, trained in full precision",
}
"""Fine-tuning keys a pipeline recipe may not set, and why."""
RESULTS_FILE = "results.json"
"""The eval stage's figures and chat replies, in eval/."""
UNCOMPARED = ("out", "base", "data_dir", "num_proc")
"""Settings of a stage that a later run of the pipeline may change without running it again."""
GGUF_FILE = "model.gguf"
HF_FOLDER = "hf"


def load_pipeline_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A PipelineConfig from a YAML recipe and dotted overrides (`{"sft.train.max_steps": 50, "out": "out/x"}`). A
    relative path of the train recipe that `pretrain` names is read from the pipeline recipe's folder."""
    values: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise TinylmError(f"pipeline recipe not found: {recipe} (see configs/pipeline-*.yaml for examples)")
        values = read_yaml(path)
        if isinstance(values.get("pretrain"), str):
            values["pretrain"] = {"recipe": values["pretrain"]}
        pretrain = values.get("pretrain")
        if isinstance(pretrain, dict) and isinstance(pretrain.get("recipe"), str):
            pretrain["recipe"] = str(path.parent / Path(pretrain["recipe"]).expanduser())
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise TinylmError(f"cannot set {dotted}: {section} is {target!r} in the recipe, not a section of keys")
        target[key] = value
    return pipeline_config_from_dict(values)


@dataclass
class Stage:
    name: str
    folder: Path
    settings: dict[str, Any]
    """What the stage runs with, as JSON: recorded in pipeline.json, and compared when the pipeline runs again."""
    run: Callable[[bool], tuple[dict[str, Any], str]]
    """Runs the stage (True: from the start, replacing what an earlier attempt left) and returns its figures and a
    one-line summary of them."""
    complete: Callable[[dict[str, Any]], bool]
    """Whether the stage's output, whose figures were recorded, is still whole."""


@dataclass
class StageOutcome:
    name: str
    ran: bool
    """False: skipped, done by an earlier run."""
    seconds: float
    """Wall-clock seconds of the run that did the stage."""
    summary: str


@dataclass
class PipelineResult:
    out: Path
    stages: list[StageOutcome]

    def table(self) -> str:
        """Each stage's seconds and figures, and the total, as aligned lines of text."""
        width = max(len("stage"), *(len(stage.name) for stage in self.stages))
        lines = [f"{'stage':<{width}}  {'seconds':>8}  {'':<7}  figures"]
        for stage in self.stages:
            done = "ran" if stage.ran else "skipped"
            lines.append(f"{stage.name:<{width}}  {stage.seconds:>8.1f}  {done:<7}  {stage.summary}")
        lines.append(f"{'total':<{width}}  {sum(stage.seconds for stage in self.stages):>8.1f}")
        return "\n".join(lines)


def run_pipeline(config: PipelineConfig, overwrite: bool = False, start_from: str | None = None) -> PipelineResult:
    """Run the pipeline `config` describes into `config.out` (see the module docstring): the stages not done yet, or
    with `start_from` that stage and every later one, with `overwrite` every stage."""
    return Pipeline(config).run(overwrite, start_from)


class Pipeline:
    """A PipelineConfig resolved into its stages, every setting checked: nothing is written until `run`."""

    def __init__(self, config: PipelineConfig):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TinylmError("run tinylm pipeline as one process; torchrun is for `tinylm train` and `finetune`")
        self.config, self.out = config, Path(config.out).expanduser()
        self.pretrain = pretrain_config(config.pretrain, self.out)
        self.trained = {"pretrain": self.out / "pretrain"}
        """Each training stage's output folder (a run, or a fine-tune whose model/ is a run), in order."""
        self.finetunes: dict[str, FinetuneConfig] = {}
        for name, method in FINETUNE_STAGES.items():
            section = getattr(config, name)
            if section is not None:
                base = self.model_of(list(self.trained)[-1])
                self.finetunes[name] = finetune_stage_config(section, name, method, base, self.out / name)
                self.trained[name] = self.out / name
        self.final = list(self.trained)[-1]
        check_exportable(config, self.pretrain)
        evaluation = config.eval
        if evaluation.stories < 0 or evaluation.max_new_tokens < 1:
            raise TinylmError("eval.stories must be 0 or more and eval.max_new_tokens at least 1")
        self.records: dict[str, dict[str, Any]] = {}
        """pipeline.json's record of each stage, by name."""

    def model_of(self, stage: str) -> Path:
        """The run folder of a training stage's model: the pretraining run, or a fine-tune's merged model/."""
        return self.trained[stage] / (MERGED_MODEL_FOLDER if stage in FINETUNE_STAGES else "")

    def stages(self) -> list[Stage]:
        data = self.pretrain.data
        stages = [
            Stage("tokenizer", Path(data.data_dir), without(asdict(data), *UNCOMPARED), self.prepare_data, prepared),
            Stage(
                "pretrain",
                self.trained["pretrain"],
                without(self.pretrain.to_dict(), *UNCOMPARED),
                self.run_pretrain,
                lambda figures: is_run(self.trained["pretrain"]),
            ),
        ]
        for name, config in self.finetunes.items():
            stages.append(
                Stage(
                    name,
                    self.trained[name],
                    without(asdict(config), *UNCOMPARED),
                    lambda fresh, config=config: self.run_finetune(config, fresh),
                    lambda figures, name=name: finetune_done(self.trained[name]),
                )
            )
        eval_folder = self.out / "eval"
        stages.append(
            Stage(
                "eval",
                eval_folder,
                asdict(self.config.eval),
                self.evaluate,
                lambda figures: (eval_folder / RESULTS_FILE).is_file(),
            )
        )
        if self.config.report:
            report = self.out / "report" / REPORT_FILE
            stages.append(Stage("report", report.parent, {}, self.report, lambda figures: report.is_file()))
        export = self.config.export
        if export.gguf is not None or export.hf:
            stages.append(
                Stage(
                    "export",
                    self.out / "export",
                    asdict(export),
                    self.export,
                    lambda figures: all(Path(path).exists() for path in figures.values()),
                )
            )
        return stages

    def run(self, overwrite: bool = False, start_from: str | None = None) -> PipelineResult:
        stages = self.stages()
        names = [stage.name for stage in stages]
        if start_from is not None and start_from not in names:
            raise TinylmError(f"--from {start_from}: this pipeline's stages are {', '.join(names)}")
        remove_stale_staging(self.out.parent, self.out.name)
        check_output(self.out, "pipeline", overwrite=True)  # nothing there yet, or a pipeline to go on with
        remove_stale_staging(self.out)  # what a killed stage left half-staged (eval/, report/)
        state = read_json(self.out / PIPELINE_FILE) if output_kind(self.out) == "pipeline" else {"stages": {}}
        recorded = state.get("stages") if isinstance(state.get("stages"), dict) else {}
        self.records = {name: record for name, record in recorded.items() if isinstance(record, dict)}
        actions = self.plan(stages, overwrite, start_from)
        outcomes = []
        for index, (stage, action) in enumerate(zip(stages, actions)):
            if action == "skip":
                record = self.records[stage.name]
                tqdm.write(f"tinylm: {stage.name}: done already in {stage.folder}, skipped")
                outcomes.append(StageOutcome(stage.name, False, record.get("seconds", 0.0), record.get("summary", "")))
                continue
            for later in names[index:]:  # what follows this stage was made from its old output
                self.records.pop(later, None)
            self.records[stage.name] = {"settings": stage.settings, "done": False}
            self.save()
            tqdm.write(f"tinylm: {stage.name} -> {stage.folder}")
            began = time.perf_counter()
            try:
                figures, summary = stage.run(action == "fresh")
            except TinylmError as error:
                kept = f"the stages before it are kept, and the pipeline run again starts from {stage.name}"
                raise TinylmError(f"{stage.name}: {error}; {kept}") from None
            seconds = round(time.perf_counter() - began, 1)
            record = {"settings": stage.settings, "done": True, "seconds": seconds, "summary": summary}
            self.records[stage.name] = {**record, "figures": figures}
            self.save()
            tqdm.write(f"tinylm: {stage.name} done in {seconds:.1f} s: {summary}")
            outcomes.append(StageOutcome(stage.name, True, seconds, summary))
        return PipelineResult(self.out, outcomes)

    def plan(self, stages: list[Stage], overwrite: bool, start_from: str | None) -> list[str]:
        """Per stage: `skip` (done, output there), `continue` (not done: resume a training stage), or `fresh` (run
        from the start: asked for, or after a stage that runs). A stage recorded with other settings than the
        recipe's, which would be skipped or continued, is refused here, before anything runs."""
        actions: list[str] = []
        rerun = overwrite
        for stage in stages:
            rerun = rerun or stage.name == start_from
            record = self.records.get(stage.name)
            if rerun:
                actions.append("fresh")
                continue
            if record is not None:
                changed = first_difference(record.get("settings", {}), json.loads(json.dumps(stage.settings)))
                if changed:
                    did = "ran" if record.get("done") else "was started"
                    raise TinylmError(
                        f"{stage.name} in {self.out} {did} with {changed}; pass --from {stage.name} to run it and the "
                        "stages after it again, or choose another --out"
                    )
                if record.get("done") and stage.complete(record.get("figures", {})):
                    actions.append("skip")
                    continue
            actions.append("continue")
            rerun = True
        return actions

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / PIPELINE_FILE, {"recipe": asdict(self.config), "stages": self.records})

    # --- The stages ---------------------------------------------------------------------------------------------

    def prepare_data(self, fresh: bool) -> tuple[dict[str, Any], str]:
        data = prepare(self.pretrain.data, force=fresh)
        meta = data.meta
        tokens = {f"{split}_tokens": info["tokens"] for split, info in meta["splits"].items()}
        figures = {"folder": str(data.folder), "tokenizer": meta["tokenizer"]["spec"], "vocab_size": meta["vocab_size"]}
        counts = ", ".join(f"{count:,} {name.replace('_', ' ')}" for name, count in tokens.items())
        return {**figures, **tokens}, f"{figures['tokenizer']}, vocabulary {meta['vocab_size']:,}; {counts}"

    def run_pretrain(self, fresh: bool) -> tuple[dict[str, Any], str]:
        result = continue_or_start(
            self.trained["pretrain"], "run", fresh, lambda **start: train(self.pretrain, **start)
        )
        figures = {"steps": result.steps, **result.best, "training_s": result.elapsed_s}
        return figures, f"best val loss {result.best_val_loss:.4f} after {result.steps:,} steps"

    def run_finetune(self, config: FinetuneConfig, fresh: bool) -> tuple[dict[str, Any], str]:
        result = continue_or_start(Path(config.out), "finetune", fresh, lambda **start: finetune(config, **start))
        figures = {key: value for key, value in asdict(result).items() if key != "out" and value is not None}
        changes = [f"{name} {before:.4f} -> {after:.4f}" for name, (before, after) in before_and_after(figures).items()]
        return figures, f"{', '.join(changes)} after {result.steps:,} steps"

    def evaluate(self, fresh: bool) -> tuple[dict[str, Any], str]:
        """Bits per byte of every trained model on the pretraining text's held-out split; the final model's stories
        and chat replies; each fine-tune's answer accuracy (when its data has final answers)."""
        settings, results, summary = self.config.eval, {}, []
        sampling = {"max_new_tokens": settings.max_new_tokens}
        with staged(self.out / "eval") as staging:
            if settings.bits_per_byte:
                results["bits_per_byte"] = {
                    name: load(self.model_of(name)).evaluate("val", self.pretrain.data).bpb for name in self.trained
                }
                summary.append(
                    "val bits per byte " + ", ".join(f"{n} {v:.4f}" for n, v in results["bits_per_byte"].items())
                )
            final = load(self.model_of(self.final))
            if settings.stories:
                stories = evaluate_stories(final, sampling=sampling, limit=settings.stories)
                save_stories(stories, str(final.path), out=staging)
                results["stories"] = stories.scores
                summary.append(f"{len(stories.stories)} stories, distinct-2 {stories.scores['distinct_2']:.3f}")
            accuracy = {
                name: read_json(folder / FINETUNE_RESULT_FILE).get("answer_accuracy_after")
                for name, folder in self.trained.items()
                if name in self.finetunes
            }
            results["answer_accuracy"] = {name: value for name, value in accuracy.items() if value is not None}
            if final.chat is not None:
                replies = [final.reply([{"role": "user", "content": request}], **sampling) for request in settings.chat]
                results["chat"] = [{"request": q, "reply": a} for q, a in zip(settings.chat, replies)]
            write_json(staging / RESULTS_FILE, results)
        figures = {key: value for key, value in results.items() if key != "chat"}
        return figures, "; ".join(summary) or "nothing measured"

    def report(self, fresh: bool) -> tuple[dict[str, Any], str]:
        folder = self.out / "report"
        with staged(folder) as staging:
            write_report(list(self.trained.values()), staging, self.report_appendix())
        return {"report": str(folder / REPORT_FILE)}, str(folder / REPORT_FILE)

    def report_appendix(self) -> str:
        """The report's pipeline section: each stage's seconds and summary, the eval stage's figures and replies."""
        done = {name: record for name, record in self.records.items() if record.get("done")}
        stages = {name: [f"{record['seconds']:.1f}", record["summary"]] for name, record in done.items()}
        lines = [
            "",
            "## Pipeline",
            "",
            f"The stages run before this report ([{PIPELINE_FILE}](../{PIPELINE_FILE}) has all):",
        ]
        lines += [""]
        lines += table(stages, ["stage", "seconds", "figures"])
        results_path = self.out / "eval" / RESULTS_FILE
        results = read_json(results_path) if results_path.is_file() else {}
        if results.get("bits_per_byte"):
            rows = {name: [f"{value:.4f}"] for name, value in results["bits_per_byte"].items()}
            lines += ["", "## Bits per byte on the held-out text", "", *table(rows, ["model", "val bits per byte"])]
        if results.get("stories"):
            rows = {name: [format_score(value)] for name, value in flat_scores(results["stories"]).items()}
            lines += ["", f"## Story quality of {self.final}", ""]
            lines += [f"Read the stories in [eval/{STORIES_REPORT_FILE}](../eval/{STORIES_REPORT_FILE}).", ""]
            lines += table(rows, ["score", "value"])
        for name, value in results.get("answer_accuracy", {}).items():
            lines += ["", f"Answer accuracy of {name} on its held-out examples: {value:.1%}."]
        if results.get("chat"):
            lines += ["", f"## Chat with {self.final}"]
            for turn in results["chat"]:
                lines += ["", f"**User:** {turn['request']}", "", "**Assistant:**", "", quote(turn["reply"])]
        return "\n".join(lines) + "\n"

    def export(self, fresh: bool) -> tuple[dict[str, Any], str]:
        export, final, folder = self.config.export, self.model_of(self.final), self.out / "export"
        written = {}
        if export.gguf is not None:
            written["gguf"] = str(export_gguf(final, folder / GGUF_FILE, export.gguf.quant, overwrite=True))
        if export.hf:
            written["hf"] = str(export_hf(final, folder / HF_FOLDER, overwrite=True))
        return written, ", ".join(written.values())


# --- Resolving and checking the recipe --------------------------------------------------------------------------------


def pretrain_config(section: str | dict[str, Any], out: Path) -> Config:
    """The pretraining run's Config: the train recipe `section` names (its `recipe` key) with its other keys on top,
    written into out/pretrain, its data prepared into out/tokenizer unless it names a data_dir of its own."""
    values = {"recipe": section} if isinstance(section, str) else dict(section)
    recipe = values.pop("recipe", None)
    if "out" in values:
        raise TinylmError("pretrain.out is set by the pipeline (its pretrain/ folder); remove it")
    overrides: dict[str, Any] = {}
    for name, keys in values.items():
        overrides.update(
            {f"{name}.{key}": value for key, value in keys.items()} if isinstance(keys, dict) else {name: keys}
        )
    try:
        config = load_config(recipe, overrides)
    except TinylmError as error:
        raise TinylmError(f"pretrain: {error}") from None
    data = config.data if config.data.data_dir else replace(config.data, data_dir=str(out / "tokenizer"))
    return replace(config, data=data, out=str(out / "pretrain"))


def finetune_stage_config(section: Any, name: str, method: str, base: Path, out: Path) -> FinetuneConfig:
    """The FinetuneConfig of a fine-tuning stage: the section's keys, its base the model of the stage before, its
    output merged into out/model."""
    if not isinstance(section, dict):
        raise TinylmError(f"{name} must be a mapping of `tinylm finetune`'s keys (data, weights, train, ...) or null")
    for key, why in SET_BY_PIPELINE.items():
        if key in section:
            raise TinylmError(f"{name}.{key} is set by the pipeline ({why}); remove it")
    given = {"method": method, **section, "base": str(base), "out": str(out), "merge": True}
    config = finetune_config_from_dict(given, f"{name}.")
    if config.method not in FINETUNE_TASKS:
        raise TinylmError(
            f"{name}.method {config.method} is not available in this tinylm; choose one of {', '.join(FINETUNE_TASKS)}"
        )
    try:
        check_finetune_config(config)
        check_instruction_data(config.data)
    except TinylmError as error:
        raise TinylmError(f"{name}: {error}") from None
    return config


def check_exportable(config: PipelineConfig, pretrain: Config) -> None:
    """Refuse, before any training, an export the model's architecture cannot have."""
    try:
        if config.export.gguf is not None:
            gguf_architecture(pretrain.model)
        if config.export.hf:
            hf_family(pretrain.model)
    except TinylmError as error:
        raise TinylmError(f"export: {error}") from None


# --- Helpers of the stages ------------------------------------------------------------------------------------------


def continue_or_start(folder: Path, kind: OutputKind, fresh: bool, start: Callable[..., Any]) -> Any:
    """Run a training stage: on from the last checkpoint of an interrupted run of it (unless `fresh`), else from the
    start, replacing what an earlier attempt left in its folder."""
    if not fresh and output_kind(folder) == kind and latest_checkpoint(folder) is not None:
        tqdm.write(f"tinylm: continuing {folder} from its last checkpoint")
        return start(resume=True)
    return start(overwrite=True)


def prepared(figures: dict[str, Any]) -> bool:
    return "folder" in figures and (Path(figures["folder"]) / META_FILE).is_file()


def finetune_done(folder: Path) -> bool:
    return (folder / FINETUNE_RESULT_FILE).is_file() and is_run(folder / MERGED_MODEL_FOLDER)


def without(settings: dict[str, Any], *names: str) -> dict[str, Any]:
    """`settings` without the keys `names`, at any depth: settings that do not change what a stage computes (where
    it writes, from which folder, in how many processes), which a run of the pipeline again may change."""
    return {
        key: without(value, *names) if isinstance(value, dict) else value
        for key, value in settings.items()
        if key not in names
    }


def first_difference(recorded: dict[str, Any], now: dict[str, Any], prefix: str = "") -> str | None:
    """The first key whose value differs between two settings records, in words; keys only one has are passed over
    (a setting added to tinylm since the stage ran)."""
    for key in [key for key in recorded if key in now]:
        was, is_now = recorded[key], now[key]
        if isinstance(was, dict) and isinstance(is_now, dict):
            found = first_difference(was, is_now, f"{prefix}{key}.")
            if found:
                return found
        elif was != is_now:
            return f"{prefix}{key} {was!r} (the recipe now says {is_now!r})"
    return None
