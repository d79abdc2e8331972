"""Training a seq2seq model on the copy task (model.arch: seq2seq), with the optimizer, schedule and atomic weight
files of the language-model trainer.

Each step draws a fresh batch of random sequences (never a held-out one). Every `train.eval_interval` steps the
model greedily answers all held-out sequences: `val_accuracy` is the share answered exactly, and the best weights by
that accuracy (then by val loss) are kept in model.safetensors. The run folder gets config.yaml, model.safetensors,
metrics.jsonl, samples.txt (held-out sequences and the model's answers) and cross_attention.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm  # widgets in notebooks, text bars elsewhere

from tinylm.config import Config
from tinylm.copy_task import ATTENTION_PLOT, CopyTask, load_copy_task, require_matplotlib
from tinylm.device import resolve_device
from tinylm.errors import TinylmError
from tinylm.model import build_model, count_parameters
from tinylm.training.checkpoint import BEST_WEIGHTS, save_weights
from tinylm.training.optim import build_optimizers, build_schedulers
from tinylm.training.trainer import CONFIG_FILE, TrainResult, claim_run_dir


@dataclass
class CopyTaskResult(TrainResult):
    best_val_accuracy: float = 0.0
    """Share of held-out sequences the best weights answer exactly."""


def train_copy_task(config: Config, overwrite: bool = False) -> CopyTaskResult:
    run_dir = Path(config.out)
    claim_run_dir(run_dir, overwrite)
    require_matplotlib()  # fail before training, not after, when the attention plot cannot be drawn
    torch.manual_seed(config.train.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)

    task = CopyTask(config.task, config.train.seed)
    vocab_size = config.model.vocab_size or task.vocab_size
    if vocab_size < task.vocab_size:
        raise TinylmError(
            f"model.vocab_size {vocab_size} is smaller than the task's {task.vocab_size} "
            "(task.symbols + PAD, BOS, EOS); set it to null to take the task's"
        )
    config = replace(config, model=replace(config.model, vocab_size=vocab_size))
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / CONFIG_FILE)

    model = build_model(config.model).to(device)
    optimizers = build_optimizers(model, config.train, device.type)
    schedulers = build_schedulers(optimizers, config.train)
    tqdm.write(
        f"tinylm: {count_parameters(model)['total']:,} parameters on {device}, {config.task.kind} task, "
        f"{len(task.val_sequences)} held-out sequences"
    )
    t = config.train
    generator = torch.Generator().manual_seed(t.seed)
    best = {"val_accuracy": -1.0, "val_loss": float("inf")}
    step, start = 0, time.perf_counter()
    with (
        open(run_dir / "metrics.jsonl", "a") as metrics,
        tqdm(total=t.max_steps, desc="train", unit="step", dynamic_ncols=True, disable=None) as bar,
    ):
        try:
            while step < t.max_steps:
                lr = schedulers[-1].get_last_lr()[0]
                source, target_input, target_output = (x.to(device) for x in task.train_batch(t.batch_size, generator))
                _, loss = model(source, target_input, target_output, label_smoothing=config.task.label_smoothing)
                loss.backward()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                for optimizer, scheduler in zip(optimizers, schedulers):
                    optimizer.step()
                    scheduler.step()
                model.zero_grad(set_to_none=True)
                step += 1
                bar.update()
                if step % t.log_interval == 0:
                    record = {"step": step, "loss": loss.item(), "lr": lr, "elapsed_s": time.perf_counter() - start}
                    metrics.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                if step % t.eval_interval == 0 or step == t.max_steps:
                    scores = task.evaluate(model)
                    improved = (scores["val_accuracy"], -scores["val_loss"]) > (best["val_accuracy"], -best["val_loss"])
                    if improved:
                        best = scores
                        save_weights(model, run_dir / BEST_WEIGHTS, {"step": step, **scores})
                    record = {"step": step, **scores, "elapsed_s": time.perf_counter() - start}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.write(
                        f"step {step}: val loss {scores['val_loss']:.4f}, held-out exact-sequence accuracy "
                        f"{scores['val_accuracy']:.1%}{' (best)' if improved else ''}, {record['elapsed_s']:.1f}s"
                    )
                    stop = config.task.stop_accuracy
                    if stop is not None and scores["val_accuracy"] >= stop:
                        break
        except KeyboardInterrupt:
            raise TinylmError(
                f"interrupted at step {step}; the best weights so far are in {run_dir / BEST_WEIGHTS}"
            ) from None
    elapsed_s = time.perf_counter() - start

    run = load_copy_task(run_dir, device=str(device))
    examples = [" ".join(map(str, s)) for s in task.val_sequences[:5]]
    sample = "\n".join(f"{text} -> {run.translate(text)}" for text in examples)
    (run_dir / "samples.txt").write_text(sample + "\n")
    longest = max(task.val_sequences[:100], key=len)
    run.draw_attention(" ".join(map(str, longest)), run_dir / ATTENTION_PLOT)
    return CopyTaskResult(run_dir, step, best["val_loss"], elapsed_s, sample, best_val_accuracy=best["val_accuracy"])
