"""A finished (or running) training run, loaded from its folder: config, tokenizer and best weights together."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from tinylm.config import Config, resolve_config
from tinylm.data.prepare import prepare
from tinylm.device import resolve_device
from tinylm.errors import TinylmError
from tinylm.evaluate import EvalResult, evaluate
from tinylm.generate import encode_prompt, generate_tokens
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

    def stream(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece; unset options come from the run's `sample` config."""
        s = self.config.sample
        max_new_tokens = s.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = s.temperature if temperature is None else temperature
        top_k = s.top_k if top_k is None else top_k
        if max_new_tokens < 0:
            raise TinylmError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
        if temperature < 0:
            raise TinylmError(f"temperature must be 0 or more, not {temperature}")
        if top_k is not None and top_k < 1:
            raise TinylmError(f"top_k must be at least 1, not {top_k}")
        prompt_ids = encode_prompt(self.tokenizer, prompt)
        seed = s.seed if seed is None else seed
        new_ids: list[int] = []
        shown = ""
        for token in generate_tokens(self.model, prompt_ids, max_new_tokens, temperature, top_k, seed):
            new_ids.append(token)
            text = self.tokenizer.decode(new_ids)
            # A byte-level token can end inside a multi-byte character: wait for the bytes that complete it.
            if not text.endswith("\ufffd"):
                yield text[len(shown) :]
                shown = text
        if new_ids and len(text) > len(shown):
            yield text[len(shown) :]

    def generate(self, prompt: str, **options) -> str:
        """The prompt followed by its sampled continuation (options as for `stream`)."""
        return prompt + "".join(self.stream(prompt, **options))

    def evaluate(self, split: str = "val") -> EvalResult:
        """Loss, perplexity and bits per byte over the whole split of the run's dataset."""
        data = prepare(self.config.data)
        data.check_tokenizer(self.tokenizer)
        return evaluate(self.model, data.split(split), self.tokenizer.token_byte_lengths())


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
