"""Everything a run is made of, as dataclasses: data, model, training and sampling, and the checks on their values.

A recipe is a YAML file with one section per dataclass (see `configs/`); `tinylm.recipes` parses it, with the command
line's dotted overrides, into a `Config`. The fully resolved config is saved as `config.yaml` in every run folder, and
`config_from_dict` reads it back without the recipe parser: loading a model never needs the command line's machinery.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import re
import types
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import docstring_parser
import yaml

from tinylm.errors import TinylmError
from tinylm.runs import CONFIG_FILE, read_yaml


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    source: str = "tinyshakespeare"
    """A dataset (tinyshakespeare, tinystories, tinystories-v1, wikitext2), a .txt/.jsonl/.json/.parquet file or a
    folder of them, or hf:owner/name[:config] for a Hugging Face dataset."""
    subset: str | None = None
    """A named part of a dataset, e.g. tinystories head10k (the first 10k lines, what the offline mirror holds)."""
    tokenizer: str = "char"
    """`char`; `bpe:N` (byte-level BPE with N tokens trained on the train split); `gpt2` (tiktoken); `hf:NAME` (a
    Hugging Face tokenizer); or the path of a tokenizer.json."""
    text_field: str = "text"
    """Field (.jsonl, .json, hf:) or column (.parquet) that holds each document's text."""
    val_fraction: float = 0.1
    """Share held out for validation when the source has no validation split of its own."""
    data_dir: str | None = None
    """Folder for prepared token files (default: the tinylm cache, `$TINYLM_CACHE` or ~/.cache/tinylm)."""
    num_proc: int | None = None
    """Tokenizer processes (default: every available core)."""
    shard_tokens: int = 100_000_000
    """Most tokens in one shard file."""
    token_dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Integer type of the token files; auto picks uint16 when the vocabulary fits in it."""
    packing: Literal["random", "bos"] = "random"
    """How training rows are cut from the token files: `random`, windows at random positions that run across
    document boundaries (nanoGPT); `bos`, rows that each start at a document's start, documents packed into them
    best-fit, attention kept inside each document (modded-nanogpt, nanochat)."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """`strict` stops at bytes that are not UTF-8; `replace` puts U+FFFD in their place and goes on."""


@dataclass
class ModelConfig:
    """The network. `preset` names a set of these fields; keys given beside it override the preset."""

    preset: str | None = None
    """A named model (`bigram`, `nanogpt-shakespeare-char`, ...), or null to set every field here."""
    depth: int | None = None
    """One size dial: n_layer = depth, n_embd = 64 * depth, n_head = n_embd / 64, and the train section's
    learning_rate, batch_size and max_steps (20 tokens per block parameter) from the rules in docs/train.md; keys
    set beside it win. null: set the sizes yourself."""
    arch: Literal["gpt", "bigram", "seq2seq"] = "gpt"
    """`gpt`: decoder-only Transformer. `bigram`: one embedding lookup from token to next-token logits. `seq2seq`:
    the encoder-decoder Transformer (n_layer encoder and n_layer decoder layers), trained on the `task` section."""
    vocab_size: int | None = None
    """Size of the token vocabulary; null takes it from the tokenizer."""
    block_size: int = 256
    """Context length: the most tokens the model sees at once."""
    n_layer: int = 6
    """Number of Transformer blocks."""
    n_head: int = 6
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 384
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention and residual branches while training."""
    bias: bool = True
    """Biases in linear layers and LayerNorms."""
    tie_embeddings: bool = True
    """Share the token embedding with the output layer (counted once in the parameter count)."""
    positions: Literal["learned", "rope"] = "learned"
    """`learned`: a position embedding added to the tokens (GPT-2). `rope`: rotary embeddings that turn q and k by
    position-dependent angles, so attention sees relative positions (Llama)."""
    rope_theta: float = 10000.0
    """RoPE base: the slowest rotation's wavelength grows with it (positions: rope)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """`layernorm` (GPT-2) or `rmsnorm` (Llama: scales by the root mean square, no centring, no bias)."""
    norm_eps: float = 1e-5
    """Epsilon added inside the norms' square root."""
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu2"] = "gelu"
    """`gelu`: fc, GELU, proj. `gelu_tanh`: the same with GELU's tanh approximation, as the released GPT-2 weights
    were trained. `swiglu`: proj(silu(gate(x)) * up(x)) (Llama). `relu2`: proj(relu(fc(x))^2) (Primer; modded-nanogpt,
    nanochat: cheaper than swiglu at equal FLOPs)."""
    mlp_hidden_size: int | None = None
    """Width inside the MLP; null: 4 * n_embd for gelu and relu2, 8/3 * n_embd rounded up to a multiple of 64 for
    swiglu (the same parameters as gelu's 4 * n_embd with two matrices)."""
    n_kv_head: int | None = None
    """Key/value heads; null: n_head (multi-head attention); 1: multi-query; between: grouped-query, each k/v head
    shared by n_head / n_kv_head query heads. Must divide n_head."""
    qk_norm: bool = False
    """Normalise queries and keys per head (with `norm`) before attention: steadier training at high learning rates."""
    logit_softcap: float | None = None
    """Squash the logits into (-cap, cap) as cap * tanh(logits / cap) (Gemma 2, modded-nanogpt): no logit runs away
    at high learning rates. null: off."""
    zero_init_projections: bool = False
    """Start each block's output projections (attention and MLP) at zero, so that every block starts as the identity
    and the residual stream as the embedding (modded-nanogpt)."""
    value_embeddings: bool = False
    """Give each layer a table of per-token vectors added to its attention values (modded-nanogpt, nanochat):
    parameters that cost a lookup, not a matrix multiply."""
    attention_window: int | None = None
    """How many of the newest positions a sliding layer (S in attention_pattern) attends to; null: none slides."""
    attention_pattern: str = "L"
    """Which layers slide, repeated over the depth: S attends to the newest attention_window positions, L to the
    whole context. `SSSL`: three sliding layers, then a long one, and again (modded-nanogpt, Gemma)."""

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (0-based), or None where it sees the whole context."""
        slides = self.attention_pattern[layer % len(self.attention_pattern)] == "S"
        return self.attention_window if slides else None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads with the null default resolved."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width with the null default resolved."""
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


