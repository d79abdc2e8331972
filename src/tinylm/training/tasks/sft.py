"""Instruction fine-tuning: LoRA (QLoRA with 4/8-bit weights on CUDA) through peft, or every weight.

    base (Hugging Face model, GGUF, tinylm run) + instruction data (Alpaca or chat form, see data/instructions.py)
      -> held-out loss (and answer accuracy) before -> training on the response tokens -> the same of the best weights
      -> out/: adapter_config.json + adapter_model.safetensors (LoRA, peft format), tokenizer and chat template,
               model/ (--merge or full fine-tuning: a Hugging Face folder, or a tinylm run for a tinylm base),
               finetune.yaml (config), finetune.json (results), metrics.jsonl, checkpoints/ (resume)

A row is one conversation (or, with `pack`, max_length tokens of conversations laid end to end); the loss is the
cross-entropy of the assistant's tokens only. A tinylm run is fine-tuned as tinylm's own GPT: peft wraps any
nn.Module, its layers are named `qkv`, `proj`, `fc` (or `gate`, `up`), and the result stays a tinylm run that every
tinylm command reads. `tinylm.load(out)` loads any result for generation, chat, serving and evaluation.

When held-out responses carry a checkable final answer (GSM8K's `#### 42`), each evaluation also reports
`answer_accuracy`: the share of them whose greedy response ends in the same final answer (exact match of the values).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import (
    Config,
    FinetuneConfig,
    SampleConfig,
    batch_size_from_tokens,
    check_config,
    finetune_train_defaults,
)
from tinylm.data.instructions import IGNORE, Messages, TokenizedExamples, final_answer, load_instructions
from tinylm.errors import TinylmError
from tinylm.generate import generate_tokens
from tinylm.pretrained import ChatTokenizer, HuggingFaceLM, Pretrained, load_pretrained
from tinylm.runs import (
    CONFIG_FILE,
    FINETUNE_CONFIG_FILE,
    FINETUNE_RESULT_FILE,
    MERGED_MODEL_FOLDER,
    WEIGHTS_FILE,
    read_yaml,
    replace_output,
    save_weights,
    write_json,
    write_yaml,
)
from tinylm.training.distributed import Processes, reshard
from tinylm.training.engine import Batch, Engine, Forward, Task, TrainResult, checkpoint_blocks


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    held_out_loss_before: float
    """The mean loss on the held-out examples before training: per response token (sft), per pair (dpo)."""
    held_out_loss_after: float
    """The held-out loss of the weights kept: the best evaluation's."""
    trainable_parameters: int
    elapsed_s: float
    peak_gpu_memory_mb: float | None
    """Most CUDA memory allocated at once during the fine-tune (None off CUDA)."""
    answer_accuracy_before: float | None = None
    """Share of held-out examples answered right (greedy) before training; None when the data has no final answers."""
    answer_accuracy_after: float | None = None
    """The same for the weights kept."""
    preference_accuracy_before: float | None = None
    """DPO: share of held-out pairs whose chosen answer the fine-tune rewards above the rejected one (a tie counts
    half, so the base itself scores 0.5), before training."""
    preference_accuracy_after: float | None = None
    reward_margin_before: float | None = None
    """DPO: mean over held-out pairs of the chosen answer's reward minus the rejected one's (a reward is dpo_beta
    times the log of how much likelier the fine-tune makes the answer than the base does; 0 before training)."""
    reward_margin_after: float | None = None
    chosen_reward_before: float | None = None
    """DPO: mean reward of the held-out chosen answers (0 before training)."""
    chosen_reward_after: float | None = None
    rejected_reward_before: float | None = None
    """DPO: mean reward of the held-out rejected answers (0 before training)."""
    rejected_reward_after: float | None = None


