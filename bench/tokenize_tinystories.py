"""Tokenizing TinyStories validation text: `tinylm prepare` on every core against a plain single-process loop.

For each tokenizer (`gpt2`, and `bpe:4096` trained on the same text) the same input is tokenized four ways, each in a
fresh process so peak memory is its own:
- the loops a tutorial writes: read the file, split it into stories, `tokenizer.encode` one story at a time; one only
  counts the tokens, the other also collects them and writes them as a uint16 token file (as nanoGPT's prepare.py);
- the whole `tinylm prepare` (read, split, tokenize, write shards) with `--num-proc 1` and `--num-proc N`.
Reported: MB/s of UTF-8 text (median of `--repeats` interleaved rounds), the speed-up over each loop (median of the
per-round ratios), and peak RSS (the largest of the main process and its workers). Every row's time includes loading
the tokenizer. The offline mirror holds the first 1000 validation stories (0.8 MB); `--copies K` repeats them K
times, by default 27 (21.8 MB, the size of the whole TinyStories V2 validation file). Also measured: the time to
train bpe:4096, and gpt2 on ten times as much text (speed-up and peak memory).

    python bench/tokenize_tinystories.py [--copies 27] [--repeats 5] [--num-proc N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MIRROR = Path(os.environ.get("TINYLM_DATASETS_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
VALID_PART = MIRROR / "tinystories" / "TinyStories-valid.head1000.txt"

# Each measurement runs this in a fresh interpreter and prints one JSON line.
MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from tinylm.config import DataConfig
from tinylm.data.prepare import prepare
from tinylm.data.documents import read_text
from tinylm.tokenizers import load_tokenizer

mode, corpus, tokenizer_dir, spec, num_proc, data_dir = sys.argv[1:7]
size = Path(corpus).stat().st_size
start = time.perf_counter()
if mode in ("loop", "loop-write"):
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    ids = []
    for story in Path(corpus).read_text().split("<|endoftext|>"):
        if story.strip():
            story_ids = tokenizer.encode(story.strip())
            if mode == "loop-write":
                ids += story_ids
                ids.append(tokenizer.end_of_text)
            else:
                ids.append(len(story_ids) + 1)
    if mode == "loop-write":
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        np.array(ids, dtype=np.uint16).tofile(Path(data_dir) / "tokens.bin")
    tokens = len(ids) if mode == "loop-write" else sum(ids)
elif mode == "train-bpe":
    from tinylm.tokenizers import train_tokenizer
    train_tokenizer(spec, [story for block in read_text(Path(corpus)) for story in block])
    tokens = 0
else:
    data = prepare(DataConfig(source=corpus, tokenizer=spec, num_proc=int(num_proc), data_dir=data_dir), force=True)
    tokens = sum(split["tokens"] for split in data.meta["splits"].values())
seconds = time.perf_counter() - start
peak_kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"seconds": seconds, "mb_per_s": size / seconds / 1e6, "tokens": tokens, "peak_mib": peak_kib / 1024}))
"""


def measure(mode: str, corpus: Path, tokenizer_dir: Path, spec: str, num_proc: int, data_dir: Path) -> dict:
    args = [sys.executable, "-c", MEASURE, mode, str(corpus), str(tokenizer_dir), spec, str(num_proc), str(data_dir)]
    result = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=27, help="Times the validation part is repeated.")
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved rounds of every way.")
    parser.add_argument("--tokenizers", default="gpt2,bpe:4096", help="Comma-separated tokenizers to measure.")
    parser.add_argument("--skip-large", action="store_true", help="Skip the 10x larger memory run.")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)), help="Tokenizer processes.")
    args = parser.parse_args()
    if not VALID_PART.is_file():
        sys.exit(f"needs {VALID_PART} (set TINYLM_DATASETS_MIRROR)")

    from tinylm.data.documents import read_text
    from tinylm.tokenizers import train_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "tinystories-valid.txt"
        corpus.write_text(VALID_PART.read_text() * args.copies)
        size_mb = corpus.stat().st_size / 1e6
        print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"# input: TinyStories validation, first 1000 stories x {args.copies} = {size_mb:.1f} MB\n")

        bpe_train = measure("train-bpe", corpus, scratch, "bpe:4096", 1, scratch)
        print(f"training bpe:4096 on {size_mb:.1f} MB: {bpe_train['seconds']:.2f} s\n")

        print("| tokenizer | how | MB/s | vs loop writing tokens | vs loop only encoding | tokens | peak RSS MiB |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for spec in args.tokenizers.split(","):
            tokenizer_dir = scratch / spec.replace(":", "")
            tokenizer_dir.mkdir()
            train_tokenizer(spec, [story for block in read_text(corpus) for story in block]).save(tokenizer_dir)
            # prepare is given the trained BPE as a tokenizer.json, so its time is tokenizing, not training.
            prepare_spec = spec if spec == "gpt2" else str(tokenizer_dir / "tokenizer.json")
            ways = {
                "loop that only encodes": ("loop", spec, 1),
                "loop that writes the token file": ("loop-write", spec, 1),
                "tinylm prepare, 1 process": ("prepare", prepare_spec, 1),
                f"tinylm prepare, {args.num_proc} processes": ("prepare", prepare_spec, args.num_proc),
            }
            runs: dict[str, list[dict]] = {how: [] for how in ways}
            for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every way alike
                for how, (mode, way_spec, num_proc) in ways.items():
                    runs[how].append(measure(mode, corpus, tokenizer_dir, way_spec, num_proc, scratch / "data"))
            for how, results in runs.items():
                # Each way against the loops of the same round: these machines' speed drifts from minute to minute.
                speedups = [
                    statistics.median(r["mb_per_s"] / base["mb_per_s"] for r, base in zip(results, runs[loop]))
                    for loop in ("loop that writes the token file", "loop that only encodes")
                ]
                print(
                    f"| {spec} | {how} | {statistics.median(r['mb_per_s'] for r in results):.2f} | "
                    f"{speedups[0]:.2f}x | {speedups[1]:.2f}x | {results[0]['tokens']:,} | "
                    f"{max(r['peak_mib'] for r in results):.0f} |"
                )

        if args.skip_large or "gpt2" not in args.tokenizers.split(","):
            return
        # Ten times the text: memory stays flat, and the fixed costs (start-up, loading the tokenizer, the first and
        # last batch, when one core idles) weigh ten times less.
        big = scratch / "tinystories-valid-x10.txt"
        with open(big, "w") as out:
            for _ in range(10):
                out.write(corpus.read_text())
        loop = measure("loop-write", big, scratch / "gpt2", "gpt2", 1, scratch)
        row = measure("prepare", big, scratch, "gpt2", args.num_proc, scratch / "big")
        print(
            f"\n{big.stat().st_size / 1e6:.0f} MB of text, gpt2: loop writing tokens {loop['mb_per_s']:.2f} MB/s "
            f"(peak RSS {loop['peak_mib']:.0f} MiB), tinylm prepare with "
            f"{args.num_proc} processes {row['mb_per_s']:.2f} MB/s ({row['mb_per_s'] / loop['mb_per_s']:.2f}x), "
            f"peak RSS {row['peak_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
