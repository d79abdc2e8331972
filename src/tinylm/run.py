"""A finished (or running) training run, loaded from its folder: config, tokenizer and best weights together."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml
from torch import nn

from tinylm.config import Config, DataConfig, SampleConfig, check_sample_config, resolve_config
from tinylm.data.documents import open_source
from tinylm.device import resolve_device
from tinylm.errors import TinylmError
from tinylm.evaluate import EvalResult, document_tokens, evaluate
from tinylm.generate import Piece, encode_prompt, stream_text
from tinylm.model import build_model
from tinylm.tokenizers import Tokenizer, load_tokenizer
from tinylm.training.checkpoint import BEST_WEIGHTS, load_weights
from tinylm.training.trainer import CONFIG_FILE


@dataclass
class Run:
    path: Path
    config: Config
    tokenizer: Tokenizer
    model: nn.Module

    def sampling(self, **options) -> SampleConfig:
        """The run's `sample` config with the options given (not None) in place of its values, checked."""
        unknown = set(options) - {f.name for f in fields(SampleConfig)}
        if unknown:
            raise TinylmError(f"unknown sampling option(s) {', '.join(sorted(unknown))}")
        sampling = replace(self.config.sample, **{key: value for key, value in options.items() if value is not None})
        check_sample_config(sampling)
        return sampling

    def stream_ids(self, prompts: list[list[int]], sampling: SampleConfig) -> Iterator[Piece]:
        """Continue a batch of prompts given as token ids: pieces of text tagged with their prompt's index, as they
        come. A row ends at the end-of-text token, a stop string or max_new_tokens."""
        return stream_text(self.model, self.tokenizer, prompts, sampling, [self.tokenizer.end_of_text])

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece; unset options come from the run's `sample` config
        (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty`, `stop`, `seed`)."""
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

    def evaluate(
        self,
        split: str = "val",
        data: DataConfig | None = None,
        stride: int | None = None,
        block_size: int | None = None,
    ) -> EvalResult:
        """Loss, perplexity and bits per byte over the whole split of the run's dataset (or of `data`), read with a
        sliding window of `block_size` tokens (default: the model's context) moved `stride` tokens at a time."""
        block_size = block_size or self.config.model.block_size
        if not 1 <= block_size <= self.config.model.block_size:
            raise TinylmError(f"--block-size must be between 1 and the model's context {self.config.model.block_size}")
        documents = open_source(data or self.config.data).split_documents(split)
        tokens, text_bytes = document_tokens(documents, self.tokenizer.encode, self.tokenizer.end_of_text)
        device = next(self.model.parameters()).device
        logits_of = lambda ids: self.model(ids)[0]  # noqa: E731
        return evaluate(logits_of, tokens, text_bytes, block_size, stride, self.tokenizer.vocab_size, device)


def load(path: str | Path, device: str = "auto") -> Run:
    """Load a run folder written by `tinylm train` for generation and evaluation."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / BEST_WEIGHTS).is_file():
        raise TinylmError(
            f"{path} is not a tinylm run folder (it needs {CONFIG_FILE} and {BEST_WEIGHTS}); "
            "give the --out folder of a finished `tinylm train`"
        )
    config = resolve_config(yaml.safe_load((path / CONFIG_FILE).read_text()))
    if config.model.arch == "seq2seq":
        raise TinylmError(
            f"{path} holds a seq2seq model, which answers sequences rather than continuing text; "
            f'use `tinylm translate {path} "3 1 4 1 5"` or tinylm.load_copy_task()'
        )
    tokenizer = load_tokenizer(path)
    model = build_model(config.model).to(resolve_device(device))
    load_weights(model, path / BEST_WEIGHTS)
    model.eval()
    return Run(path, config, tokenizer, model)
