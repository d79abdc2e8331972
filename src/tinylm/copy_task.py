"""The copy task: a sequence-to-sequence model reads a random sequence of symbols and writes it back, as it is
(`copy`) or last symbol first (`reverse`). The smallest task on which an encoder-decoder Transformer shows what its
cross-attention does: copying attends along the diagonal, reversing along the anti-diagonal.

People write sequences as symbol numbers separated by spaces, "3 1 4 1 5"; symbol s is token id s + 3, after the
special tokens PAD, BOS and EOS. The source is the symbols then EOS; the decoder reads BOS then the answer and learns
to predict the answer then EOS.

`load_copy_task(run_dir)` loads a trained run to translate sequences and draw its cross-attention.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.config import Config, TaskConfig, run_config
from tinylm.device import resolve_device
from tinylm.errors import TinylmError
from tinylm.model import build_model
from tinylm.model.seq2seq import BOS, EOS, PAD, Seq2SeqTransformer
from tinylm.runs import CONFIG_FILE, WEIGHTS_FILE, load_weights, write_atomically

SPECIAL_TOKENS = ("PAD", "BOS", "EOS")
ATTENTION_PLOT = "cross_attention.png"

Sequence = tuple[int, ...]


class CopyTask:
    """Random sequences of the task, with a fixed held-out set that training never draws."""

    def __init__(self, config: TaskConfig, seed: int):
        self.config = config
        self.vocab_size = config.symbols + len(SPECIAL_TOKENS)
        held_out_generator = torch.Generator().manual_seed(seed + 1)
        self.val_sequences = self.draw(config.val_sequences, held_out_generator, exclude=set(), distinct=True)
        self.held_out = set(self.val_sequences)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return self.batch(self.draw(batch_size, generator, exclude=self.held_out))

    def draw(
        self, count: int, generator: torch.Generator, exclude: set[Sequence], distinct: bool = False
    ) -> list[Sequence]:
        """`count` sequences with lengths uniform in [min_length, max_length], none of them in `exclude`."""
        c = self.config
        drawn: list[Sequence] = []
        seen: set[Sequence] = set()
        while len(drawn) < count:
            lengths = torch.randint(c.min_length, c.max_length + 1, (count,), generator=generator).tolist()
            rows = torch.randint(0, c.symbols, (count, c.max_length), generator=generator).tolist()
            for length, row in zip(lengths, rows):
                sequence = tuple(row[:length])
                if sequence in exclude or (distinct and sequence in seen):
                    continue
                seen.add(sequence)
                drawn.append(sequence)
        return drawn[:count]

    def answer(self, sequence: Sequence) -> Sequence:
        return sequence[::-1] if self.config.kind == "reverse" else sequence

    def batch(self, sequences: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token tensors (source, target input, target output), each (B, longest + 1), padded with PAD at the end:
        source `x1 .. xn EOS`, target input `BOS y1 .. yn`, target output `y1 .. yn EOS`."""
        width = max(len(s) for s in sequences) + 1
        source = torch.full((len(sequences), width), PAD, dtype=torch.long)
        target_input, target_output = source.clone(), source.clone()
        for row, sequence in enumerate(sequences):
            n = len(sequence)
            source[row, : n + 1] = torch.tensor([*to_ids(sequence), EOS])
            answer = to_ids(self.answer(sequence))
            target_input[row, : n + 1] = torch.tensor([BOS, *answer])
            target_output[row, : n + 1] = torch.tensor([*answer, EOS])
        return source, target_input, target_output

    @torch.inference_mode()
    def evaluate(self, model: Seq2SeqTransformer, batch_size: int = 500) -> dict[str, float]:
        """Over the held-out set: the mean cross-entropy per answer token (no label smoothing), and the share of
        sequences whose greedy decoding is exactly the answer."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        loss_sum, tokens, correct = 0.0, 0, 0
        for start in range(0, len(self.val_sequences), batch_size):
            sequences = self.val_sequences[start : start + batch_size]
            source, target_input, target_output = (t.to(device) for t in self.batch(sequences))
            _, loss = model(source, target_input, target_output)
            count = int((target_output != PAD).sum())
            loss_sum, tokens = loss_sum + loss.item() * count, tokens + count
            decoded = model.greedy_decode(source, self.config.max_length + 1)
            correct += sum(to_ids(self.answer(s)) == out for s, out in zip(sequences, decoded))
        model.train(was_training)
        return {"val_loss": loss_sum / tokens, "val_accuracy": correct / len(self.val_sequences)}


def to_ids(sequence: Sequence) -> list[int]:
    return [symbol + len(SPECIAL_TOKENS) for symbol in sequence]


def token_name(token: int) -> str:
    return SPECIAL_TOKENS[token] if token < len(SPECIAL_TOKENS) else str(token - len(SPECIAL_TOKENS))


def parse_sequence(text: str, config: TaskConfig) -> Sequence:
    """Parse "3 1 4 1 5" into (3, 1, 4, 1, 5), or raise a one-line error saying what the model accepts."""
    what = f"a sequence of {config.min_length} to {config.max_length} symbols from 0 to {config.symbols - 1}"
    try:
        sequence = tuple(int(word) for word in text.replace(",", " ").split())
    except ValueError:
        raise TinylmError(f"{text!r} is not {what} separated by spaces, e.g. '3 1 4 1 5'") from None
    symbols_known = all(0 <= s < config.symbols for s in sequence)
    if not symbols_known or not config.min_length <= len(sequence) <= config.max_length:
        raise TinylmError(f"{text!r}: the model was trained on {what}; give one of those")
    return sequence


@dataclass
class CrossAttention:
    """Where the decoder looked while writing its answer: weights[layer, head, t, s] is how much output position t
    attended to source position s."""

    source: list[str]
    """Source tokens (the symbols, then EOS)."""
    output: list[str]
    """The token the model wrote at each output position (the answer, then EOS)."""
    weights: torch.Tensor
    """(n_layer, n_head, len(output), len(source))."""


@dataclass
class CopyTaskRun:
    """A trained copy-task run: translate sequences, look at its cross-attention."""

    path: Path
    config: Config
    model: Seq2SeqTransformer

    def translate(self, text: str) -> str:
        """The model's answer to a sequence: "3 1 4 1 5" -> "3 1 4 1 5" (copy) or "5 1 4 1 3" (reverse)."""
        source = self._source(text)
        (output,) = self.model.greedy_decode(source, self.config.model.block_size)
        return " ".join(token_name(token) for token in output)

    @torch.inference_mode()
    def cross_attention(self, text: str) -> CrossAttention:
        """The cross-attention weights of every decoder layer while the model answers `text` greedily."""
        source = self._source(text)
        (output,) = self.model.greedy_decode(source, self.config.model.block_size)
        # The decoder is causal, so one pass over BOS + its own answer repeats every greedy step at once.
        target = torch.tensor([[BOS, *output]], device=source.device)
        memory, source_mask = self.model.encode(source)
        logits, weights = self.model.decode(target, memory, source_mask, need_weights=True)
        return CrossAttention(
            source=[token_name(t) for t in source[0].tolist()],
            output=[token_name(t) for t in logits[0].argmax(dim=-1).tolist()],
            weights=torch.stack([w[0] for w in weights]).cpu(),
        )

    def draw_attention(self, text: str, path: str | Path) -> Path:
        """Write a PNG of the cross-attention while answering `text`: one panel per decoder layer and head."""
        return draw_cross_attention(self.cross_attention(text), Path(path), f"{self.config.task.kind}: {text}")

    def _source(self, text: str) -> torch.Tensor:
        sequence = parse_sequence(text, self.config.task)
        return torch.tensor([[*to_ids(sequence), EOS]], device=next(self.model.parameters()).device)


