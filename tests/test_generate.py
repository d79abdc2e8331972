from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import SMALL_TEXT, run_cli, untrained_run

import tinylm
from tinylm.config import SampleConfig
from tinylm.errors import TinylmError
from tinylm.generate import (
    DECODE_CONTEXT_TOKENS,
    MAX_PENDING_TOKENS,
    Continuation,
    IncrementalDecoder,
    generate_tokens,
    keep_min_p,
    keep_top_k,
    keep_top_p,
    penalize_presence_and_frequency,
    penalize_repetition,
    prompt_logprobs,
    stream_text,
)
from tinylm.tokenizers import CharTokenizer, HuggingFaceTokenizer

LLAMA_STYLE = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1}


def logits_of(probabilities: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probabilities]])


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


@pytest.mark.parametrize(("p", "expected"), [(0.4, {3}), (0.74, {3, 0}), (0.76, {3, 0, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_of_likeliest_tokens_reaching_p(p, expected):
    logits = logits_of([0.25, 0.1, 0.15, 0.5])  # unsorted on purpose
    assert kept(keep_top_p(logits, p)) == expected


def test_top_p_treats_each_row_on_its_own():
    logits = torch.cat([logits_of([0.7, 0.2, 0.1]), logits_of([0.1, 0.3, 0.6])])
    filtered = keep_top_p(logits, 0.8)
    assert torch.isfinite(filtered).tolist() == [[True, True, False], [False, True, True]]


def test_top_k_and_min_p_keep_the_likeliest_tokens():
    logits = logits_of([0.25, 0.1, 0.15, 0.5])
    assert kept(keep_top_k(logits, 2)) == {3, 0}
    assert kept(keep_top_k(logits, 10)) == {0, 1, 2, 3}
    # min_p 0.4 of the top probability 0.5: the bar is 0.2.
    assert kept(keep_min_p(logits, 0.4)) == {3, 0}
    assert kept(keep_min_p(logits, 0.1)) == {0, 1, 2, 3}


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert penalize_repetition(logits, seen, 1.0) is logits


@pytest.fixture
def run(tmp_path) -> tinylm.Run:
    return tinylm.load(untrained_run(tmp_path / "run"))


def test_temperature_near_zero_is_greedy(run):
    prompt = "First Citizen:"
    greedy = run.generate(prompt, max_new_tokens=20, temperature=0)
    assert run.generate(prompt, max_new_tokens=20, temperature=1e-5, seed=1) == greedy
    assert run.generate(prompt, max_new_tokens=20, temperature=1e-5, seed=2, top_p=0.5, min_p=0.1) == greedy


def test_repetition_penalty_changes_a_repetitive_greedy_text(run):
    plain = run.generate("All:", max_new_tokens=20, temperature=0)
    penalized = run.generate("All:", max_new_tokens=20, temperature=0, repetition_penalty=5.0)
    assert len(set(penalized[4:])) > len(set(plain[4:]))


def test_a_seed_gives_the_same_text_and_sampling_options_are_checked(run):
    options = {"max_new_tokens": 30, "temperature": 1.0, "top_k": 0, "top_p": 0.9, "min_p": 0.02, "seed": 5}
    assert run.generate("All:", **options) == run.generate("All:", **options)
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"min_p": 1.0}, {"repetition_penalty": 0.0}, {"top_k": -1}):
        with pytest.raises(TinylmError):
            run.generate("All:", **bad)


@pytest.mark.parametrize("stop_length", [1, 3, 6])
def test_a_stop_string_cuts_the_text_exactly_before_it(run, stop_length):
    full = run.generate("Speak", max_new_tokens=40, temperature=0, top_k=0)[len("Speak") :]
    stop = full[10 : 10 + stop_length]  # spans several (character) tokens
    cut = run.generate("Speak", max_new_tokens=40, temperature=0, stop=["never there", stop])[len("Speak") :]
    assert cut == full[: full.index(stop)]


def test_stop_strings_held_back_while_they_might_start_and_spanning_byte_level_tokens():
    tokenizer = HuggingFaceTokenizer.train_bpe([SMALL_TEXT], 300)
    text = "You are all resolved rather to die than to famish?"
    ids = tokenizer.encode(text)
    row = Continuation(tokenizer, [], ["rather to", "famine"], [])
    shown = []
    for token in ids:
        shown.append(row.add(token))
        if row.finish_reason:
            break
    assert "".join(shown) == "You are all resolved " and row.finish_reason == "stop"
    assert len(ids) > len(tokenizer.encode("You are all resolved rather to"))  # the cut is not at the last token
    # "fam" of "famish" was held back as the possible start of "famine", then shown when the text finished.
    row = Continuation(tokenizer, [], ["famine"], [])
    shown = [row.add(token) for token in ids]
    assert "".join(shown) + row.finish("length") == text and not shown[-1].endswith("fam")


def test_incremental_decoding_is_utf8_safe_and_does_constant_work_per_token():
    tokenizer = HuggingFaceTokenizer.train_bpe([SMALL_TEXT], 300)
    text = "Héllo wörld ☃ — 🙂 naïve café 日本語 " * 20
    ids = tokenizer.encode(text)
    decoded_lengths = []
    decode = tokenizer.decode
    tokenizer.decode = lambda chunk: decoded_lengths.append(len(chunk)) or decode(chunk)
    decoder = IncrementalDecoder(tokenizer, [])
    pieces = [decoder.add(token) for token in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)  # a byte-level token never shows half a character
    assert max(decoded_lengths) <= DECODE_CONTEXT_TOKENS + MAX_PENDING_TOKENS + 1


def test_streaming_yields_the_text_of_non_streaming_generation(tmp_path):
    tokenizer = HuggingFaceTokenizer.train_bpe([SMALL_TEXT], 300)
    run = tinylm.load(untrained_run(tmp_path / "bpe", tokenizer=tokenizer))
    options = {"max_new_tokens": 60, "temperature": 1.0, "top_k": 0, "seed": 3}
    pieces = list(run.stream("First Citizen:", **options))
    assert len(pieces) > 5
    assert "First Citizen:" + "".join(pieces) == run.generate("First Citizen:", **options)


@pytest.mark.parametrize("model", [{}, LLAMA_STYLE], ids=["learned-positions", "rope"])
def test_a_batch_of_prompts_of_different_lengths_gives_each_prompt_its_own_text(tmp_path, model):
    run = tinylm.load(untrained_run(tmp_path / "run", **model))
    prompts = ["F", "All:\nSpeak, speak.", "First Citizen:\nYou"]
    alone = [run.generate(prompt, max_new_tokens=40, temperature=0) for prompt in prompts]  # past block_size 32
    assert run.generate(prompts, max_new_tokens=40, temperature=0) == alone


@pytest.mark.parametrize("model", [{}, LLAMA_STYLE], ids=["learned-positions", "rope"])
def test_cached_decoding_matches_full_forward_passes_within_the_context(tmp_path, model):
    run = tinylm.load(untrained_run(tmp_path / "run", **model))
    prompts = [run.tokenizer.encode("All:"), run.tokenizer.encode("First Citizen:\n")]
    sampling = SampleConfig(max_new_tokens=32 - 15, temperature=0)
    cached = list(generate_tokens(run.model, prompts, sampling, use_cache=True))
    assert cached == list(generate_tokens(run.model, prompts, sampling, use_cache=False))


def test_generate_takes_every_sampling_option(tmp_path, capsys):
    run_dir = untrained_run(tmp_path / "run")
    options = ["--temperature", "0.9", "--top-k", "0", "--top-p", "0.9", "--min-p", "0.05"]
    options += ["--repetition-penalty", "1.2", "--stop", '["Z"]', "--seed", "1", "--max-new-tokens", "30"]
    code, out, _ = run_cli(capsys, "generate", str(run_dir), "--prompt", "All:", *options)
    assert code == 0 and out.startswith("All:") and "Z" not in out[4:]
    code, _, err = run_cli(capsys, "generate", str(run_dir), "--top-p", "1.5")
    assert code == 1 and err == "tinylm: error: top_p must be in (0, 1], not 1.5\n"


def test_a_char_run_streams_characters_as_they_come(tmp_path):
    run = tinylm.load(untrained_run(tmp_path / "run", tokenizer=CharTokenizer.train([SMALL_TEXT])))
    pieces = list(run.stream("All:", max_new_tokens=10, temperature=0))
    assert all(len(piece) == 1 for piece in pieces)


def test_presence_and_frequency_penalties_follow_openais_formula():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    counts = torch.tensor([[0, 1, 3, 0]], dtype=torch.int32)  # tokens already in the continuation
    sampling = SampleConfig(presence_penalty=0.5, frequency_penalty=0.25)
    expected = torch.tensor([[1.0, 2.0 - 0.25 - 0.5, -1.0 - 0.75 - 0.5, 0.5]])
    assert torch.equal(penalize_presence_and_frequency(logits, counts, sampling), expected)
    assert penalize_presence_and_frequency(logits, counts, SampleConfig()) is logits  # off: untouched


@pytest.mark.parametrize("model", [{}, LLAMA_STYLE], ids=["learned-positions", "rope"])
def test_logprobs_are_the_models_log_softmax_for_prompts_and_new_tokens(tmp_path, model):
    run = tinylm.load(untrained_run(tmp_path / "run", **model))
    prompts = [run.tokenizer.encode("All:\nSpeak"), run.tokenizer.encode("F")]  # batched: padded on the right
    sampling = SampleConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.5)  # a penalty changes no logprob
    steps = list(generate_tokens(run.model, prompts, sampling, top_logprobs=3))
    for row, (prompt, scored) in enumerate(zip(prompts, prompt_logprobs(run.model, prompts, 3))):
        new = [step[row] for step in steps if step[row] is not None]
        ids = prompt + [token.id for token in new]
        with torch.no_grad():
            expected = torch.log_softmax(run.model(torch.tensor([ids]))[0][0, :-1], dim=-1)
        assert scored[0].logprob is None and [token.id for token in scored] == prompt
        for position, token in enumerate(scored[1:] + new, start=1):
            assert token.logprob == pytest.approx(expected[position - 1, token.id].item(), abs=1e-5)
            best = torch.topk(expected[position - 1], 3)
            assert [i for i, _ in token.top] == best.indices.tolist()
    with pytest.raises(TinylmError, match="fit in the model's context, 32 tokens"):
        prompt_logprobs(run.model, [[0] * 33], 1)


def test_a_cancelled_generation_stops_at_the_next_token(tmp_path):
    run = tinylm.load(untrained_run(tmp_path / "run"))
    cancel = threading.Event()
    pieces = stream_text(run.model, run.tokenizer, [run.tokenizer.encode("All")], SampleConfig(max_new_tokens=500,
                         temperature=0), cancel=cancel)  # fmt: skip
    next(pieces)
    cancel.set()
    assert list(pieces) == []


def test_logit_bias_outside_the_vocabulary_is_one_line(tmp_path, capsys):
    run_dir = untrained_run(tmp_path / "run")
    code, _, err = run_cli(capsys, "generate", str(run_dir), "--logit-bias", '{"9999": -100}')
    assert code == 1 and err == "tinylm: error: logit_bias names token 9999, but the vocabulary has ids 0 to 35\n"


def test_memory_does_not_grow_with_max_new_tokens(tmp_path):
    run = tinylm.load(untrained_run(tmp_path / "run"))
    huge = SampleConfig(max_new_tokens=10**12, temperature=0)  # 8 TB of token ids if allocated up front
    steps = generate_tokens(run.model, [run.tokenizer.encode("All:")], huge)
    assert len([step for step, _ in zip(steps, range(5))]) == 5


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_text_many_contexts_long_is_what_a_plain_sliding_window_gives(tmp_path, use_cache):
    """Past twice the context the token buffer drops its oldest context: nothing the model reads may change."""
    run = tinylm.load(untrained_run(tmp_path / "run"))
    prompt = run.tokenizer.encode("First Citizen:\n")
    sampling = SampleConfig(max_new_tokens=150, temperature=0)
    produced = [step[0] for step in generate_tokens(run.model, [prompt], sampling, use_cache)]
    new = [token.id for token in produced if token is not None]
    if not use_cache:  # the reference: every step reads the last block_size tokens of the whole text
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(150):
                ids.append(int(run.model(torch.tensor([ids[-32:]]))[0][0, -1].argmax()))
        assert new == ids[len(prompt) :]
    prompts = [run.tokenizer.encode("F"), prompt]
    together = list(generate_tokens(run.model, prompts, sampling, use_cache))
    assert [step[1].id for step in together if step[1] is not None] == new