@dataclass
class TrainConfig:
    """Optimisation, precision, parallelism, evaluation, checkpointing and logging."""

    max_steps: int = 2000
    """Optimizer steps to run."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """`adamw`, or `muon`: Muon on the hidden matrices and AdamW (learning_rate) on embeddings, norms and biases."""
    batch_size: int = 32
    """Sequences per optimizer step, summed over all processes: batch_size * model.block_size tokens per step."""
    batch_tokens: int | None = None
    """Tokens per optimizer step, summed over all processes. When set, batch_size = batch_tokens / the length of a
    row: model.block_size, a fine-tune's max_length (it must divide exactly; a batch_size given beside it must
    agree)."""
    micro_batch_size: int | None = None
    """Sequences per forward pass on each process; the batch is reached by accumulating gradients over micro-batches.
    null: the whole per-process batch on CPU and MPS, the largest that fits in memory on CUDA."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on GPUs that have it, fp16 autocast with loss scaling on those that do not (T4), fp32
    elsewhere."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate, reached at the end of warm-up."""
    muon_lr: float = 0.02
    """Peak Muon learning rate (optimizer: muon), on the same schedule."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""
    schedule: Literal["cosine", "linear", "wsd"] = "cosine"
    """After warm-up: `cosine` or `linear` decay to the floor at max_steps, or `wsd` (warm-up, stable, decay): the
    peak until the last decay_fraction of the steps, then a linear decay to the floor."""
    decay_fraction: float = 0.2
    """Share of max_steps spent decaying in the wsd schedule."""
    min_lr_ratio: float = 0.1
    """The schedule decays every learning rate to its peak * min_lr_ratio at max_steps."""
    warmup_steps: int = 100
    """Steps of linear warm-up from zero."""
    weight_decay: float = 0.1
    """Weight decay, applied to weight matrices and embeddings (as nanoGPT does), not to biases or norm gains; with
    Muon its matrices shrink by muon_lr x weight_decay a step."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights, updated after every step as average = d * average +
    (1 - d) * weights, d = min(ema_decay, (1 + step) / (10 + step)): evaluations, the best weights and every export
    are the average's (0: off; 0.99 remembers about the last 100 steps). Costs one more copy of the weights."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off (the norm is logged either way)."""
    compile: bool | None = None
    """torch.compile the model. null: on CUDA (a minute of compiling for faster steps), off elsewhere (on CPU it
    compiled for 73 s and gained nothing)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during the backward pass instead of keeping them: less memory, about a
    third more compute."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun with several processes: `ddp` (a whole model copy per process) or `fsdp` (parameters,
    gradients and optimizer state sharded over the processes, FSDP2), for models that do not fit one device."""
    eval_interval: int = 250
    """Evaluate on the validation batches, and save a checkpoint, every this many steps (and at the last step)."""
    eval_batches: int = 20
    """Fixed batches of batch_size sequences per evaluation (the same batches every time)."""
    patience: int | None = None
    """Stop early after this many evaluations without a better validation loss (null: never)."""
    max_time: str | None = None
    """Stop (with a checkpoint) after this much training time: seconds, or a number with s, m, h or d (`11h30m`)."""
    keep_checkpoints: int = 1
    """How many of the newest checkpoints/step-N folders to keep."""
    on_nan: Literal["stop", "skip"] = "stop"
    """On a NaN or infinite loss: `stop`, or `skip`: go back to the last checkpoint and continue with the next
    batches (three times at most)."""
    log_interval: int = 10
    """Write a training record to metrics.jsonl every this many steps."""
    log: Literal["none", "tensorboard", "wandb"] = "none"
    """Also send metrics to TensorBoard (run folder tensorboard/) or Weights & Biases (`pip install wandb`;
    WANDB_MODE=offline works)."""
    seed: int = 1337
    """Seeds weights, batches and dropout: the same seed gives the same run."""
    device: str = "auto"
    """`auto` (cuda, then mps, then cpu), or a torch device such as `cpu` or `cuda:1`."""
    threads: int | None = None
    """CPU threads for torch (null: torch's default, one per core)."""
    teacher: str | None = None
    """Distillation: a model whose next-token distributions the student also learns (anything `tinylm.load` takes
    that shares the student's tokenizer: a run, a Hugging Face folder, a .gguf, smollm2-135m-instruct). null: none."""
    distill_weight: float = 0.5
    """With a teacher: the loss is (1 - w) * cross-entropy + w * T^2 * KL(teacher || student) at temperature T."""
    distill_temperature: float = 1.0
    """With a teacher: the temperature T both distributions are softened by (Hinton et al. 2015)."""


