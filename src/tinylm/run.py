"""A model ready to use: generate, chat, serve and evaluate all start from `load(path)`.

`path` may be a tinylm run folder (`tinylm train`, `tinylm import`), a `tinylm finetune` output folder (base + adapter,
or its merged model/), a Hugging Face model folder or hub name, a .gguf file, or a model shipped in a Python package
(smollm2-135m-instruct). Every kind becomes the same `Run`: a model behind tinylm's model interface (a Hugging Face
model through `HuggingFaceLM`), its tokenizer, and its chat template when it has one, so no command needs to know
which kind it was given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

from torch import nn

from tinylm.config import Config, DataConfig, LoadConfig, SampleConfig, check_sample_config
from tinylm.data.documents import open_source
from tinylm.data.instructions import Messages
from tinylm.device import resolve_device
from tinylm.errors import TinylmError
from tinylm.evaluate import DEFAULT_EVAL_CONTEXT, EvalResult, document_tokens, evaluate
from tinylm.generate import Piece, check_logit_bias, encode_prompt, stream_text
from tinylm.pretrained import ChatTokenizer, HuggingFaceLM, Pretrained, load_pretrained, load_tinylm_run
from tinylm.quantize import check_quantize, quantize_int8
from tinylm.runs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    FINETUNE_RESULT_FILE,
    HF_CONFIG_FILE,
    MERGED_MODEL_FOLDER,
    WEIGHTS_FILE,
    is_run,
    read_json,
    read_weights,
)
from tinylm.tokenizers import Tokenizer

ROLES = ("system", "developer", "user", "assistant")
"""A `developer` message (OpenAI's newer name for instructions to the model) is given to the template as `system`."""
SPLITS = ("train", "val", "test")


@dataclass
class Run:
    """A loaded model of any kind `load` takes (not only a run folder: a fine-tune, a Hugging Face model, a GGUF file),
    ready to generate, stream, reply and evaluate. The name is the user's word for what they trained or fetched."""

    path: Path
    """Where it was loaded from (a folder, a file, a hub name or a packaged model's name)."""
    model: nn.Module
    """Follows tinylm's model interface: model(ids, kv_cache=...) -> (logits, loss); model.config.block_size."""
    tokenizer: Tokenizer
    """Prompts and documents <-> token ids (text is ordinary text: "<|im_end|>" in a prompt stays characters)."""
    chat: ChatTokenizer | None = None
    """Renders a conversation through the model's chat template; None for a plain language model."""
    config: Config | None = None
    """A tinylm run's training config (its `sample` defaults and dataset); None for other models."""

    def sampling(self, **options) -> SampleConfig:
        """The run's `sample` config (SampleConfig's defaults for other models) with `options` in place of its values,
        checked: e.g. sampling(temperature=0, seed=None). None is null, for the fields that take it (`seed`: a
        different text each time; `top_k`: all tokens)."""
        names = [f.name for f in fields(SampleConfig)]
        unknown = set(options) - set(names)
        if unknown:
            raise TinylmError(
                f"unknown sampling option(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}"
            )
        sampling = replace(self.config.sample if self.config else SampleConfig(), **options)
        check_sample_config(sampling)
        return sampling

    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end a text: end-of-text, and an instruction-tuned model's end of turn."""
        return {self.tokenizer.end_of_text, *(self.chat.stop_ids if self.chat else ())}

    def stream_ids(
        self,
        prompts: list[list[int]],
        sampling: SampleConfig,
        top_logprobs: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Piece]:
        """Continue a batch of prompts given as token ids: pieces of text tagged with their prompt's index, as they
        come. A row ends at a stop token, a stop string or max_new_tokens. With `top_logprobs`, each piece's tokens
        carry their log-probabilities and that many likeliest tokens; setting `cancel` stops the generation."""
        check_logit_bias(sampling, self.model.config.vocab_size)  # here, not at the first piece: before any answer
        return stream_text(
            self.model, self.tokenizer, prompts, sampling, self.stop_ids, top_logprobs=top_logprobs, cancel=cancel
        )

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece; unset options come from the run's `sample` config
        (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`, `presence_penalty`,
        `frequency_penalty`, `logit_bias`, `stop`, `seed`)."""
        for piece in self.stream_ids([encode_prompt(self.tokenizer, prompt)], self.sampling(**options)):
            if piece.text:
                yield piece.text

    def generate(self, prompt: str | list[str], **options) -> str | list[str]:
        """The prompt followed by its sampled continuation (options as for `stream`); a list of prompts is sampled
        as one batch and gives a list."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        texts = list(prompts)
        for piece in self.stream_ids([encode_prompt(self.tokenizer, p) for p in prompts], self.sampling(**options)):
            texts[piece.row] += piece.text
        return texts[0] if isinstance(prompt, str) else texts

    def chat_prompt(self, messages: Messages) -> list[int]:
        """The token ids a reply to `messages` ({"role", "content"} dicts) continues: the conversation rendered by the
        chat template up to where the assistant's answer begins, or for a plain language model its texts joined."""
        for message in messages:
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise TinylmError(f"each message needs a role ({', '.join(ROLES)}) and a text content, not {message}")
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
        if self.chat is None:
            text = "".join(message["content"] for message in messages)
            return encode_prompt(self.tokenizer, text, "the conversation")
        ids = self.chat.prompt_ids(messages)
        if not ids:
            raise TinylmError("the conversation is empty; send a message with some text")
        return ids

    def stream_reply(self, messages: Messages, **options) -> Iterator[str]:
        """Yield the assistant's reply to `messages` piece by piece (options as for `stream`)."""
        for piece in self.stream_ids([self.chat_prompt(messages)], self.sampling(**options)):
            if piece.text:
                yield piece.text

    def reply(self, messages: Messages, **options) -> str:
        """The assistant's reply to `messages`, e.g. run.reply([{"role": "user", "content": "Hi"}], temperature=0)."""
        return "".join(self.stream_reply(messages, **options))

    def evaluate(
        self,
        split: str = "val",
        data: DataConfig | None = None,
        stride: int | None = None,
        block_size: int | None = None,
    ) -> EvalResult:
        """Loss, perplexity and bits per byte over the whole split of the run's dataset (or of `data`), read with a
        sliding window of `block_size` tokens (default: the model's context, at most DEFAULT_EVAL_CONTEXT) moved
        `stride` tokens at a time."""
        context = self.model.config.block_size
        block_size = min(context, DEFAULT_EVAL_CONTEXT) if block_size is None else block_size
        if not 1 <= block_size <= context:
            raise TinylmError(f"--block-size must be between 1 and the model's context {context}, not {block_size}")
        if split not in SPLITS:
            raise TinylmError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
        data = data or (self.config.data if self.config else None)
        if data is None:
            raise TinylmError(f"{self.path} has no dataset of its own; give the text to evaluate it on with --data")
        source = open_source(data)
        tokens, text_bytes = document_tokens(
            source.split_documents(split), self.tokenizer.encode, self.tokenizer.end_of_text
        )
        if text_bytes == 0:  # read again, only to say which splits there are
            there = sorted({name for name, _ in source.documents()}, key=SPLITS.index)
            raise TinylmError(f"the {split} split of {data.source} is empty; it has {', '.join(there) or 'no text'}")
        device = next(self.model.parameters()).device
        logits_of = lambda ids: self.model(ids)[0]  # noqa: E731
        return evaluate(logits_of, tokens, text_bytes, block_size, stride, self.model.config.vocab_size, device)


def load(path: str | Path, device: str = "auto", quantize: str | None = LoadConfig.quantize) -> Run:
    """Load a model (see the module docstring for what `path` may be) for generation, chat and evaluation;
    `quantize="int8"` makes its linear layers int8 on CPU (see LoadConfig.quantize)."""
    if quantize is None:
        return load_as_saved(path, device)
    target = resolve_device("cpu" if device == "auto" else device)  # int8 kernels are CPU kernels
    check_quantize(quantize, target)
    run = load_as_saved(path, str(target))
    quantize_int8(run.model)
    return run


def load_as_saved(path: str | Path, device: str = "auto") -> Run:
    folder = Path(path).expanduser()
    if is_run(folder):
        return pretrained_run(folder, load_tinylm_run(folder, resolve_device(device)))
    if (folder / FINETUNE_RESULT_FILE).is_file():
        return load_finetune_output(folder, device)
    if folder.is_dir() and not (folder / HF_CONFIG_FILE).is_file():
        raise TinylmError(
            f"{folder} is not a tinylm run folder ({CONFIG_FILE} + {WEIGHTS_FILE}), a fine-tune output "
            f"({FINETUNE_RESULT_FILE}) or a Hugging Face model folder ({HF_CONFIG_FILE}); give the --out folder of "
            "`tinylm train` or `finetune`"
        )
    return pretrained_run(Path(path), load_pretrained(str(path), resolve_device(device)))


def load_finetune_output(folder: Path, device: str = "auto") -> Run:
    """A `tinylm finetune` output folder, ready to answer through the chat template it was trained with: its merged
    model/ when it has one, else the base with the adapter on top."""
    if (folder / MERGED_MODEL_FOLDER).is_dir():
        return load_as_saved(folder / MERGED_MODEL_FOLDER, device)
    from peft import PeftModel

    info = read_json(folder / FINETUNE_RESULT_FILE)
    if not isinstance(info.get("base"), str):
        raise TinylmError(f"{folder / FINETUNE_RESULT_FILE} names no base model; restore it or fine-tune again")
    # Read here first, so that a missing or damaged file is named in one line (peft's own errors are tracebacks).
    read_json(folder / ADAPTER_CONFIG_FILE)
    read_weights(folder / ADAPTER_WEIGHTS_FILE)
    base = load_pretrained(info["base"], resolve_device(device))
    try:
        adapted = PeftModel.from_pretrained(base.model, str(folder))
    except (RuntimeError, ValueError, KeyError) as error:  # an adapter of other shapes or modules than the base's
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TinylmError(
            f"the adapter in {folder} does not fit its base {info['base']} ({reason[:200]}); restore the base it was "
            "trained on or fine-tune again"
        ) from None
    return pretrained_run(folder, replace(base, model=adapted, has_chat_template=True))


def pretrained_run(path: Path, pretrained: Pretrained) -> Run:
    """A Run of a model `load_pretrained` gave (its network possibly wrapped with a fine-tune's adapter)."""
    model = pretrained.model.eval()
    return Run(
        path,
        HuggingFaceLM(model) if pretrained.kind == "hf" else model,
        pretrained.text_tokenizer,
        pretrained.tokenizer if pretrained.has_chat_template else None,
        pretrained.config,
    )
