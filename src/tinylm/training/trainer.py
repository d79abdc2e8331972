"""The training loop: batches in, better weights out, with evaluation, checkpoints and a record of it all.

A run folder holds everything needed to use or inspect the run later:
config.yaml (fully resolved), tinylm_tokenizer.json, model.safetensors (best by validation loss),
checkpoints/step-N/ (latest state), metrics.jsonl (one JSON record per log or eval), samples.txt.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from tinylm.config import Config
from tinylm.data.loader import TokenShards
from tinylm.data.prepare import prepare
from tinylm.device import resolve_device
from tinylm.errors import TinylmError
from tinylm.generate import encode_prompt, generate_tokens
from tinylm.model import build_model, count_parameters
from tinylm.training.checkpoint import BEST_WEIGHTS, load_weights, save_checkpoint, save_weights
from tinylm.training.optim import build_optimizers, build_schedulers

CONFIG_FILE = "config.yaml"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_val_loss: float
    elapsed_s: float
    """Wall-clock seconds of the training loop, evaluations and checkpoints included."""
    sample: str


def train(config: Config, overwrite: bool = False) -> TrainResult:
    """Train a model as `config` says and write the run folder `config.out`."""
    if config.model.arch == "seq2seq":  # an encoder-decoder learns a synthetic task, in its own loop
        from tinylm.training.copy_task_trainer import train_copy_task

        return train_copy_task(config, overwrite)
    run_dir = Path(config.out)
    _claim_run_dir(run_dir, overwrite)
    torch.manual_seed(config.train.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)

    data = prepare(config.data)
    tokenizer = data.tokenizer
    vocab_size = config.model.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise TinylmError(
            f"model.vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
            "set it to null to take the tokenizer's"
        )
    config = replace(config, model=replace(config.model, vocab_size=vocab_size))
    train_split, val_split = data.split("train"), data.split("val")
    for name, split in (("train", train_split), ("val", val_split)):
        if len(split) <= config.model.block_size:
            raise TinylmError(
                f"the {name} split has {len(split)} tokens, fewer than one context window "
                f"(model.block_size + 1 = {config.model.block_size + 1}); give more text or lower model.block_size"
            )
    prompt = encode_prompt(tokenizer, config.sample.prompt, "sample.prompt")  # fail before training, not after

    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / CONFIG_FILE)
    tokenizer.save(run_dir)
    model = build_model(config.model).to(device)
    optimizers = build_optimizers(model, config.train, device.type)
    loop = TrainingLoop(config, model, optimizers, train_split, val_split, run_dir)
    tqdm.write(f"tinylm: {count_parameters(model)['total']:,} parameters on {device}, data in {data.folder}")
    loop.run()

    load_weights(model, run_dir / BEST_WEIGHTS)
    s = config.sample
    sample = s.prompt + tokenizer.decode(
        generate_tokens(model, prompt, s.max_new_tokens, s.temperature, s.top_k, s.seed)
    )
    (run_dir / "samples.txt").write_text(sample)
    return TrainResult(run_dir, loop.step, loop.best_val_loss, loop.elapsed_s, sample)


class TrainingLoop:
    def __init__(
        self,
        config: Config,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        train_split: TokenShards,
        val_split: TokenShards,
        run_dir: Path,
    ):
        self.config, self.model, self.optimizers, self.run_dir = config, model, optimizers, run_dir
        self.schedulers = build_schedulers(optimizers, config.train)
        self.train_split = train_split
        t, block_size = config.train, config.model.block_size
        self.batch_generator = torch.Generator().manual_seed(t.seed)
        # The same batches at every evaluation, so that two evaluations differ only by the weights.
        fixed = torch.Generator().manual_seed(t.seed + 1)
        self.eval_batches = {
            name: [split.sample_batch(t.batch_size, block_size, fixed) for _ in range(t.eval_batches)]
            for name, split in (("train", train_split), ("val", val_split))
        }
        self.device = next(model.parameters()).device
        self.step = 0
        self.best_val_loss = float("inf")
        self.elapsed_s = 0.0

    def run(self) -> None:
        t = self.config.train
        self.model.train()
        self.start = time.perf_counter()
        self.last_log = (self.step, self.start)
        with (
            open(self.run_dir / "metrics.jsonl", "a") as self.metrics,
            tqdm(total=t.max_steps, desc="train", unit="step", dynamic_ncols=True, disable=None) as self.bar,
        ):
            try:
                while self.step < t.max_steps:
                    lr = self.schedulers[-1].get_last_lr()[0]  # AdamW's, the optimizer every run has
                    loss = self.train_step()
                    self.step += 1
                    self.bar.update()
                    if self.step % t.log_interval == 0:
                        self._log_progress(loss, lr)
                    if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                        self._evaluate_and_checkpoint()
            except KeyboardInterrupt:
                path = self._save_checkpoint()
                raise TinylmError(f"interrupted at step {self.step}; training state saved in {path}") from None

    def _log_progress(self, loss: float, lr: float) -> None:
        now = time.perf_counter()
        last_step, last_time = self.last_log
        tokens = (self.step - last_step) * self.config.train.batch_size * self.config.model.block_size
        tokens_per_s = tokens / (now - last_time)
        self.last_log = (self.step, now)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self._record(
            {
                "step": self.step,
                "loss": loss,
                "lr": lr,
                "tokens_per_s": round(tokens_per_s),
                "elapsed_s": now - self.start,
            }
        )

    def _evaluate_and_checkpoint(self) -> None:
        began = time.perf_counter()
        losses = self.estimate_losses()
        improved = losses["val"] < self.best_val_loss
        if improved:
            self.best_val_loss = losses["val"]
            save_weights(self.model, self.run_dir / BEST_WEIGHTS, {"step": self.step, "val_loss": losses["val"]})
        self.elapsed_s = time.perf_counter() - self.start
        self._save_checkpoint()
        self._record(
            {"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"], "elapsed_s": self.elapsed_s}
        )
        self.bar.write(
            f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            f"{' (best)' if improved else ''}, {self.elapsed_s:.1f}s"
        )
        # Evaluation time is not training throughput: move the last log mark forward by it.
        last_step, last_time = self.last_log
        self.last_log = (last_step, last_time + time.perf_counter() - began)

    def train_step(self) -> float:
        x, y = self.train_split.sample_batch(
            self.config.train.batch_size, self.config.model.block_size, self.batch_generator
        )
        _, loss = self.model(x.to(self.device), y.to(self.device))
        loss.backward()
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            scheduler.step()
        self.model.zero_grad(set_to_none=True)
        return loss.item()

    @torch.inference_mode()
    def estimate_losses(self) -> dict[str, float]:
        self.model.eval()
        losses = {}
        for name, batches in self.eval_batches.items():
            total = sum(self.model(x.to(self.device), y.to(self.device))[1].item() for x, y in batches)
            losses[name] = total / len(batches)
        self.model.train()
        return losses

    def _save_checkpoint(self) -> Path:
        trainer_state = {
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "torch_rng": torch.get_rng_state(),
            "batch_rng": self.batch_generator.get_state(),
        }
        info = {"best_val_loss": self.best_val_loss, "elapsed_s": self.elapsed_s}
        return save_checkpoint(self.run_dir, self.step, self.model, trainer_state, info)

    def _record(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()


def _claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A run folder is never overwritten by accident: only an earlier run's folder, and only when asked."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not (run_dir / CONFIG_FILE).is_file():
        raise TinylmError(f"{run_dir} exists and is not a tinylm run folder; choose another --out")
    if not overwrite:
        raise TinylmError(f"{run_dir} already holds a run; choose another --out or pass --overwrite to replace it")
    shutil.rmtree(run_dir)