@dataclass
class SampleConfig:
    """Text generation defaults, used after training and by `tinylm generate`. Each field is also an option of
    `tinylm generate` and `tinylm chat`, a `/set` key in chat and a field of `tinylm serve`'s requests; every one of
    them is checked by `check_sample_config`."""

    prompt: str = "\n"
    """Text the model continues."""
    max_new_tokens: int = 500
    """Most tokens to generate (0: none, only the prompt)."""
    temperature: float = 0.8
    """Softmax temperature; 0 picks the most likely token every time."""
    top_k: int | None = 200
    """Sample only among the k most likely tokens (null or 0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: only the smallest set of likeliest tokens whose probabilities reach top_p (1: all)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the likeliest token (0: keep all)."""
    repetition_penalty: float = 1.0
    """Make tokens already in the text less likely: above 1 penalises repeats (1: off)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the continuation already holds (OpenAI's; the prompt's tokens do not
    count), from -2 to 2: above 0 steers towards new tokens (0: off)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once for each time the continuation already holds it (OpenAI's), from -2 to 2:
    above 0 discourages verbatim repeats (0: off)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids before sampling, from -100 (never) to 100 (always), e.g. {"0": -100}."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the text; the text is cut just before the first one."""
    seed: int | None = 1337
    """Seed of the sampler: the same seed and prompt give the same text (null: a different text each time)."""


@dataclass
class LoadConfig:
    """How `tinylm.load` prepares a model for generate, chat, serve and eval (`--quantize`)."""

    quantize: Literal["int8"] | None = None
    """`int8`: every linear layer's weights as 8-bit integers (one scale per matrix), multiplied with its inputs by
    the CPU's int8 kernels: about 4x smaller matrices and faster decoding, at slightly higher bits per byte (CPU only);
    null: the weights as saved."""


@dataclass
class ExportConfig:
    """How `tinylm export` writes a run."""

    quant: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = "f32"
    """GGUF weight type: f32 (llama.cpp computes tinylm's logits), f16, bf16, or llama.cpp's block quantizations
    q8_0, q5_1, q5_0, q4_1, q4_0 (a matrix whose rows are not a multiple of 32 stays f16; norms and biases stay
    f32). The gguf package writes no k-quants."""


@dataclass
class ServeLimits:
    """What `tinylm serve` lets one request ask for, and how many it serves at once: each limit is a flag of
    `tinylm serve`, and a request beyond one gets a 400 that names it."""

    max_prompt_tokens: int = 4096
    """Longest prompt accepted, in tokens."""
    max_tokens: int = 1024
    """Most new tokens one text may ask for (also what a chat request that gives no max_tokens gets)."""
    max_concurrent: int = 4
    """Requests generating at once; more are answered 429 at once."""
    max_batch: int = 16
    """Most texts one request generates: its prompts times n."""
    max_batch_tokens: int = 32768
    """Most tokens one request may hold, summed over its texts: each one's prompt and max_tokens."""
    max_stop: int = 16
    """Most stop strings in one request."""
    max_stop_chars: int = 256
    """Longest stop string, in characters."""


API_KEY_VARIABLE = "TINYLM_API_KEY"
"""The environment variable that gives `tinylm serve` its API key when --api-key does not."""


def check_serve_limits(limits: ServeLimits) -> None:
    for name, value in asdict(limits).items():
        if value < 1:
            raise TinylmError(f"--{name.replace('_', '-')} must be at least 1, not {value}")