def load_copy_task(path: str | Path, device: str = "auto") -> CopyTaskRun:
    """Load a run folder written by `tinylm train` with model.arch seq2seq."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise TinylmError(
            f"{path} is not a tinylm run folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "give the --out folder of a finished `tinylm train configs/copy-task.yaml`"
        )
    config = run_config(path)
    if config.model.arch != "seq2seq":
        raise TinylmError(f"{path} holds a {config.model.arch} model, not a seq2seq one; use `tinylm generate` on it")
    model = build_model(config.model).to(resolve_device(device))
    load_weights(model, path / WEIGHTS_FILE)
    model.eval()
    return CopyTaskRun(path, config, model)


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise TinylmError("drawing attention needs matplotlib: pip install 'tinylm[track]'")


def draw_cross_attention(attention: CrossAttention, path: Path, title: str) -> Path:
    """A grid of heatmaps, decoder layers down and heads across, written atomically to `path` as PNG."""
    require_matplotlib()
    from matplotlib.figure import Figure  # a Figure of its own, not pyplot: no window, a notebook's backend untouched

    layers, heads = attention.weights.shape[:2]
    size = 0.25 * max(len(attention.source), len(attention.output)) + 1.0
    figure = Figure(figsize=(size * heads, size * layers))
    axes = figure.subplots(layers, heads, squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(attention.weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(len(attention.source)), attention.source, fontsize=6, rotation=90)
            ax.set_yticks(range(len(attention.output)), attention.output, fontsize=6)
            ax.set_title(f"layer {layer + 1} head {head + 1}", fontsize=8)
        axes[layer][0].set_ylabel("output (written)")
    for ax in axes[-1]:
        ax.set_xlabel("source (read)")
    figure.suptitle(f"cross-attention, {title}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())
    return path
