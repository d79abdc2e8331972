"""Peak memory of `tinylm prepare` on one huge line against the same bytes as many documents.

The TinyStories validation part from the offline mirror (1,000 stories), repeated `--copies` times (54 by default:
about 44 MB), is written twice: as it is, stories separated by `<|endoftext|>`, and as ONE document, separators and
newlines made spaces. Each is prepared in a fresh process with `--tokenizer` and `--num-proc` workers; reported: peak
RSS of the main process and of the largest worker (MB), seconds, and the tokens and documents written. Issue 14
measured 1.2 GB against 0.43 GB before long documents were cut into pieces.

    python bench/prepare_one_line.py [--copies 54] [--num-proc 2] [--tokenizer char]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIRROR = Path(os.environ.get("TINYLM_DATASETS_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
VALID_PART = MIRROR / "tinystories" / "TinyStories-valid.head1000.txt"

MEASURE = r"""
import json, resource, sys, time
from tinylm.config import DataConfig
from tinylm.data.prepare import prepare
source, tokenizer, num_proc, data_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
data = prepare(DataConfig(source=source, tokenizer=tokenizer, num_proc=num_proc, data_dir=data_dir))
print(json.dumps({
    "seconds": time.perf_counter() - start,
    "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "tokens": sum(split["tokens"] for split in data.meta["splits"].values()),
    "documents": sum(split["documents"] for split in data.meta["splits"].values()),
}))
"""


def measure(source: Path, tokenizer: str, num_proc: int, data_dir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(source), tokenizer, str(num_proc), str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=54)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--tokenizer", default="char")
    args = parser.parse_args()
    text = VALID_PART.read_text() * args.copies
    with tempfile.TemporaryDirectory() as folder:
        many, one = Path(folder) / "many.txt", Path(folder) / "one.txt"
        many.write_text(text)
        one.write_text(text.replace("<|endoftext|>", " ").replace("\n", " "))
        print(f"{len(text.encode()) / 1e6:.1f} MB of text, tokenizer {args.tokenizer}, --num-proc {args.num_proc}")
        for name, source in (("many documents", many), ("one line", one)):
            result = measure(source, args.tokenizer, args.num_proc, Path(folder) / name.replace(" ", "-"))
            print(
                f"{name:>15}: peak {result['main_mb']:7.0f} MB main, {result['worker_mb']:7.0f} MB worker, "
                f"{result['seconds']:6.1f} s, {result['tokens']:,} tokens in {result['documents']:,} documents"
            )


if __name__ == "__main__":
    main()