@dataclass
class TaskConfig:
    """The synthetic sequence-to-sequence task a `seq2seq` model learns (model.arch: seq2seq; other models ignore it).

    Sequences of symbols `0 .. symbols-1` with random lengths; the model reads one and writes it back (`copy`) or
    backwards (`reverse`). Held-out sequences are never trained on."""

    kind: Literal["copy", "reverse"] = "copy"
    """`copy`: write the sequence as it is; `reverse`: write it last symbol first."""
    symbols: int = 10
    """Distinct symbols a sequence is made of."""
    min_length: int = 1
    """Shortest sequence."""
    max_length: int = 16
    """Longest sequence; model.block_size must be at least max_length + 1 (room for EOS and BOS)."""
    val_sequences: int = 1000
    """Distinct held-out sequences that measure exact-sequence accuracy (and are never trained on)."""
    label_smoothing: float = 0.0
    """Share of each target's probability spread evenly over the vocabulary in the training loss (the paper: 0.1)."""
    stop_accuracy: float | None = None
    """Stop training at the first evaluation whose held-out exact-sequence accuracy reaches this (null: never)."""


@dataclass
class Config:
    """A whole run: one section per part, and the folder it writes."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    out: str = "out/run"
    """Run folder: config, tokenizer, checkpoints, metrics and samples go here."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


def finetune_train_defaults() -> TrainConfig:
    """Fine-tuning moves a trained model a little: a lower learning rate, short warm-up, few steps, no decay."""
    return TrainConfig(
        max_steps=200, batch_size=8, learning_rate=2e-4, warmup_steps=10, weight_decay=0.0, eval_interval=50
    )


@dataclass
class FinetuneConfig:
    """A fine-tuning run: the base model, the data, what is learned, which weights, and the training schedule."""

    base: str
    """A Hugging Face model name or folder, a .gguf file, a tinylm run folder, or smollm2-135m-instruct."""
    data: str
    """Instruction data: gsm8k, alpaca, tinystories-chat[:SUBSET] (TinyStories' training stories, each asked for in a
    request made from it), or a .jsonl/.json file of Alpaca-form or chat-form examples; for --method dpo a .jsonl/.json
    file of preference pairs ({prompt, chosen, rejected} or {messages, chosen, rejected})."""
    out: str = "out/finetune"
    """Folder for the adapter, the merged model, metrics and checkpoints."""
    method: Literal["sft", "dpo", "grpo"] = "sft"
    """What is learned: `sft` the responses of instruction data; `dpo` to prefer the chosen over the rejected response
    of preference pairs; `grpo` answers that a reward function scores (reinforcement learning)."""
    dpo_beta: float = 0.1
    """DPO's beta: an answer's reward is beta times the log of how much likelier the fine-tune makes it than the base
    does; a larger beta keeps the fine-tune closer to the base. --method dpo only."""
    weights: Literal["lora", "full"] = "lora"
    """`lora`: train small low-rank adapters beside frozen weights; `full`: train every weight."""
    lora_r: int = 8
    """Rank of each LoRA adapter."""
    lora_alpha: float = 16.0
    """LoRA scale: an adapter's update is multiplied by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input while training."""
    target_modules: list[str] | None = None
    """Names of the linear layers that get adapters (e.g. [q_proj, v_proj]; tinylm: [qkv, proj, fc]); null: peft's
    choice for known Hugging Face architectures, every hidden linear layer of a tinylm GPT."""
    bits: Literal[4, 8] | None = None
    """Load a Hugging Face base in 4-bit (NF4) or 8-bit weights for QLoRA; CUDA and bitsandbytes only."""
    merge: bool = False
    """Also save the model with the adapter folded into its weights, in out/model."""
    max_length: int = 512
    """Most tokens of one training sequence (also capped by the model's context)."""
    pack: bool = False
    """Lay examples end to end in rows of max_length tokens instead of one padded example per row."""
    held_out_examples: int = 50
    """Examples held out (spread evenly through the data) to measure the loss before and after."""
    max_examples: int | None = None
    """Use only the first this many examples of the data (null: all)."""
    samples_per_prompt: int = 4
    """grpo: answers sampled to each question per step; each is rewarded against the mean of its group (at least 2,
    and train.batch_size is this many times the questions of a step)."""
    sample_temperature: float = 1.0
    """grpo: softmax temperature of the sampled answers (1: the model's own distribution, on-policy)."""
    max_answer_tokens: int = 256
    """grpo: most tokens of a sampled or greedy held-out answer; the question keeps the last max_length minus this
    many tokens of the prompt."""
    reward: str | None = None
    """grpo: the reward of an answer, `module:function` or `path/to/file.py:function`, called as
    `function(prompt: str, completion: str, answer: str) -> float` with the last message before the response, the
    sampled answer and the reference's final answer (null: 1.0 when the answer's final `#### ...` value equals the
    reference's, else 0.0)."""
    train: TrainConfig = field(default_factory=finetune_train_defaults)
    """Steps, learning rate, batch and micro-batch size (gradient accumulation), precision, activation checkpointing,
    warm-up, evaluation and logging intervals, seed, device, threads."""


STORY_REQUESTS = (
    "Tell me a short story with the words dog, ball and happy.",
    "Tell me a story that starts with: Once upon a time, there was a little cat named Mia.",
)
"""What a pipeline asks its final model by default: requests like those of the tinystories-chat set."""


