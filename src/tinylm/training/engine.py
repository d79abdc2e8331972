"""The training engine: the one loop every kind of training runs in.

A `Task` says what is specific to one kind of training: how it builds its model and data, what a batch is, its loss,
how it evaluates and what it writes. The engine owns everything else, the same way for every task: device, precision
and autocast, micro-batches and gradient accumulation, DDP/FSDP under torchrun, compile, activation checkpointing,
clipping, the NaN guard, learning-rate schedules, a moving average of the weights, the evaluation cadence, best
weights and checkpoints, exact resume, Ctrl-C and SIGTERM, `max_time`, `patience`, the progress bar, metrics.jsonl,
loss.png, TensorBoard/W&B and MFU.
Every `train.*` key means the same for every task; a key a task cannot honour is refused (`Task.refused`).

One step: each process takes its rows of the step's batch (`Task.batch`) and cuts them into micro-batches; each runs
forward and backward under autocast, its summed loss divided by the number of predictions in the whole step over all
processes, so every prediction weighs the same however the rows fall into micro-batches and processes; gradients
are averaged across processes only on the last micro-batch; then they are clipped, checked for NaN and applied.

The output folder is written through runs.py: a new run is checked, set up and built before anything is written,
its first files are staged and renamed into place, and only then does an old run it replaces (--overwrite) go.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm  # widgets in notebooks, text bars elsewhere

from tinylm.config import TrainConfig, parse_duration
from tinylm.errors import TinylmError
from tinylm.runs import (
    CHECKPOINTS,
    ENVIRONMENT_FILE,
    KIND_NAMES,
    SAMPLES_FILE,
    WEIGHTS_FILE,
    OutputKind,
    check_output,
    output_kind,
    read_json,
    read_weights,
    remove_stale_staging,
    staged_output,
    tied_names,
    write_failure,
    write_json,
    write_weights,
)
from tinylm.training.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    latest_whole_checkpoint,
    save_checkpoint,
)
from tinylm.training.distributed import Processes, gradient_sync, parallelize, reshard, start_processes
from tinylm.training.optim import build_optimizers, build_schedulers
from tinylm.training.throughput import environment, flops_per_token, peak_flops, peak_memory_gb
from tinylm.training.tracking import Tracker

Batch = tuple[torch.Tensor, ...]
"""Tensors whose first dimension is the row: (inputs, targets) for a language model."""
Forward = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
MAX_ROLLBACKS = 3
"""train.on_nan skip goes back to the last checkpoint at most this many times before it gives up."""


class Task(ABC):
    """What one kind of training computes; the engine does the rest.

    A new kind of training is one file in training/tasks/ with a subclass. Preference tuning (DPO, tasks/dpo.py):
    `setup` loads the policy with LoRA adapters; `batch` serves (prompt + chosen, prompt + rejected, labels) rows;
    `loss` sums -log sigmoid(beta * margin) over the pairs, the reference log-probabilities computed under
    torch.no_grad with the adapters disabled; `targets` counts the pairs; `evaluate` reports held-out preference
    accuracy and reward margins besides `val_loss`; `finish` writes the adapter. Distillation is pretraining whose
    `loss` adds the KL divergence to a teacher's logits computed in inference mode. Reinforcement learning
    (tasks/grpo.py) samples its rows in `batch` with the model its `setup` returned, seeded from `generator`: the
    engine trains on them as on any rows.
    """

    name: ClassVar[str]
    """What the task is called in messages ("pretraining", "fine-tuning", ...)."""
    kind: ClassVar[OutputKind]
    """What the output folder holds (runs.py): `run` or `finetune`."""
    refused: ClassVar[dict[str, str]] = {}
    """train.* keys this task cannot honour, each with what to use instead: set to anything but the task's
    default, they are refused in one line."""
    evaluates_at_start: ClassVar[bool] = False
    """Also evaluate the weights before the first step (a fine-tune's "before")."""
    best_weights_file: ClassVar[str] = WEIGHTS_FILE
    """Where in the output folder the best weights so far are kept."""

    out: Path
    train: TrainConfig
    default_train: TrainConfig
    """The train section the task starts from, so that the keys a user changed can be told apart."""

    @abstractmethod
    def setup(self, processes: Processes) -> nn.Module:
        """Load the data and build the model, checking everything that can fail; write nothing yet. Called with
        torch seeded by train.seed, so weights drawn here are the same on every process."""

    @abstractmethod
    def write_files(self, folder: Path) -> None:
        """The files the output holds from the start (its config, tokenizer): into `folder`, which is the staging
        folder of a new output or the output itself when a run resumes."""

    @abstractmethod
    def batch(self, index: int, generator: torch.Generator, rows: slice) -> Batch:
        """This process's `rows` of the train.batch_size rows of the `index`-th batch drawn (the step, unless
        on_nan skip went back to a checkpoint and left the bad batches behind). Draw from `index` or from
        `generator` (the engine's batch generator): both are saved in checkpoints."""

    @abstractmethod
    def targets(self, micro_batch: Batch) -> int:
        """How many predictions `loss` sums over, known before the forward pass."""

    @abstractmethod
    def loss(self, forward: Forward, micro_batch: Batch) -> torch.Tensor:
        """The summed loss (nats) of the micro-batch's predictions; `forward` is the model as the engine runs it."""

    @abstractmethod
    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Scores of the current weights, `val_loss` among them (`Engine.mean_loss` computes one)."""

    @abstractmethod
    def describe(self, model: nn.Module) -> str:
        """One line on the model and data, printed as training starts."""

    @property
    @abstractmethod
    def resume_command(self) -> str:
        """The command that continues an interrupted run of this task."""

    def micro_batches(self, batch: Batch, size: int) -> list[Batch]:
        return list(zip(*(tensor.split(size) for tensor in batch)))

    def tokens(self, batch: Batch) -> int:
        """Tokens the model reads for `batch` (for tokens/s and MFU)."""
        return batch[0].numel()

    def better(self, scores: dict[str, float], best: dict[str, float] | None) -> bool:
        """Whether `scores` beat the best so far: a lower validation loss unless the task says otherwise."""
        return best is None or scores["val_loss"] < best["val_loss"]

    def stop_reason(self, scores: dict[str, float]) -> str | None:
        """Why training should stop after an evaluation with these scores (None: go on)."""
        return None

    def sample(self, model: nn.Module) -> str | None:
        """A sample of what the current weights do, written to samples.txt at each evaluation (None: none)."""
        return None

    def finish(self, model: nn.Module, result: TrainResult) -> None:
        """Write the outputs made from the best weights, which `model` holds now (every process calls this); add
        what the task reports to `result.details`. By default the output is complete as training left it."""
        return None

    def checkpoint_activations(self, model: nn.Module) -> None:
        """Make the model recompute its activations in the backward pass (train.activation_checkpointing)."""
        checkpoint_blocks(model)

    def config_record(self) -> dict[str, Any]:
        """The settings tracked with the metrics (TensorBoard, W&B)."""
        return {"train": vars(self.train)}

    def fixed_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoints (the model, the data; JSON values): each
        checkpoint records them and --resume refuses a run whose config no longer has them."""
        return {}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best: dict[str, float]
    """The scores of the best weights (`val_loss`, and what else the task evaluates)."""
    elapsed_s: float
    """Wall-clock seconds of the training loop, evaluations and checkpoints included (over all resumed sessions)."""
    sample: str = ""
    is_main: bool = True
    """False in every torchrun process but rank 0, which alone reports."""
    start: dict[str, float] | None = None
    """The scores before the first step, for tasks that evaluate at the start."""
    details: dict[str, Any] = field(default_factory=dict)
    """What the task adds (a fine-tune's held-out loss before, its trainable parameters, ...)."""

    @property
    def best_val_loss(self) -> float:
        return self.best.get("val_loss", math.nan)


def run_task(task: Task, overwrite: bool = False, resume: bool = False) -> TrainResult:
    """Train `task`: a new output (refused where something else is, replaced with `overwrite`), or with `resume`
    the one in `task.out` from its latest checkpoint. Under torchrun, every process calls this."""
    processes = start_processes(task.train.device)
    try:
        engine = Engine(task, processes, overwrite, resume)
        try:
            return engine.run()
        finally:
            engine.tracker.close()
    except OSError as error:  # an append to metrics.jsonl or samples.txt on a full disk, ...: one line, not a trace
        failure = write_failure(error, task.out)
        if failure is None:
            raise
        raise failure from None
    finally:
        processes.close()


class NonFiniteLoss(Exception):
    def __init__(self, loss: float):
        super().__init__(f"loss {loss}")
        self.loss = loss


class Engine:
    def __init__(self, task: Task, processes: Processes, overwrite: bool, resume: bool):
        self.task, self.processes, self.out, t = task, processes, task.out, task.train
        self.device = device = processes.device
        check_honoured(task)
        for folder, name in ((self.out.parent, self.out.name), (self.out, None), (self.out / CHECKPOINTS, None)):
            processes.run_on_main(lambda folder=folder, name=name: remove_stale_staging(folder, name))
        if not resume:  # fail before any work when the output folder cannot be claimed; nothing is written yet
            processes.run_on_main(lambda: self._check_output(overwrite))
        # Resuming, the checkpoint to go on from is read and checked against the config before any work (setup may
        # prepare data, which must not happen for a data config edited since).
        checkpoint = self._checkpoint_to_resume() if resume else None
        if t.batch_size % processes.world_size:
            raise TinylmError(
                f"train.batch_size ({t.batch_size}) must be a multiple of the number of processes "
                f"({processes.world_size}): each takes an equal share of every batch"
            )
        if t.optimizer == "muon" and t.parallel == "fsdp" and processes.distributed:
            raise TinylmError("muon orthogonalises whole matrices, which fsdp shards; use --train.parallel ddp")
        if t.threads:
            torch.set_num_threads(t.threads)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: what fp32 means on GPUs
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(t.seed)
        model = task.setup(processes)
        torch.manual_seed(t.seed + processes.rank)  # dropout: each process its own masks
        per_process = t.batch_size // processes.world_size
        self.rows = slice(processes.rank * per_process, (processes.rank + 1) * per_process)
        self.autocast_dtype = autocast_dtype(t.precision, device)
        self.precision_name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[
            self.autocast_dtype
        ]
        self.autocast = functools.partial(
            torch.autocast, device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.flops_per_token = flops_per_token(model)
        peak = peak_flops(device, self.autocast_dtype)
        self.peak_flops = peak * processes.world_size if peak else None
        if t.activation_checkpointing:
            task.checkpoint_activations(model)
        self.batch_generator = torch.Generator().manual_seed(t.seed)
        self.micro_batch_size = t.micro_batch_size or per_process
        if t.micro_batch_size is None and device.type == "cuda" and t.parallel != "fsdp":
            self.micro_batch_size = processes.min(self._fit_micro_batch(model.to(device), per_process))
        if per_process % self.micro_batch_size:
            raise TinylmError(
                f"each process's share of the batch ({per_process} rows) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        # `model` computes, holds the parameters and names them for checkpoints (sharded in place by FSDP);
        # `step_module` adds DDP's gradient averaging; `forward` adds compilation.
        self.step_module = parallelize(model, processes, t.parallel)
        self.model = model
        compile_model = t.compile if t.compile is not None else device.type == "cuda"
        self.forward: Forward = torch.compile(self.step_module) if compile_model else self.step_module
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.frozen = len(self.trainable) < len(list(model.parameters()))
        # A fine-tune's checkpoints hold what it trains (an adapter's few megabytes), not the frozen base.
        self.whole = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=not self.frozen)
        self.whole_on_cpu = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        self.optimizers = build_optimizers(model, t, device.type)
        self.schedulers = build_schedulers(self.optimizers, t)
        self.averaged: list[torch.Tensor] | None = None
        """The moving average of `trainable` (train.ema_decay), from the first step on."""

        self.step = 0
        self.batches_drawn = 0
        self.saved_step: int | None = None
        """The step whose state this session last saved or restored: saving it again would add nothing."""
        self.tokens_since_log = 0
        self.best: dict[str, float] | None = None
        self.start_scores: dict[str, float] | None = None
        """The scores before the first step, for tasks that evaluate at the start."""
        self.evals_without_improvement = 0
        self.rollbacks = 0
        self.elapsed_before = 0.0  # training time of the sessions before a resume
        self.elapsed_s = 0.0
        self.start = time.perf_counter()
        if checkpoint is not None:
            resumed_from = checkpoint.path.name
            self._check_fixed_settings(checkpoint, resolved=True)
            self.restore(checkpoint)
            del checkpoint  # its tensors map the checkpoint's files: hold them no longer than needed
            self.tracker = Tracker(self.out, t.log, task.config_record(), self.step, processes.is_main)
            # Only now, with the state restored and metrics.jsonl read, may the run's files be rewritten (config.yaml
            # keeps the old run's until then: a resume that fails changes nothing).
            processes.run_on_main(lambda: task.write_files(self.out))
            self.say(f"tinylm: resumed {self.out} from {resumed_from}")
        else:
            processes.run_on_main(lambda: self._claim(overwrite))
            self.tracker = Tracker(self.out, t.log, task.config_record(), None, processes.is_main)
        processes.run_on_main(self._record_environment)
        self.say(
            f"tinylm: {task.describe(model)} on {processes.world_size} x {device}, {self.precision_name}, "
            f"{t.batch_size} rows per step in micro-batches of {self.micro_batch_size}"
        )

    def _checkpoint_to_resume(self) -> Checkpoint:
        """The newest checkpoint that loads (saying which damaged ones it passes over), once the settings it was
        trained with are found unchanged."""
        checkpoint, damaged = latest_whole_checkpoint(self.out)
        for reason in damaged:
            self.say(f"tinylm: skipping a damaged checkpoint: {reason}")
        self._check_fixed_settings(checkpoint, resolved=False)
        return checkpoint

    def _check_fixed_settings(self, checkpoint: Checkpoint, resolved: bool) -> None:
        """Refuse to resume when a setting the checkpoint was trained with has changed since (config.yaml edited by
        hand): the weights would be trained on as another model or other data without a word. Before the task's
        setup (`resolved` False) a null is not compared: it may stand for a value setup derives (model.vocab_size
        from the tokenizer), compared once it is."""
        saved = checkpoint.info.get("fixed")
        if saved is None:  # a checkpoint of a tinylm that did not record them
            return
        saved = _flat(saved)
        now = _flat(json.loads(json.dumps(self.task.fixed_settings())))  # as state.json holds them: lists, not tuples
        for key in sorted(saved.keys() | now.keys()):
            was, is_now = saved.get(key), now.get(key)
            if was != is_now and (resolved or is_now is not None):
                raise TinylmError(
                    f"{key} is {is_now!r} now but {checkpoint.path.name} was trained with {was!r}; --resume continues "
                    f"the same run: put {key} back to {was!r} (start a new run with another --out to change it)"
                )

    def _check_output(self, overwrite: bool) -> None:
        check_output(self.out, self.task.kind, overwrite=True)  # never anything but an output of the task's kind
        if not overwrite and output_kind(self.out) == self.task.kind:
            raise TinylmError(
                f"{self.out} already holds a {KIND_NAMES[self.task.kind]}; choose another --out or pass --overwrite "
                "to replace it (or --resume to continue it)"
            )

    def _claim(self, overwrite: bool) -> None:
        """Everything checked: the output's first files are staged, then take the output's place (an old output of
        the same kind goes only now)."""
        with staged_output(self.out, self.task.kind, overwrite) as staging:
            self.task.write_files(staging)

    def _record_environment(self) -> None:
        """Add this session (hardware, software, from which step) to environment.json: a resumed run may have
        moved to another machine."""
        path = self.out / ENVIRONMENT_FILE
        sessions = read_json(path).get("sessions", []) if path.is_file() else []
        session = environment(self.device, self.processes.world_size, self.precision_name)
        write_json(path, {"sessions": [*sessions, {**session, "from_step": self.step, "peak_flops": self.peak_flops}]})

    def say(self, message: str) -> None:
        if self.processes.is_main:
            tqdm.write(message)

    def run(self) -> TrainResult:
        t = self.task.train
        if self.task.evaluates_at_start and self.start_scores is None:
            self.start_scores = self.task.evaluate(self)
            self.say(f"before training: {_scores_text(self.start_scores)}")
        self.model.train()
        self.start = time.perf_counter()
        self.last_log_time = self.start
        deadline = self.start + parse_duration(t.max_time) if t.max_time else math.inf
        if t.on_nan == "skip" and latest_checkpoint(self.out) is None:
            self.save_checkpoint()  # a good state to go back to from the very start
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None if self.processes.is_main else True,
        )
        with bar, _stop_requests() as stop_requested:
            self.bar = bar
            while self.step < t.max_steps:
                lr = self.schedulers[-1].get_last_lr()[0]  # AdamW's, the optimizer every run has
                try:
                    loss, grad_norm, tokens = self.train_step()
                except NonFiniteLoss as error:
                    self.roll_back(error.loss)
                    continue
                except torch.OutOfMemoryError:
                    raise TinylmError(
                        f"CUDA ran out of memory in a micro-batch of {self.micro_batch_size} rows; lower "
                        "--train.micro-batch-size, or try --train.activation-checkpointing true or --train.parallel "
                        "fsdp"
                    ) from None
                self.step += 1
                self.tokens_since_log += tokens
                bar.update()
                if self.step % t.log_interval == 0:
                    self._log_progress(loss, lr, grad_norm)
                evaluated = self.step % t.eval_interval == 0 or self.step == t.max_steps
                stop = self._evaluate_and_checkpoint() if evaluated else None
                if self._any_process(stop_requested()):
                    path = self.save_checkpoint()
                    raise TinylmError(
                        f"interrupted at step {self.step}; training state saved in {path}; "
                        f"continue with {self.task.resume_command}"
                    )
                if stop is None and self._any_process(time.perf_counter() > deadline):
                    stop = f"train.max_time {t.max_time} reached"
                    if not evaluated:
                        self._evaluate_and_checkpoint()
                if stop:
                    self.tracker.log({"step": self.step, "stopped": stop})
                    self.say(f"stopped at step {self.step}: {stop}")
                    break

        set_model_state_dict(self.model, self.best_weights(), options=self.whole)
        best = dict(self.best or {})
        result = TrainResult(self.out, self.step, best, self.elapsed_s, is_main=self.processes.is_main)
        result.start = self.start_scores
        sample = self._sample()
        if sample is not None:
            result.sample = sample
            self._write_sample(f"best weights ({_scores_text(result.best)})", sample)
        self.model.eval()
        self.task.finish(self.model, result)
        return result

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step. Returns the loss (mean over the step's predictions), the gradient norm before
        clipping and the number of tokens the model read."""
        batch = self.task.batch(self.batches_drawn, self.batch_generator, self.rows)
        self.batches_drawn += 1
        micro_batches = self.task.micro_batches(batch, self.micro_batch_size)
        counts = torch.tensor([float(self.task.targets(m)) for m in micro_batches], device=self.device)
        # Each process's summed loss over all predictions of the step, all processes together: DDP then averages.
        total = self.processes.sum(counts.sum()) / self.processes.world_size
        loss_sum = torch.zeros((), device=self.device)
        for index, micro_batch in enumerate(micro_batches):
            with gradient_sync(self.step_module, index == len(micro_batches) - 1):
                with self.autocast():
                    loss = self.task.loss(self.forward, tuple(t.to(self.device) for t in micro_batch)) / total
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = self._clip_gradients()
        loss_sum = self.processes.sum(loss_sum) / self.processes.world_size
        loss_value, norm_value = torch.stack([loss_sum, grad_norm.float()]).tolist()  # the step's one device sync
        # Under fp16 an infinite gradient is the loss scaler's business (it skips the step and lowers the scale).
        if not math.isfinite(loss_value) or (not self.scaler.is_enabled() and not math.isfinite(norm_value)):
            self.model.zero_grad(set_to_none=True)
            raise NonFiniteLoss(loss_value if not math.isfinite(loss_value) else norm_value)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            self.scaler.step(optimizer)
            scheduler.step()
        self.scaler.update()
        self.model.zero_grad(set_to_none=True)
        self._update_average()
        return loss_value, norm_value, self.task.tokens(batch) * self.processes.world_size

    @torch.no_grad()
    def _update_average(self) -> None:
        decay = self.task.train.ema_decay
        if not decay:
            return
        weights = [p.detach() for p in self.trainable]
        if self.averaged is None:
            self.averaged = [w.clone() for w in weights]
        else:  # a shorter memory early on, so that the average soon forgets the random start
            torch._foreach_lerp_(self.averaged, weights, 1.0 - _ema_decay(decay, self.step))

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside the block the model holds the moving average of its weights (train.ema_decay), if there is one."""
        if self.averaged is None:
            yield
            return
        trained = [p.detach().clone() for p in self.trainable]
        with torch.no_grad():
            for parameter, average in zip(self.trainable, self.averaged):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, weights in zip(self.trainable, trained):
                    parameter.copy_(weights)

    def _clip_gradients(self) -> torch.Tensor:
        gradients = [p.grad for p in self.trainable if p.grad is not None]
        max_norm = self.task.train.grad_clip
        norm = torch.nn.utils.get_total_norm(gradients, foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP: each process holds a shard of the gradients
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.trainable, max_norm, norm, foreach=True)
        return norm

    def mean_loss(self, batches: list[Batch]) -> float:
        """The mean loss per prediction over `batches` (this process's rows), all processes together."""
        return self.mean_scores(batches, self.task.loss)[0]

    @torch.no_grad()
    def mean_scores(
        self, batches: list[Batch], score: Callable[[Forward, Batch], torch.Tensor], width: int = 1
    ) -> list[float]:
        """The means per prediction over `batches` (this process's rows), all processes together, of the `width`
        sums that `score` returns for a micro-batch, computed as `Task.loss` is but in evaluation mode."""
        self.model.eval()
        sums = torch.zeros(width + 1, device=self.device, dtype=torch.float64)
        for batch in batches:
            for micro_batch in self.task.micro_batches(batch, self.micro_batch_size):
                with self.autocast():
                    scores = score(self.forward, tuple(t.to(self.device) for t in micro_batch))
                count = torch.tensor([float(self.task.targets(micro_batch))], device=self.device)
                sums += torch.cat([scores.double().reshape(width), count.double()])
        *totals, count = self.processes.sum(sums).tolist()
        self.model.train()
        reshard(self.model)
        return [total / count for total in totals]

    def roll_back(self, loss: float) -> None:
        """A NaN or infinite loss: stop, or (on_nan skip) go back to the last checkpoint and go on with new batches."""
        if self.task.train.on_nan == "stop" or self.rollbacks >= MAX_ROLLBACKS:
            tried = f" (after {self.rollbacks} rollbacks)" if self.rollbacks else ""
            raise TinylmError(
                f"the loss became {loss} at step {self.step + 1}{tried}; lower train.learning_rate or raise "
                "train.warmup_steps (keep train.grad_clip on), or pass --train.on-nan skip to go back to the last "
                "checkpoint and continue past those batches"
            )
        batches_now, drawn = self.batch_generator.get_state(), self.batches_drawn
        # The newest state at or before this step (a resumed run may hold damaged or abandoned later ones).
        checkpoint, _ = latest_whole_checkpoint(self.out, at_most=self.step)
        self.restore(checkpoint)
        self.batch_generator.set_state(batches_now)  # skip the batches that led to the NaN
        self.batches_drawn = drawn
        self.rollbacks += 1
        self.tracker.rewind(self.step)
        self.tracker.log({"step": self.step, "rolled_back_to": self.step, "bad_loss": str(loss)})
        self.say(f"loss {loss} after step {self.step}: back to {checkpoint.path.name}, continuing with new batches")

    def _log_progress(self, loss: float, lr: float, grad_norm: float) -> None:
        now = time.perf_counter()
        tokens_per_s = self.tokens_since_log / (now - self.last_log_time)
        self.last_log_time, self.tokens_since_log = now, 0
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s),
            "memory_gb": round(peak_memory_gb(self.device), 3),
            "elapsed_s": self.elapsed_before + now - self.start,
        }
        if self.peak_flops:
            record["mfu"] = self.flops_per_token * tokens_per_s / self.peak_flops
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self.tracker.log(record)

    def _evaluate_and_checkpoint(self) -> str | None:
        """Evaluate, keep the best weights, save a checkpoint; the reason to stop early, if there is one."""
        began = time.perf_counter()
        with self.averaged_weights():
            scores = self.task.evaluate(self)
            improved = self.task.better(scores, self.best)
            if improved:
                weights = get_model_state_dict(self.model, options=self.whole_on_cpu)
                if self.processes.is_main:
                    path = self.out / self.task.best_weights_file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_weights(weights, path, tied_names(self.model), {"step": self.step, **scores})
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        if improved:
            self.best = scores
        self.elapsed_s = self.elapsed_before + time.perf_counter() - self.start
        self.save_checkpoint()
        self.tracker.log({"step": self.step, **scores, "elapsed_s": self.elapsed_s})
        self.tracker.plot_losses()
        with self.averaged_weights():
            sample = self._sample()
        if sample is not None:
            self.tracker.text("sample", sample, self.step)
            self._write_sample(f"step {self.step}", sample)
        self.say(f"step {self.step}: {_scores_text(scores)}{' (best)' if improved else ''}, {self.elapsed_s:.1f}s")
        # Evaluation time is not training throughput: move the last log mark forward by it.
        self.last_log_time += time.perf_counter() - began
        patience = self.task.train.patience
        if patience and self.evals_without_improvement >= patience:
            return f"no better val loss in {patience} evaluations"
        return self.task.stop_reason(scores)

    def _sample(self) -> str | None:
        """The task's sample of the current weights, drawn in evaluation mode (no dropout)."""
        self.model.eval()
        try:
            return self.task.sample(self.model)
        finally:
            self.model.train()
            reshard(self.model)

    def _write_sample(self, heading: str, sample: str) -> None:
        if self.processes.is_main:
            with open(self.out / SAMPLES_FILE, "a") as samples:
                samples.write(f"--- {heading} ---\n{sample}\n\n")

    def save_checkpoint(self) -> Path | None:
        """Gather the whole training state (every process takes part) and write it from rank 0."""
        if self.saved_step == self.step:  # Ctrl-C right after an evaluation: nothing new to save
            return latest_checkpoint(self.out)
        self.saved_step = self.step
        weights = get_model_state_dict(self.model, options=self.whole_on_cpu)
        averaged = None
        if self.averaged is not None:
            with self.averaged_weights():  # a copy (tied matrices stay one): on CPU these are the parameters
                averaged = copy.deepcopy(get_model_state_dict(self.model, options=self.whole_on_cpu))
        optimizers = [get_optimizer_state_dict(self.model, o, options=self.whole_on_cpu) for o in self.optimizers]
        rng = self.processes.gather(_rng_state(self.device))
        if not self.processes.is_main:
            return None
        trainer_state = {
            "optimizers": optimizers,
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "batch_rng": self.batch_generator.get_state(),
            "averaged_weights": averaged,
        }
        info = {
            "best": self.best,
            "batches_drawn": self.batches_drawn,
            "evals_without_improvement": self.evals_without_improvement,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.start,
            "world_size": self.processes.world_size,
            "start_scores": self.start_scores,
            "fixed": self.task.fixed_settings(),
        }
        keep = self.task.train.keep_checkpoints
        return save_checkpoint(self.out, self.step, weights, tied_names(self.model), trainer_state, info, keep)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Put the model, optimizers, schedule, scaler, RNGs, data position and counters back as `checkpoint` saved
        them."""
        weights, state, info = checkpoint.weights, checkpoint.trainer_state, checkpoint.info
        averaged = state.get("averaged_weights") if self.task.train.ema_decay else None
        self.averaged = None  # a checkpoint without an average (ema_decay was 0) starts one at the next step
        try:
            if averaged is not None:  # through the model, which shards it as FSDP shards the weights
                set_model_state_dict(self.model, averaged, options=self.whole)
                self.averaged = [p.detach().clone() for p in self.trainable]
            set_model_state_dict(self.model, weights, options=self.whole)
        except (RuntimeError, KeyError, ValueError) as error:  # torch's words for tensors of other names or shapes
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TinylmError(
                f"{checkpoint.path} does not fit the model this run builds ({reason[:200]}); restore the run's config "
                "or start it again with --overwrite"
            ) from None
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            set_optimizer_state_dict(self.model, optimizer, saved, options=self.whole)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][self.processes.rank % len(state["rng"])]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.batch_generator.set_state(state["batch_rng"])
        self.step = self.saved_step = info["step"]
        self.batches_drawn = info["batches_drawn"]
        self.best = info["best"]
        self.evals_without_improvement = info["evals_without_improvement"]
        self.elapsed_before = self.elapsed_s = info["elapsed_s"]
        self.start_scores = info["start_scores"]

    def best_weights(self) -> dict[str, torch.Tensor]:
        return read_weights(self.out / self.task.best_weights_file, device=str(self.device))

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process: every process stops at the same step."""
        if not self.processes.distributed:
            return flag
        return bool(self.processes.sum(torch.tensor(float(flag), device=self.device)) > 0)

    def _fit_micro_batch(self, model: nn.Module, per_process: int) -> int:
        """The largest micro-batch dividing the process's share whose forward and backward leave room in 90% of
        the GPU's memory for AdamW's two fp32 moments."""
        optimizer_bytes = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = torch.cuda.get_device_properties(self.device).total_memory
        probe = self.task.batch(0, torch.Generator().manual_seed(0), self.rows)
        for size in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                micro_batch = tuple(t.to(self.device) for t in self.task.micro_batches(probe, size)[0])
                with self.autocast():
                    self.task.loss(model, micro_batch).backward()
                fits = torch.cuda.max_memory_allocated(self.device) + optimizer_bytes < 0.9 * total
            except torch.OutOfMemoryError:
                fits = False
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if fits:
                return size
        raise TinylmError(
            "one row per micro-batch does not fit in GPU memory; shorten the rows, use "
            "--train.activation-checkpointing true, or --train.parallel fsdp over several GPUs"
        )


def check_honoured(task: Task) -> None:
    """Refuse, in one line, a train.* key set for a task that cannot honour it."""
    for key, instead in task.refused.items():
        if getattr(task.train, key) != getattr(task.default_train, key):
            raise TinylmError(f"train.{key} does not apply to {task.name}: {instead}")


def checkpoint_blocks(model: nn.Module) -> None:
    """Make each block recompute its activations in the backward pass; the model's code stays as it is."""
    blocks = getattr(model, "blocks", None)
    if not blocks:
        raise TinylmError("train.activation_checkpointing needs a model made of blocks (model.arch gpt)")
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting; None is plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"dropout": 0.1}} -> {"model.dropout": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _ema_decay(decay: float, step: int) -> float:
    """The decay of the weight average's update after `step` steps: train.ema_decay, or less while (1 + step) /
    (10 + step) is (TensorFlow's ExponentialMovingAverage with num_updates)."""
    return min(decay, (1 + step) / (10 + step))


def _scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in scores.items())


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the step it is in, so that the state it saves is whole;
    a second signal acts at once."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield lambda: False
        return

    def request_stop(signum: int, frame: Any) -> None:
        requested.append(signum)
        signal.signal(signum, previous[signum])

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
