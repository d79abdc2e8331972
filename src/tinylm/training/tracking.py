"""Where a run's numbers go: metrics.jsonl always, loss.png at each evaluation, TensorBoard or Weights & Biases when
asked. Only rank 0 of a distributed run tracks.

metrics.jsonl holds one JSON record per line: training records (step, loss, lr, grad_norm, tokens_per_s, mfu,
memory_gb, elapsed_s) and evaluation records (step, train_loss, val_loss, elapsed_s). On resume the records after the
checkpoint's step are dropped, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

from tinylm.errors import TinylmError
from tinylm.runs import LOSS_PLOT, METRICS_FILE, write_atomically


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        backend: Literal["none", "tensorboard", "wandb"],
        config: dict[str, Any],
        resume_step: int | None = None,
        enabled: bool = True,
    ):
        self.run_dir, self.enabled = run_dir, enabled
        self.records: list[dict[str, Any]] = []
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        self.metrics_file, self.metrics = run_dir / METRICS_FILE, None
        if resume_step is not None and self.metrics_file.is_file():
            self.records = read_records(self.metrics_file)
        self.rewind(resume_step or 0)
        if backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TinylmError("--train.log tensorboard needs tensorboard: pip install 'tinylm[track]'") from None
            # purge_step hides the events a killed run wrote after its last checkpoint.
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        elif backend == "wandb":
            try:
                import wandb
            except ImportError:
                raise TinylmError("--train.log wandb needs wandb: pip install wandb (or 'tinylm[track]')") from None
            id_file = run_dir / "wandb_id.txt"  # a resumed run continues the same W&B run
            if not id_file.is_file():
                write_atomically(id_file, wandb.util.generate_id())
            self.wandb = wandb.init(
                project="tinylm",
                name=run_dir.name,
                id=id_file.read_text(),
                resume="allow",
                dir=str(run_dir),
                config=config,
            )

    def rewind(self, step: int) -> None:
        """Forget the records after `step`: the run goes on from that step's checkpoint."""
        if not self.enabled:
            return
        self.records = [r for r in self.records if r["step"] <= step]
        write_atomically(self.metrics_file, "".join(json.dumps(r) + "\n" for r in self.records))
        if self.metrics is not None:
            self.metrics.close()
        self.metrics = open(self.metrics_file, "a")  # noqa: SIM115 -- open for the whole run, closed by close()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def plot_losses(self) -> None:
        """Draw loss.png: the training loss at every record and the train/val losses of every evaluation."""
        if not self.enabled:
            return
        try:
            # A Figure of its own, not pyplot: no window, and a notebook's backend is left as it is.
            from matplotlib.figure import Figure
        except ImportError:
            return  # the plot is a convenience; metrics.jsonl has the numbers
        figure = Figure(figsize=(8, 5))
        axes = figure.subplots()
        steps = [r for r in self.records if "loss" in r]
        evals = [r for r in self.records if "val_loss" in r]
        axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (batch)")
        train_evals = [r for r in evals if "train_loss" in r]  # pretraining measures both splits
        axes.plot([r["step"] for r in train_evals], [r["train_loss"] for r in train_evals], "o-", label="train (eval)")
        axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
        axes.set(xlabel="step", ylabel="loss (nats/token)", title=self.run_dir.name)
        axes.grid(alpha=0.3)
        axes.legend()
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=100)
        write_atomically(self.run_dir / LOSS_PLOT, png.getvalue())

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A last line cut short (the process was killed as it wrote it) is dropped: it
    came after the last checkpoint, which the run goes back to anyway. Any other damage is a one-line error."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if number == len(lines):
                break
            raise TinylmError(f"{path}:{number} is not a metrics record; delete that line (or the file) and resume")
        records.append(record)
    return records