@dataclass
class PipelineEvalConfig:
    """What a pipeline's eval stage measures, into eval/results.json."""

    bits_per_byte: bool = True
    """Bits per byte of each trained model (the pretrained one and each fine-tune) on the held-out split of the
    pretraining text."""
    stories: int = 10
    """Complete the first this many of the TinyStories paper's 44 evaluation prompts with the final model and score
    the stories as `tinylm eval --stories` does (0: none)."""
    chat: list[str] = field(default_factory=lambda: list(STORY_REQUESTS))
    """Requests the final model answers through its chat template (when a fine-tune made it a chat model); the
    replies are saved beside the scores."""
    max_new_tokens: int = 200
    """Most tokens of each story and reply; the other sampling settings are the pretraining recipe's `sample`."""


@dataclass
class PipelineExportConfig:
    """What a pipeline exports of its final model, into export/."""

    gguf: ExportConfig | None = field(default_factory=ExportConfig)
    """export/model.gguf for llama.cpp and Ollama, its weights as `quant` (e.g. {quant: q8_0}); null: none."""
    hf: bool = False
    """export/hf: a Hugging Face transformers folder."""


@dataclass
class PipelineConfig:
    """A pipeline: tokenizer, pretraining, fine-tunes, evaluation, report card and export in one command, each stage
    writing a sub-folder of `out` (tinylm.pipeline)."""

    pretrain: str | dict[str, Any]
    """The pretraining run: a train recipe's path (relative to the pipeline recipe's folder), or a mapping of recipe
    sections (data, model, train, sample) whose keys override the train recipe that its `recipe` key names, if any."""
    sft: dict[str, Any] | None = None
    """Instruction fine-tuning of the pretrained model: `tinylm finetune`'s keys (data, weights, max_length, train,
    ...) but base, out, merge and bits, which the pipeline sets; null: none."""
    preference: dict[str, Any] | None = None
    """Preference tuning of the model so far (method dpo), with the keys of sft; null: none."""
    rl: dict[str, Any] | None = None
    """Reinforcement learning of the model so far (method grpo), with the keys of sft; null: none."""
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    """What the eval stage measures."""
    report: bool = True
    """Write report/report.md: the trained stages' report cards side by side, with the stage times and figures."""
    export: PipelineExportConfig = field(default_factory=PipelineExportConfig)
    """What the export stage writes of the final model."""
    out: str = "out/pipeline"
    """The pipeline's folder: a sub-folder per stage, and pipeline.json with each stage's settings, seconds and
    figures."""


def pipeline_config_from_dict(values: Mapping[str, Any]) -> PipelineConfig:
    """The PipelineConfig of a pipeline recipe's mapping: every key a field and every value of its field's type, or
    a one-line error naming the key. The stage sections are checked as the pipeline resolves them."""
    return _dataclass_from_dict(PipelineConfig, values, "")


def finetune_config_from_dict(values: Mapping[str, Any], prefix: str = "") -> FinetuneConfig:
    """The FinetuneConfig a mapping of its fields describes (a pipeline's fine-tuning section with its base and out
    added), checked as a saved config is; the train keys it leaves out take finetune_train_defaults'."""
    train = values.get("train", {}) if isinstance(values, Mapping) else None
    if isinstance(train, Mapping):
        values = {**values, "train": {**asdict(finetune_train_defaults()), **train}}
    return _dataclass_from_dict(FinetuneConfig, values, prefix)


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """The Config that a saved, fully resolved dict describes (a run folder's config.yaml), checked as a recipe is.

    Every key must be a field of its section and every value of its field's type, or the error names the key; a key
    left out takes its default, so a run saved before a field existed still loads. No preset is applied: the saved
    model fields are the preset's values already."""
    config = _dataclass_from_dict(Config, values, "")
    config = apply_batch_tokens(config, "batch_size" in values.get("train", {}))
    check_config(config)
    return config


def run_config(folder: Path) -> Config:
    """The Config in a run folder's config.yaml; a one-line TinylmError naming the file when it is missing, damaged
    or holds settings that no longer make a valid config."""
    path = Path(folder) / CONFIG_FILE
    return saved_config(read_yaml(path), path)


def saved_config(values: Mapping[str, Any], path: Path) -> Config:
    """config_from_dict of the settings read from `path`, its errors naming the file they are in."""
    try:
        return config_from_dict(values)
    except TinylmError as error:
        raise TinylmError(f"{path} is not a valid run config ({error}); restore it or write the run again") from None


