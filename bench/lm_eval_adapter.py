"""lm-eval throughput: tinylm's adapter (`--model tinylm`) against lm-eval's own `hf` model, same model, same tasks.

Three local tasks over TinyStories stories from the offline mirror (TinyStories-valid.head1000.txt), one per kind of
request: a story cloze (multiple choice: the real ending among four), the log-likelihood of whole stories (rolling
windows) and a greedy continuation (generate_until). A tinylm run is exported to a Hugging Face folder for lm-eval's
`hf` model; both score the same examples with the same batch size in one process, and the largest difference of their
per-example log-likelihoods is printed beside the times.

    TINYLM_DATASETS_MIRROR=../shared/datasets python bench/lm_eval_adapter.py out/tinystories --examples 200
    python bench/lm_eval_adapter.py smollm2-135m-instruct --no-hf        # the adapter's scores alone
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from tinylm.data.sources import SOURCES, fetch


def stories(count: int) -> list[str]:
    source = SOURCES["tinystories-v1"]
    path = fetch(source.folder, source.subsets["valid-head1000"][0])
    texts = [s.strip() for s in path.read_text().split("<|endoftext|>") if len(s.strip().split(". ")) >= 3]
    return texts[:count]


def write_tasks(folder: Path, texts: list[str]) -> list[Path]:
    rng = random.Random(0)
    cloze, whole, continue_ = [], [], []
    endings = [text.split(". ")[-1] for text in texts]
    for index, text in enumerate(texts):
        sentences = text.split(". ")
        context = ". ".join(sentences[:-1]) + "."
        others = rng.sample([e for j, e in enumerate(endings) if j != index], 3)
        label = index % 4
        choices = [*others[:label], endings[index], *others[label:]]
        cloze.append({"context": context, "choices": [" " + c for c in choices], "label": label})
        whole.append({"text": text})
        continue_.append({"context": context, "target": endings[index].split()[0]})
    bodies = {
        "story_cloze": (
            cloze,
            'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: choices\ndoc_to_target: label\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        ),
        "story_loglikelihood": (
            whole,
            "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
            "metric_list:\n  - metric: bits_per_byte\n",
        ),
        "story_continue": (
            continue_,
            'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
            "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 32\n  do_sample: false\n"
            # the answer is the first word of the continuation (the story's last sentence runs on to its full stop)
            "filter_list:\n  - name: first_word\n    filter:\n      - function: regex\n"
            '        regex_pattern: "([A-Za-z\']+)"\n      - function: take_first\n'
            "metric_list:\n  - metric: exact_match\n",
        ),
    }
    paths = []
    for task, (rows, body) in bodies.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(folder / f"{task}.yaml")
        paths[-1].write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}"
        )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "model", help="A tinylm run folder (exported for lm-eval's hf model) or anything tinylm.load takes"
    )
    parser.add_argument("--examples", type=int, default=200, help="Stories per task.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-hf", action="store_true", help="Only the adapter (for models lm-eval's hf cannot load).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tinylm.harness import benchmark
    from tinylm.hf import export_hf
    from tinylm.runs import is_run

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        tasks = write_tasks(folder, stories(args.examples))
        names = [path.stem for path in tasks]
        began = time.perf_counter()
        ours = benchmark(args.model, [str(p) for p in tasks], batch_size=args.batch_size, log_samples=True)
        ours_s = time.perf_counter() - began
        report = {"model": args.model, "examples": args.examples, "batch_size": args.batch_size}
        report["tinylm"] = {"seconds": round(ours_s, 2), "scores": ours.scores}
        if not args.no_hf:
            from lm_eval.models.huggingface import HFLM

            hf_folder = export_hf(args.model, folder / "hf") if is_run(Path(args.model)) else Path(args.model)
            hf = HFLM(pretrained=str(hf_folder), device="cpu", batch_size=args.batch_size, dtype="float32")
            began = time.perf_counter()
            theirs = simple_evaluate(
                model=hf, tasks=names, task_manager=TaskManager(include_path=scratch), log_samples=True
            )
            hf_s = time.perf_counter() - began
            report["hf"] = {"seconds": round(hf_s, 2), "results": theirs["results"]}
            report["speedup"] = round(hf_s / ours_s, 2)
            gaps = []
            for task in ("story_cloze", "story_loglikelihood"):
                mine = sorted(ours.samples[task], key=lambda s: s["doc_id"])
                reference = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
                for a, b in zip(mine, reference):
                    for x, y in zip(a["filtered_resps"], b["filtered_resps"]):
                        gaps.append(
                            abs(
                                (x[0] if isinstance(x, list | tuple) else x)
                                - (y[0] if isinstance(y, list | tuple) else y)
                            )
                        )
            report["largest_loglikelihood_gap"] = max(gaps)
        print(ours.table())
        print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
