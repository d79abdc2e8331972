"""Decoding speed on CPU: tinylm with its KV cache, tinylm without it, and transformers' `generate` on the same weights.

A ~15M-parameter GPT-2-style model (random weights: speed does not depend on what the weights say) continues a
16-token prompt greedily for 512 new tokens, all three in one process with the same thread count. The transformers
model is a GPT2LMHeadModel given tinylm's weights by `tinylm export`'s mapping, checked to give the same logits.

    OMP_NUM_THREADS=1 python bench/decode.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from tinylm.config import ModelConfig, SampleConfig
from tinylm.generate import generate_tokens
from tinylm.model import build_model, count_parameters

SLM_15M = ModelConfig(vocab_size=8192, block_size=1024, n_layer=6, n_head=6, n_embd=384, bias=True)


def gpt2_twin(model: torch.nn.Module):
    """The same network as a transformers GPT2LMHeadModel, through tinylm's own export mapping (src/tinylm/hf.py)."""
    from transformers import GPT2LMHeadModel

    from tinylm.hf import hf_config, to_hf_state

    twin = GPT2LMHeadModel(hf_config(model.config, {"bos_token_id": None, "eos_token_id": None})).eval()
    missing, unexpected = twin.load_state_dict(to_hf_state(model, "gpt2"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head: tied
    twin.tie_weights()
    return twin


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def transformers_greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Exactly `new_tokens` greedy tokens from transformers' `generate` (no early stop), as ids."""
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds of the cached and transformers runs.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(SLM_15M).eval()
    prompt = torch.randint(0, SLM_15M.vocab_size, (args.prompt_tokens,)).tolist()
    sampling = SampleConfig(max_new_tokens=args.new_tokens, temperature=0)

    def tinylm_decode(use_cache: bool) -> list[int]:
        return [token.id for (token,) in generate_tokens(model, [prompt], sampling, use_cache=use_cache)]

    tinylm_decode(True)  # warm-up: first-call allocations
    results = {}
    seconds, cached = timed(lambda: tinylm_decode(True))
    seconds, uncached = timed(lambda: tinylm_decode(False))
    results["tinylm_no_cache"] = args.new_tokens / seconds
    assert cached == uncached, "cached and uncached greedy decoding disagree"

    twin = gpt2_twin(model)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.allclose(twin(ids).logits, model(ids)[0], atol=1e-4), "the transformers twin computes otherwise"

    def transformers_decode() -> list[int]:
        return transformers_greedy(twin, ids, args.new_tokens)

    transformers_decode()
    # Alternating rounds, so a slow spell of the machine hits both alike; each ratio is of the same round.
    rounds = {"tinylm_kv_cache": [], "transformers_generate": []}
    for _ in range(args.rounds):
        rounds["tinylm_kv_cache"].append(args.new_tokens / timed(lambda: tinylm_decode(True))[0])
        seconds, theirs = timed(transformers_decode)
        rounds["transformers_generate"].append(args.new_tokens / seconds)
    results |= {name: statistics.median(speeds) for name, speeds in rounds.items()}
    ratios = [ours / theirs for ours, theirs in zip(*rounds.values())]
    agreement = sum(a == b for a, b in zip(cached, theirs)) / args.new_tokens
    report = {
        "model": {
            "parameters": count_parameters(model)["total"],
            **{k: getattr(SLM_15M, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")},
        },
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "tokens_per_s": {name: round(value, 1) for name, value in results.items()},
        "kv_cache_speedup": round(results["tinylm_kv_cache"] / results["tinylm_no_cache"], 2),
        "vs_transformers": round(statistics.median(ratios), 2),
        "vs_transformers_per_round": [round(ratio, 2) for ratio in ratios],
        "greedy_tokens_equal_to_transformers": agreement,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