def _dataclass_from_dict(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, Mapping):
        where = f"config section '{prefix[:-1]}'" if prefix else "a config"
        raise TinylmError(f"{where} must be a mapping of keys to values, not {values!r}")
    types_of = get_type_hints(cls)
    unknown = sorted(set(values) - set(types_of))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(types_of), n=1, cutoff=0.6)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise TinylmError(f"unknown config key '{prefix}{unknown[0]}' (not a field of {cls.__name__}){hint}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise TinylmError(f"config key '{prefix}{missing[0]}' is missing: {cls.__name__} has no default for it")
    given = {}
    for name, value in values.items():
        section, optional = _without_none(types_of[name])
        if is_dataclass(section) and not (optional and value is None):
            given[name] = _dataclass_from_dict(section, value, f"{prefix}{name}.")
        else:
            given[name] = _typed(value, types_of[name], prefix + name)
    return cls(**given)


def _typed(value: Any, kind: Any, key: str) -> Any:
    """`value` if a field of type `kind` may hold it (an int where a float is wanted becomes a float: YAML reads
    `learning_rate: 1` as an int), else a one-line error naming the key."""
    origin, args = get_origin(kind), get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in args:
            with contextlib.suppress(TinylmError):
                return _typed(value, option, key)
    elif origin is Literal:
        if value in args:
            return value
    elif origin is list:
        if isinstance(value, list):
            with contextlib.suppress(TinylmError):  # the error names the whole list's type, not an item's
                return [_typed(item, args[0], key) for item in value]
    elif origin is dict:
        if isinstance(value, Mapping):
            with contextlib.suppress(TinylmError):
                return {_typed(k, args[0], key): _typed(v, args[1], key) for k, v in _int_keys(dict(value)).items()}
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):  # bool is an int in Python
        return value
    expected = f"one of {', '.join(map(repr, args))}" if origin is Literal else str(kind) if origin else kind.__name__
    expected = expected.replace(" | None", " or null")
    raise TinylmError(f"config key '{key}' expects {expected}, got {value!r}")


def apply_batch_tokens(config: Config, batch_size_given: bool) -> Config:
    """One rule: batch_size sequences of block_size tokens make a step; batch_tokens, when set, decides batch_size."""
    train = batch_size_from_tokens(config.train, config.model.block_size, "model.block_size", batch_size_given)
    return replace(config, train=train)


def batch_size_from_tokens(train: TrainConfig, row_tokens: int, row_name: str, batch_size_given: bool) -> TrainConfig:
    """`train` with batch_size = batch_tokens / the tokens of one row (`row_name` says where that length is set)."""
    if train.batch_tokens is None:
        return train
    if train.batch_tokens < 1 or train.batch_tokens % row_tokens:
        raise TinylmError(
            f"train.batch_tokens ({train.batch_tokens}) must be a positive multiple of {row_name} ({row_tokens})"
        )
    batch_size = train.batch_tokens // row_tokens
    if batch_size_given and train.batch_size != batch_size:
        raise TinylmError(
            f"train.batch_size {train.batch_size} x {row_name} {row_tokens} is not train.batch_tokens "
            f"{train.batch_tokens}; set only one of batch_size and batch_tokens"
        )
    return replace(train, batch_size=batch_size)


