"""Fine-tuning on instruction data: LoRA (QLoRA with 4/8-bit weights on CUDA) through peft, or every weight.

    base (Hugging Face model, GGUF, tinylm run) + instruction data (Alpaca or chat form, see data/instructions.py)
      -> held-out loss before -> training on the response tokens -> held-out loss after
      -> out/: adapter_config.json + adapter_model.safetensors (LoRA, peft format), tokenizer and chat template,
               model/ (--merge or full fine-tuning: a Hugging Face folder, or a tinylm run for a tinylm base),
               finetune.yaml (config), finetune.json (results), metrics.jsonl, checkpoints/step-N/ (resume)

A tinylm run is fine-tuned as tinylm's own GPT: peft wraps any nn.Module, its layers are named `qkv`, `proj`, `fc` (or
`gate`, `up`), and the result stays a tinylm run that every tinylm command reads, with its own tokenizer. (Converting
to a Hugging Face model first would work only for the architectures the export maps, and would hand back a model in
another format.) `tinylm.load(out)` loads any result for generation, chat, serving and evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm  # widgets in notebooks, text bars elsewhere

from tinylm.config import Config, FinetuneConfig, check_config
from tinylm.data.instructions import IGNORE, TokenizedExamples, load_instructions
from tinylm.device import resolve_device
from tinylm.errors import TinylmError
from tinylm.pretrained import HuggingFaceLM, Pretrained, load_pretrained
from tinylm.run import Run, load, pretrained_run
from tinylm.training.checkpoint import BEST_WEIGHTS, latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from tinylm.training.optim import build_optimizers, build_schedulers
from tinylm.training.trainer import autocast_dtype, checkpoint_activations

CONFIG_FILE = "finetune.yaml"
RESULT_FILE = "finetune.json"
MODEL_FOLDER = "model"


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    held_out_loss_before: float
    held_out_loss_after: float
    trainable_parameters: int
    elapsed_s: float
    peak_gpu_memory_mb: float | None
    """Most CUDA memory allocated at once during the fine-tune (None off CUDA)."""


def finetune(config: FinetuneConfig, overwrite: bool = False, resume: bool = False) -> FinetuneResult:
    """Fine-tune `config.base` on `config.data` and write `config.out` (see the module docstring)."""
    check_finetune_config(config)
    out = Path(config.out)
    _claim_out_dir(out, config, overwrite, resume)
    t = config.train
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data = load_instructions(config.data, config.held_out_examples, config.max_examples)
    base = load_pretrained(config.base, device, config.bits)
    trainable = attach_trainable(base, config)
    lm = HuggingFaceLM(trainable) if base.kind == "hf" else trainable
    tokenizer = base.tokenizer
    max_length = min(config.max_length, lm.config.block_size)
    encode = (tokenizer.render, tokenizer.encode)
    train_set = TokenizedExamples(data.train, *encode, max_length, config.pack, tokenizer.pad_id)
    held_out = TokenizedExamples(data.held_out, *encode, max_length, pad_id=tokenizer.pad_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(asdict(config), sort_keys=False, allow_unicode=True))

    loop = FinetuneLoop(config, lm, train_set, held_out, out, device)
    if resume and latest_checkpoint(out):
        loop.restore(latest_checkpoint(out))
    else:
        loop.held_out_loss_before = loop.held_out_loss()
    tqdm.write(
        f"tinylm: fine-tuning {loop.trainable_parameters:,} of {sum(p.numel() for p in lm.parameters()):,} "
        f"parameters ({config.method}) on {device}: {len(train_set)} training rows, {len(held_out)} held out; "
        f"held-out loss before {loop.held_out_loss_before:.4f}"
    )
    loop.run()
    after = loop.held_out_loss()
    save_outputs(out, config, base, trainable)
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result = FinetuneResult(
        out, loop.step, loop.held_out_loss_before, after, loop.trainable_parameters, loop.elapsed_s, peak_memory
    )
    # A local base is recorded by its absolute path: the adapter is loaded onto it from wherever tinylm runs next.
    base_path = Path(config.base).expanduser()
    recorded_base = str(base_path.resolve()) if base_path.exists() else config.base
    record = {"base": recorded_base, "kind": base.kind, "method": config.method, **asdict(result), "out": str(out)}
    _write_atomically(out / RESULT_FILE, json.dumps(record, indent=2))
    return result


def check_finetune_config(config: FinetuneConfig) -> None:
    check_config(Config(train=config.train))
    for key in ("lora_r", "max_length", "held_out_examples"):
        if getattr(config, key) < 1:
            raise TinylmError(f"--{key.replace('_', '-')} must be at least 1, not {getattr(config, key)}")
    if config.method == "full" and config.bits is not None:
        raise TinylmError("--bits trains LoRA adapters on quantized weights; drop --full or --bits")
    if config.merge and config.bits is not None:
        raise TinylmError("--merge cannot fold an adapter into 4/8-bit weights; drop --merge and load base + adapter")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise TinylmError(f"--lora-dropout must be in [0, 1), not {config.lora_dropout}")


def attach_trainable(base: Pretrained, config: FinetuneConfig) -> nn.Module:
    """The base with what is to be trained made trainable: LoRA adapters (everything else frozen), or every weight."""
    model = base.model
    checkpointing = config.train.activation_checkpointing
    if checkpointing and base.kind == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        checkpoint_activations(model)
    if config.method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.bits is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    targets = config.target_modules
    if targets is None and base.kind == "tinylm":
        output_layer = model.lm_head
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output_layer]
        targets = sorted({name.rsplit(".", 1)[-1] for name in linear})
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM" if base.kind == "hf" else None,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # peft: no target module found, or no default for this architecture
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        reason = str(error).strip().splitlines()[0]
        raise TinylmError(f"{reason[:200]}; choose --target-modules among: {', '.join(names)}") from None


def response_nats(lm: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy (nats) of predicting each labelled token from the ones before it, and how many there are."""
    logits, _ = lm(ids)
    targets = labels[:, 1:]
    logits = logits[:, :-1].flatten(0, 1).float()
    nats = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return nats, int((targets != IGNORE).sum())