class InstructionTuning(Task):
    name = "fine-tuning"
    kind = "finetune"
    refused: ClassVar[dict[str, str]] = {
        "eval_batches": "every held-out example is evaluated; set --held-out-examples",
        "teacher": "distillation is a pretraining option (tinylm train); fine-tune without it",
    }
    evaluates_at_start = True
    best_weights_file = "checkpoints/best.safetensors"
    sequences_per_row: ClassVar[int] = 1
    """Token sequences (of up to max_length tokens) in one row of a batch, for train.batch_tokens."""

    def __init__(self, config: FinetuneConfig, resume: bool = False):
        check_finetune_config(config)
        self.config, self.out, self.default_train = config, Path(config.out), finetune_train_defaults()
        batch_size_given = config.train.batch_size != self.default_train.batch_size
        row_tokens, row_name = self.sequences_per_row * config.max_length, "--max-length"
        if self.sequences_per_row > 1:
            row_name = f"{self.sequences_per_row} x --max-length"
        self.train = batch_size_from_tokens(config.train, row_tokens, row_name, batch_size_given)
        if resume:
            check_same_fine_tune(self.out, config)

    def setup(self, processes: Processes) -> nn.Module:
        data = load_instructions(self.config.data, self.config.held_out_examples, self.config.max_examples)
        lm = self.load_base(processes)  # after the data: a bad example is found before a big model loads
        tokenizer, pad_id = self.base.tokenizer, self.base.tokenizer.pad_id
        encode = (tokenizer.render, tokenizer.encode)
        self.train_set = TokenizedExamples(data.train, *encode, self.max_length, self.config.pack, pad_id)
        self.held_out = TokenizedExamples(data.held_out, *encode, self.max_length, pad_id=pad_id)
        self.find_answers(data.held_out)
        return lm

    def load_base(self, processes: Processes) -> nn.Module:
        """The base model with what is trained made trainable (self.base, self.trainable), as the model interface."""
        config, device = self.config, processes.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.processes = processes
        self.base = load_pretrained(config.base, device, config.bits)
        self.trainable = attach_trainable(self.base, config)
        lm = HuggingFaceLM(self.trainable) if self.base.kind == "hf" else self.trainable
        self.max_length = min(config.max_length, lm.config.block_size)
        return lm

    def find_answers(self, held_out: list[Messages]) -> None:
        """The held-out conversations whose response carries a final answer, for answer_accuracy."""
        tokenizer = self.base.tokenizer
        self.answered = answered_prompts(held_out, tokenizer, self.max_length)
        longest = max((len(tokenizer.encode(question.reference)) for question in self.answered), default=0)
        self.answer_tokens = min(longest + ANSWER_MARGIN_TOKENS, self.max_length)

    def write_files(self, folder: Path) -> None:
        write_yaml(folder / FINETUNE_CONFIG_FILE, asdict(self.config))

    def fixed_settings(self) -> dict[str, Any]:
        """The config but the train section and out; dpo_beta is PreferenceTuning's (checkpoints of fine-tunes from
        before it existed resume)."""
        return {key: value for key, value in asdict(self.config).items() if key not in ("train", "out", "dpo_beta")}

    def describe(self, model: nn.Module) -> str:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return (
            f"fine-tuning {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
            f"({self.config.weights}), {len(self.train_set)} training rows, {len(self.held_out)} held out,"
        )

    @property
    def resume_command(self) -> str:
        return "the same `tinylm finetune` command with --resume"

    def checkpoint_activations(self, model: nn.Module) -> None:
        """Done by attach_trainable, before peft wraps the model (a Hugging Face model has its own switch)."""

    def batch(self, index: int, generator: torch.Generator, rows: slice) -> Batch:
        return self.train_set.training_batch(index, self.train.batch_size, self.train.seed, rows)

    def micro_batches(self, batch: Batch, size: int) -> list[Batch]:
        """Each micro-batch cut after its last labelled column (of every row, however the rows are grouped): a causal
        model's loss on the tokens before does not depend on what follows them. Tensors after (ids, labels) hold one
        value per row and stay whole."""
        cut = []
        for ids, labels, *per_row in super().micro_batches(batch, size):
            labelled = (labels != IGNORE).flatten(0, -2).any(dim=0).nonzero()
            width = int(labelled[-1]) + 1 if len(labelled) else 1
            cut.append((ids[..., :width], labels[..., :width], *per_row))
        return cut

    def targets(self, micro_batch: Batch) -> int:
        return int((micro_batch[1][:, 1:] != IGNORE).sum())

    def loss(self, forward: Forward, micro_batch: Batch) -> torch.Tensor:
        return response_nats(forward, *micro_batch)

    def evaluate(self, engine: Engine) -> dict[str, float]:
        """The mean loss per response token over every held-out example (each process takes every k-th)."""
        mine = list(range(self.processes.rank, len(self.held_out), self.processes.world_size))
        size = engine.micro_batch_size
        batches = [self.held_out_batch(mine[first : first + size]) for first in range(0, len(mine), size)]
        scores = {"val_loss": engine.mean_loss(batches)}
        if self.answered:
            scores["answer_accuracy"] = self.answer_accuracy(engine)
        return scores

    def held_out_batch(self, indices: list[int]) -> Batch:
        """The held-out examples `indices` as a batch `loss` takes."""
        return self.held_out.batch(indices)

    def answer_accuracy(self, engine: Engine) -> float:
        """The share of held-out examples whose greedy response ends in the reference's final answer. Every process
        generates them all, in the same steps: sharded weights (FSDP) need every process in each forward pass."""
        sampling = SampleConfig(max_new_tokens=self.answer_tokens, temperature=0.0)
        size, correct = engine.micro_batch_size, 0
        for first in range(0, len(self.answered), size):
            chunk = self.answered[first : first + size]
            with engine.autocast():
                responses = self.responses(engine.model, [question.prompt_ids for question in chunk], sampling)
            correct += sum(final_answer(self.response_text(ids)) == q.answer for ids, q in zip(responses, chunk))
        reshard(engine.model)
        return correct / len(self.answered)

    def responses(self, model: nn.Module, prompts: list[list[int]], sampling: SampleConfig) -> list[list[int]]:
        """The token ids `model` answers each prompt with: up to and with the token that ends its turn, or
        sampling.max_new_tokens of them."""
        stop_ids = self.base.tokenizer.stop_ids
        responses: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)
        for step in generate_tokens(model, prompts, sampling):
            for row, token in enumerate(step):
                if token is not None and not ended[row]:
                    responses[row].append(token.id)
                    ended[row] = token.id in stop_ids
            if all(ended) and self.processes.world_size == 1:  # alone, nothing to keep in step with
                break
        return responses

    def response_text(self, response: list[int]) -> str:
        """A response's text, without the token that ends its turn."""
        tokenizer = self.base.tokenizer
        ended = bool(response) and response[-1] in tokenizer.stop_ids
        return tokenizer.decode(response[:-1] if ended else response)

    def finish(self, model: nn.Module, result: TrainResult) -> None:
        device = self.processes.device
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result.details = {
            "held_out_loss_before": result.start["val_loss"],
            "held_out_loss_after": result.best_val_loss,
            "trainable_parameters": trained,
            "elapsed_s": result.elapsed_s,
            "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        }
        for score in result.best:  # answer_accuracy, DPO's accuracy and rewards (not GRPO's train_reward: no before)
            if score != "val_loss" and score in result.start:
                result.details[f"{score}_before"] = result.start[score]
                result.details[f"{score}_after"] = result.best[score]
        if not result.is_main:
            return
        save_outputs(self.out, self.config, self.base, self.trainable)
        # A local base is recorded by its absolute path: the adapter is loaded onto it from wherever tinylm runs next.
        base_path = Path(self.config.base).expanduser()
        recorded_base = str(base_path.resolve()) if base_path.exists() else self.config.base
        record = {
            "base": recorded_base,
            "kind": self.base.kind,
            "method": self.config.method,
            "weights": self.config.weights,
        }
        write_json(
            self.out / FINETUNE_RESULT_FILE, {**record, "out": str(self.out), "steps": result.steps, **result.details}
        )

    def config_record(self) -> dict[str, Any]:
        return asdict(self.config)


ANSWER_MARGIN_TOKENS = 16
"""Greedy responses may run this many tokens past the longest reference response before they are cut."""


@dataclass
class AnsweredQuestion:
    """A conversation whose last response carries a final answer to check."""

    prompt_ids: list[int]
    """The conversation up to that response, as the model reads it before answering."""
    question: str
    """The last message before the response."""
    answer: str
    """The reference response's final answer (`final_answer`)."""
    reference: str
    """The reference response."""


def answered_prompts(
    conversations: list[Messages], tokenizer: ChatTokenizer, max_length: int
) -> list[AnsweredQuestion]:
    """Each conversation whose last response carries a final answer, its prompt cut to the last max_length tokens."""
    found = []
    for messages in conversations:
        response = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        answer = final_answer(response)
        if answer is not None:
            prompt_ids = tokenizer.prompt_ids(messages[:-1])[-max_length:]
            question = messages[-2]["content"] if len(messages) > 1 else ""
            found.append(AnsweredQuestion(prompt_ids, question, answer, response))
    return found


def check_finetune_config(config: FinetuneConfig) -> None:
    check_config(Config(train=config.train))
    for key in ("lora_r", "max_length", "held_out_examples"):
        if getattr(config, key) < 1:
            raise TinylmError(f"--{key.replace('_', '-')} must be at least 1, not {getattr(config, key)}")
    if config.weights == "full" and config.bits is not None:
        raise TinylmError("--bits trains LoRA adapters on quantized weights; drop --full or --bits")
    if config.merge and config.bits is not None:
        raise TinylmError("--merge cannot fold an adapter into 4/8-bit weights; drop --merge and load base + adapter")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise TinylmError(f"--lora-dropout must be in [0, 1), not {config.lora_dropout}")
    defaults = FinetuneConfig(base=config.base, data=config.data)
    for method, keys in METHOD_OPTIONS.items():
        changed = [key for key in keys if getattr(config, key) != getattr(defaults, key)]
        if config.method != method and changed:
            option = f"--{changed[0].replace('_', '-')}"
            raise TinylmError(f"{option} applies to --method {method} only; drop it or pass --method {method}")
    if config.method == "dpo" and config.dpo_beta <= 0:
        raise TinylmError(f"--dpo-beta must be above 0, not {config.dpo_beta}")
    if config.method == "dpo" and config.pack:
        raise TinylmError("--pack lays instruction examples end to end; --method dpo keeps a pair per row: drop --pack")


METHOD_OPTIONS = {
    "dpo": ("dpo_beta",),
    "grpo": ("samples_per_prompt", "sample_temperature", "max_answer_tokens", "reward"),
}
"""The FinetuneConfig fields only one --method reads."""


def check_same_fine_tune(out: Path, config: FinetuneConfig) -> None:
    """--resume continues the fine-tune `out` was started with; only train.max_steps may change (to extend it)."""
    saved_file = out / FINETUNE_CONFIG_FILE
    if not saved_file.is_file():
        raise TinylmError(f"nothing to resume in {out}: it holds no {FINETUNE_CONFIG_FILE}; run without --resume")
    given = asdict(config)
    # A key saved before it existed (dpo_beta) takes its default.
    defaults = {f.name: f.default for f in fields(FinetuneConfig) if f.default is not MISSING}
    saved = {**defaults, **read_yaml(saved_file)}
    if saved.get("method") in ("lora", "full"):  # saved before `weights` was split off `method`
        saved["weights"], saved["method"] = saved["method"], "sft"
    if not isinstance(saved.get("train"), dict):
        raise TinylmError(f"{saved_file} has no train section: it is damaged; restore it or fine-tune again")
    saved["train"]["max_steps"] = given["train"]["max_steps"]
    changed = [key for key in given if given[key] != saved.get(key)]
    if changed:
        raise TinylmError(f"--resume needs the config {out} was started with; '{changed[0]}' differs")


def attach_trainable(base: Pretrained, config: FinetuneConfig) -> nn.Module:
    """The base with what is to be trained made trainable: LoRA adapters (everything else frozen), or every weight."""
    model = base.model
    checkpointing = config.train.activation_checkpointing
    if checkpointing and base.kind == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        checkpoint_blocks(model)
    if config.weights == "full":
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


def response_nats(lm: Forward, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (nats) of predicting each labelled token from the ones before it."""
    return -response_log_probs(lm, ids, labels).sum()


def response_log_probs(lm: Forward, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The log-probability (nats) of each row's labelled tokens together, each predicted from the ones before it."""
    logits, _ = lm(ids)
    targets = labels[:, 1:]
    nats = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return -nats.view_as(targets).sum(dim=1)


def save_outputs(out: Path, config: FinetuneConfig, base: Pretrained, trained: nn.Module) -> None:
    """The adapter (LoRA) and tokenizer in `out`, and with --merge or full fine-tuning the whole model in out/model.
    Each is written under a temporary name and moved into place."""
    staging = out / ".outputs.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if config.weights == "lora":
        trained.save_pretrained(str(staging))
        (staging / "README.md").unlink(missing_ok=True)  # peft's empty model card
    base.tokenizer.save(staging)
    for file in staging.iterdir():
        os.replace(file, out / file.name)
    staging.rmdir()
    if config.weights == "full" or config.merge:
        model = trained.merge_and_unload() if config.weights == "lora" else trained
        save_model_folder(out / MERGED_MODEL_FOLDER, base, model)


def save_model_folder(folder: Path, base: Pretrained, model: nn.Module) -> None:
    """A standalone model: a Hugging Face folder (config.json, model.safetensors, tokenizer), or for a tinylm base a
    tinylm run folder (config.yaml, model.safetensors, tokenizer, chat template)."""
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if base.kind == "hf":
        model.save_pretrained(str(staging))
    else:
        write_yaml(staging / CONFIG_FILE, base.config.to_dict())
        save_weights(model, staging / WEIGHTS_FILE)
    base.tokenizer.save(staging)
    replace_output(staging, folder)