def check_config(config: Config) -> None:
    """Reject values that type-check but cannot work, with the fix in the message."""
    model, train, data = config.model, config.train, config.data
    if model.arch in ("gpt", "seq2seq"):
        if model.n_layer < 1 or model.n_embd < 1 or model.n_head < 1:
            raise TinylmError(
                f"model.n_layer, model.n_head and model.n_embd must be at least 1 for a {model.arch} model"
            )
        if model.n_embd % model.n_head:
            raise TinylmError(f"model.n_embd ({model.n_embd}) must be a multiple of model.n_head ({model.n_head})")
        if model.n_kv_head is not None and (model.n_kv_head < 1 or model.n_head % model.n_kv_head):
            raise TinylmError(
                f"model.n_kv_head ({model.n_kv_head}) must divide model.n_head ({model.n_head}): "
                "1 for multi-query, n_head (or null) for multi-head"
            )
        if model.positions == "rope" and model.head_dim % 2:
            raise TinylmError(
                f"positions: rope needs an even head size, but n_embd / n_head = {model.head_dim}; "
                "change model.n_embd or model.n_head"
            )
        if model.rope_theta <= 0 or model.norm_eps <= 0:
            raise TinylmError("model.rope_theta and model.norm_eps must be positive")
        if model.mlp_hidden_size is not None and model.mlp_hidden_size < 1:
            raise TinylmError(f"model.mlp_hidden_size must be at least 1 (or null), not {model.mlp_hidden_size}")
        if model.depth is not None and model.depth < 1:
            raise TinylmError(f"model.depth must be at least 1 (or null), not {model.depth}")
        if model.logit_softcap is not None and not 0 < model.logit_softcap < math.inf:
            raise TinylmError(f"model.logit_softcap must be a positive number (or null), not {model.logit_softcap}")
        if not model.attention_pattern or set(model.attention_pattern) - {"S", "L"}:
            raise TinylmError(
                f"model.attention_pattern {model.attention_pattern!r} must be letters S (sliding) and L (long), "
                "e.g. SSSL"
            )
        if model.attention_window is not None and model.attention_window < 1:
            raise TinylmError(f"model.attention_window must be at least 1 (or null), not {model.attention_window}")
        if "S" in model.attention_pattern and model.attention_window is None:
            raise TinylmError("model.attention_pattern has sliding layers (S): set model.attention_window")
    if model.block_size < 1:
        raise TinylmError("model.block_size must be at least 1")
    if not 0.0 <= model.dropout < 1.0:
        raise TinylmError(f"model.dropout must be in [0, 1), not {model.dropout}")
    if not 0.0 < data.val_fraction < 1.0:
        raise TinylmError(f"data.val_fraction must be between 0 and 1, not {data.val_fraction}")
    if data.shard_tokens < 1:
        raise TinylmError(f"data.shard_tokens must be at least 1, not {data.shard_tokens}")
    if data.num_proc is not None and data.num_proc < 1:
        raise TinylmError(f"data.num_proc must be at least 1, not {data.num_proc}")
    for key in ("max_steps", "batch_size", "eval_interval", "eval_batches", "log_interval", "keep_checkpoints"):
        if getattr(train, key) < 1:
            raise TinylmError(f"train.{key} must be at least 1, not {getattr(train, key)}")
    for key in ("micro_batch_size", "patience"):
        if getattr(train, key) is not None and getattr(train, key) < 1:
            raise TinylmError(f"train.{key} must be at least 1 (or null), not {getattr(train, key)}")
    if train.micro_batch_size is not None and train.batch_size % train.micro_batch_size:
        raise TinylmError(
            f"train.batch_size ({train.batch_size}) must be a multiple of train.micro_batch_size "
            f"({train.micro_batch_size}), the micro-batches accumulated into one step"
        )
    if not 0.0 <= train.ema_decay < 1.0:
        raise TinylmError(f"train.ema_decay must be in [0, 1) (0: no average), not {train.ema_decay}")
    if not 0.0 < train.decay_fraction <= 1.0:
        raise TinylmError(f"train.decay_fraction must be in (0, 1], not {train.decay_fraction}")
    if train.max_time is not None:
        parse_duration(train.max_time)
    for key in ("learning_rate", "muon_lr"):
        if getattr(train, key) <= 0:
            raise TinylmError(f"train.{key} must be positive, not {getattr(train, key)}")
    untaught = TrainConfig()
    distilling = (train.distill_weight, train.distill_temperature)
    if train.teacher is None and distilling != (untaught.distill_weight, untaught.distill_temperature):
        raise TinylmError("train.distill_weight and train.distill_temperature need a train.teacher to learn from")
    if not 0.0 <= train.distill_weight <= 1.0:
        raise TinylmError(f"train.distill_weight must be in [0, 1], not {train.distill_weight}")
    if not 0.0 < train.distill_temperature < math.inf:
        raise TinylmError(f"train.distill_temperature must be a positive number, not {train.distill_temperature}")
    check_sample_config(config.sample, "sample.")
    if model.arch == "seq2seq":
        check_task_config(config)


def check_task_config(config: Config) -> None:
    task = config.task
    if task.symbols < 2:
        raise TinylmError(f"task.symbols must be at least 2, not {task.symbols}")
    if not 1 <= task.min_length <= task.max_length:
        raise TinylmError(
            f"task.min_length ({task.min_length}) must be at least 1 and at most task.max_length ({task.max_length})"
        )
    if config.model.block_size < task.max_length + 1:
        raise TinylmError(
            f"model.block_size ({config.model.block_size}) must be at least task.max_length + 1 "
            f"({task.max_length + 1}): a sequence plus its EOS or BOS"
        )
    distinct = sum(task.symbols**length for length in range(task.min_length, task.max_length + 1))
    if not 1 <= task.val_sequences <= distinct // 2:
        raise TinylmError(
            f"task.val_sequences ({task.val_sequences}) must be between 1 and half the {distinct} distinct sequences, "
            "so that most are left to train on; lower it or raise task.max_length or task.symbols"
        )
    if not 0.0 <= task.label_smoothing < 1.0:
        raise TinylmError(f"task.label_smoothing must be in [0, 1), not {task.label_smoothing}")
    if task.stop_accuracy is not None and not 0.0 < task.stop_accuracy <= 1.0:
        raise TinylmError(f"task.stop_accuracy must be in (0, 1] or null, not {task.stop_accuracy}")