class FinetuneLoop:
    def __init__(
        self,
        config: FinetuneConfig,
        lm: nn.Module,
        train_set: TokenizedExamples,
        held_out: TokenizedExamples,
        out: Path,
        device: torch.device,
    ):
        self.config, self.lm, self.train_set, self.held_out, self.out, self.device = (
            config, lm, train_set, held_out, out, device
        )  # fmt: skip
        # What a checkpoint stores: for LoRA, the adapters' few megabytes rather than the frozen base.
        self.trainable = {name: p for name, p in lm.named_parameters() if p.requires_grad}
        self.trainable_parameters = sum(p.numel() for p in self.trainable.values())
        self.micro_batch_size = config.train.micro_batch_size or config.train.batch_size
        self.optimizers = build_optimizers(lm, config.train, device.type)
        self.schedulers = build_schedulers(self.optimizers, config.train)
        self.autocast_dtype = autocast_dtype(config.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.step = 0
        self.elapsed_s = 0.0
        self.held_out_loss_before = float("nan")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def run(self) -> None:
        t = self.config.train
        start = time.perf_counter() - self.elapsed_s
        tokens_since_log, last_log = 0, time.perf_counter()
        self.lm.train()
        with (
            open(self.out / "metrics.jsonl", "a") as metrics,
            tqdm(total=t.max_steps, initial=self.step, desc="finetune", unit="step", disable=None) as bar,
        ):
            try:
                while self.step < t.max_steps:
                    lr = self.schedulers[-1].get_last_lr()[0]
                    loss, tokens = self.train_step()
                    self.step += 1
                    tokens_since_log += tokens
                    bar.update()
                    self.elapsed_s = time.perf_counter() - start
                    record = {"step": self.step, "loss": loss, "lr": lr, "elapsed_s": self.elapsed_s}
                    if self.step % t.log_interval == 0:
                        record["tokens_per_s"] = round(tokens_since_log / (time.perf_counter() - last_log))
                        tokens_since_log, last_log = 0, time.perf_counter()
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                        metrics.write(json.dumps(record) + "\n")
                    if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                        record = {"step": self.step, "val_loss": self.held_out_loss(), "elapsed_s": self.elapsed_s}
                        metrics.write(json.dumps(record) + "\n")
                        bar.write(f"step {self.step}: held-out loss {record['val_loss']:.4f}")
                        self.save_checkpoint()
                    metrics.flush()
            except KeyboardInterrupt:
                path = self.save_checkpoint()
                message = f"interrupted at step {self.step}; state saved in {path}, go on with --resume"
                raise TinylmError(message) from None

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over train.batch_size rows, micro_batch_size rows per pass; returns the mean loss per
        response token and the number of tokens the model read."""
        c = self.config
        passes = c.train.batch_size // self.micro_batch_size
        batches = [
            self.train_set.training_batch(self.step * passes + i, self.micro_batch_size, c.train.seed)
            for i in range(passes)
        ]
        # Every labelled token weighs the same, however the tokens fall into the passes.
        total_labels = max(1, sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels in batches))
        loss_sum = 0.0
        for ids, labels in batches:
            with self.autocast():
                nats, _ = response_nats(self.lm, ids.to(self.device), labels.to(self.device))
            self.scaler.scale(nats / total_labels).backward()
            loss_sum += nats.item()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        if c.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), c.train.grad_clip)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            self.scaler.step(optimizer)
            scheduler.step()
        self.scaler.update()
        self.lm.zero_grad(set_to_none=True)
        return loss_sum / total_labels, sum(ids.numel() for ids, _ in batches)

    @torch.inference_mode()
    def held_out_loss(self) -> float:
        """Mean loss per response token over every held-out example."""
        was_training = self.lm.training
        self.lm.eval()
        total, count = 0.0, 0
        size = self.micro_batch_size
        for first in range(0, len(self.held_out), size):
            ids, labels = self.held_out.batch(list(range(first, min(first + size, len(self.held_out)))))
            with self.autocast():
                nats, tokens = response_nats(self.lm, ids.to(self.device), labels.to(self.device))
            total, count = total + nats.item(), count + tokens
        self.lm.train(was_training)
        return total / count

    def save_checkpoint(self) -> Path:
        state = {
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        info = {"held_out_loss_before": self.held_out_loss_before, "elapsed_s": self.elapsed_s}
        weights = {name: p.detach() for name, p in self.trainable.items()}
        return save_checkpoint(self.out, self.step, weights, set(), state, info)

    def restore(self, checkpoint: Path) -> None:
        """Continue from a checkpoint: the weights being trained, optimizer, schedule and RNG; the batches follow from
        the step alone."""
        weights, state, info = load_checkpoint(checkpoint)
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(weights[name])
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.elapsed_s = info["step"], info["elapsed_s"]
        self.held_out_loss_before = info["held_out_loss_before"]


def save_outputs(out: Path, config: FinetuneConfig, base: Pretrained, trained: nn.Module) -> None:
    """The adapter (LoRA) and tokenizer in `out`, and with --merge or full fine-tuning the whole model in out/model.
    Each is written under a temporary name and moved into place."""
    staging = out / ".outputs.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if config.method == "lora":
        trained.save_pretrained(str(staging))
        (staging / "README.md").unlink(missing_ok=True)  # peft's empty model card
    base.tokenizer.save(staging)
    for file in staging.iterdir():
        os.replace(file, out / file.name)
    staging.rmdir()
    if config.method == "full" or config.merge:
        model = trained.merge_and_unload() if config.method == "lora" else trained
        save_model_folder(out / MODEL_FOLDER, base, model)


def save_model_folder(folder: Path, base: Pretrained, model: nn.Module) -> None:
    """A standalone model: a Hugging Face folder (config.json, model.safetensors, tokenizer), or for a tinylm base a
    tinylm run folder (config.yaml, model.safetensors, tokenizer, chat template)."""
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if base.kind == "hf":
        model.save_pretrained(str(staging))
    else:
        from tinylm.training.trainer import CONFIG_FILE as RUN_CONFIG_FILE

        (staging / RUN_CONFIG_FILE).write_text(yaml.safe_dump(base.run_config, sort_keys=False, allow_unicode=True))
        save_weights(model, staging / BEST_WEIGHTS)
    base.tokenizer.save(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def _claim_out_dir(out: Path, config: FinetuneConfig, overwrite: bool, resume: bool) -> None:
    """An output folder is reused only when asked: --resume continues the same fine-tune, --overwrite replaces it."""
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise TinylmError(f"nothing to resume in {out}; run without --resume to start")
        return
    if not (out / CONFIG_FILE).is_file():
        raise TinylmError(f"{out} exists and is not a fine-tuning folder; choose another --out")
    if resume:
        saved, given = yaml.safe_load((out / CONFIG_FILE).read_text()), asdict(config)
        saved["train"]["max_steps"] = given["train"]["max_steps"]  # resuming may extend the run
        changed = [key for key in given if given[key] != saved.get(key)]
        if changed:
            raise TinylmError(f"--resume needs the config {out} was started with; '{changed[0]}' differs")
        return
    if not overwrite:
        raise TinylmError(f"{out} already holds a fine-tune; pass --resume to continue it or --overwrite to replace it")
    shutil.rmtree(out)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def load_finetune_output(folder: Path, device: str = "auto") -> Run:
    """A `tinylm finetune` output folder, ready to answer through the chat template it was trained with: its merged
    model/ when it has one, else the base with the adapter on top. (`tinylm.load` calls this.)"""
    if (folder / MODEL_FOLDER).is_dir():
        return load(folder / MODEL_FOLDER, device)
    from peft import PeftModel

    info = json.loads((folder / RESULT_FILE).read_text())
    base = load_pretrained(info["base"], resolve_device(device))
    adapted = PeftModel.from_pretrained(base.model, str(folder))
    return pretrained_run(folder, replace(base, model=adapted, has_chat_template=True))