def check_sample_config(sample: SampleConfig, prefix: str = "") -> None:
    """Reject sampling settings that cannot work, in one line that says what would. The one check of every way in:
    a recipe, the command line, the Python API, chat's /set and the server. `prefix` names where they came from
    (`sample.` in a recipe)."""
    for name, hint in get_type_hints(SampleConfig).items():
        value = getattr(sample, name)
        if not _has_type(value, hint):
            raise TinylmError(f"{prefix}{name} must be {_type_words(hint)}, not {value!r}")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(sample, name)):  # nan passes every comparison below
            raise TinylmError(f"{prefix}{name} must be a finite number, not {getattr(sample, name)}")
    if sample.max_new_tokens < 0:
        raise TinylmError(f"{prefix}max_new_tokens must be 0 or more, not {sample.max_new_tokens}")
    if sample.temperature < 0:
        raise TinylmError(f"{prefix}temperature must be 0 or more, not {sample.temperature}")
    if sample.top_k is not None and sample.top_k < 0:
        raise TinylmError(f"{prefix}top_k must be 0 (all tokens) or more, not {sample.top_k}")
    if not 0 < sample.top_p <= 1:
        raise TinylmError(f"{prefix}top_p must be in (0, 1], not {sample.top_p}")
    if not 0 <= sample.min_p < 1:
        raise TinylmError(f"{prefix}min_p must be in [0, 1), not {sample.min_p}")
    if sample.repetition_penalty <= 0:
        raise TinylmError(f"{prefix}repetition_penalty must be positive (1: off), not {sample.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(sample, name) <= 2:
            raise TinylmError(f"{prefix}{name} must be between -2 and 2 (0: off), not {getattr(sample, name)}")
    for token, bias in sample.logit_bias.items():
        if token < 0 or not -100 <= bias <= 100:  # nan fails the range test
            raise TinylmError(
                f"{prefix}logit_bias maps token ids (0 or more) to numbers from -100 to 100, not {token}: {bias}"
            )
    if any(not stop for stop in sample.stop):
        raise TinylmError(f"{prefix}stop strings must not be empty")
    if sample.seed is not None and not -(2**63) <= sample.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise TinylmError(f"{prefix}seed must be between -2**63 and 2**64 - 1 (or null), not {sample.seed}")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring on one line: the help of every option derived from the field."""
    return {
        doc.arg_name: " ".join((doc.description or "").split())
        for doc in docstring_parser.parse_from_object(cls).params
    }


def setting_from_text(cls: type, name: str, text: str) -> Any:
    """The value of field `name` of `cls` typed as text (a command-line option, chat's /set), read by the field's
    type: `0.7` and `inf` for numbers, `null` for optional fields, JSON for lists (`["\\n\\n"]`). The section's
    check judges the value afterwards, as it judges the same value from anywhere else."""
    hint = get_type_hints(cls)[name]
    kind, optional = _without_none(hint)
    if optional and text.strip().lower() in ("null", "none"):
        return None
    try:
        value = json.loads(text) if get_origin(kind) in (list, dict) else kind(text)
    except ValueError:  # json.JSONDecodeError is one too
        value = text
    if get_origin(kind) is dict and isinstance(value, dict):
        value = _int_keys(value)
    if not _has_type(value, hint):
        raise TinylmError(f"{name} must be {_type_words(hint)}, not {text!r}")
    return value


def _without_none(hint: Any) -> tuple[Any, bool]:
    """(T, True) for the type `T | None`; (hint, False) for any other."""
    if get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint):
        return next(arg for arg in get_args(hint) if arg is not type(None)), True
    return hint, False


def _int_keys(mapping: dict) -> dict:
    """JSON's object keys are strings: {"50256": -100} means token 50256. A key that is no whole number stays as it
    is, for the type check to name."""
    return {int(key) if isinstance(key, str) and re.fullmatch(r"-?\d+", key) else key: v for key, v in mapping.items()}


def _has_type(value: Any, hint: Any) -> bool:
    kind, optional = _without_none(hint)
    if value is None or isinstance(value, bool):  # bool is an int to Python, never a setting's number
        return value is None and optional
    if get_origin(kind) is list:
        return isinstance(value, list) and all(isinstance(item, get_args(kind)[0]) for item in value)
    if get_origin(kind) is dict:
        key_type, value_type = get_args(kind)
        return isinstance(value, dict) and all(
            _has_type(key, key_type) and _has_type(item, value_type) for key, item in value.items()
        )
    return isinstance(value, (int, float) if kind is float else kind)


def _type_words(hint: Any) -> str:
    kind, optional = _without_none(hint)
    lists = 'a list of strings, e.g. ["\\n\\n"]'
    maps = 'a map of token ids to numbers, e.g. {"0": -100}'
    if get_origin(kind) in (list, dict):
        words = lists if get_origin(kind) is list else maps
    else:
        words = {int: "a whole number", float: "a number", str: "a string"}[kind]
    return f"{words} or null" if optional else words


def parse_duration(text: str) -> float:
    """Seconds in `3600`, `90s`, `45m`, `12h`, `1d` or a sum such as `1h30m`."""
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+|\d+(?:\.\d+)?", text.strip())
    if not parts:
        raise TinylmError(f"train.max_time '{text}' is not a duration; write e.g. 3600, 90m, 12h or 1h30m")
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text))
