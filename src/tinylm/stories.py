"""Story quality, the TinyStories way: complete the paper's 44 evaluation prompts and score the completions.

Without a judge, from the texts alone:
- distinct-1 / distinct-2: unique words / word pairs over all completions, divided by all (Li et al., 2016); low
  values mean the model says the same things again and again, across stories;
- repetition: within one completion, the share of its word 4-grams that already occurred earlier in it (a model
  stuck in a loop scores near 1), averaged over the completions;
- ended: the share of completions that end their story (the model produced its end-of-text token) rather than being
  cut at max_new_tokens;
- fluency (with `reference`): each completion's bits per byte under a reference model, given its prompt, averaged.
  A good reference (e.g. smollm2-135m-instruct) finds fluent English cheap and word salad expensive.

With a judge, any OpenAI-compatible chat endpoint (`tinylm serve` of an instruction model, or a hosted API): the
paper's two-turn rubric, a general assessment of the part after the `***` separator, then grades for grammar,
creativity, consistency with the beginning and plot, each out of 10, and the student's likely age group. Grades are
read leniently ("Grammar: 8/10", "grammar - 8 out of 10", "**Grammar**: 8"); an answer missing any of the four is
counted as malformed, and every raw answer is kept.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tinylm.config import SampleConfig
from tinylm.data.sources import TINYSTORIES_EVALUATION_PROMPTS, TINYSTORIES_FOLDER, fetch
from tinylm.errors import TinylmError
from tinylm.evaluate import continuation_logprobs
from tinylm.generate import encode_prompt
from tinylm.report import flat_scores, format_score
from tinylm.run import Run, load
from tinylm.runs import STORIES_REPORT_FILE, STORIES_RESULT_FILE, results_folder, write_atomically, write_json

GRADES = ("grammar", "creativity", "consistency", "plot")
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}
REPETITION_N = 4
"""Word n-grams counted for the repetition rate."""
JUDGE_MAX_TOKENS = 400
JUDGE_TIMEOUT_S = 300

# The paper's prompts to GPT-4 (Eldan and Li 2023, section 3), with a line fixing the form of the grades so that
# any judge can be read.
ASSESSMENT_PROMPT = (
    "In the following exercise, the student is given a beginning of a story. The student needs to complete it into a "
    "full story. The exercise tests the student's language abilities and creativity. The symbol *** marks the "
    "separator between the prescribed beginning and the student's completion:\n\n{prompt}***{completion}\n\n"
    "Please provide your general assessment about the part written by the student (the one after the *** symbol). "
    "Is it gramatically correct? Is it consistent with the beginning of the story? Pay special attention to whether "
    "the student manages to complete the sentence which is split in the middle by the separator ***."
)
GRADING_PROMPT = (
    "Now, grade the student's completion in terms of grammar, creativity, consistency with the story's beginning and "
    "whether the plot makes sense. Moreover, please provide your best guess of what the age of the student might be, "
    "as reflected from the completion. Choose from possible age groups: A: 3 or under. B: 4-5. C: 6-7. D: 8-9. "
    "E: 10-12. F: 13-16.\nAnswer in exactly this form: Grammar: N/10, Creativity: N/10, Consistency: N/10, "
    "Plot: N/10, Age group: X"
)


@dataclass
class Story:
    prompt_index: int
    sample: int
    prompt: str
    completion: str
    tokens: int
    ended: bool
    """The model ended the story itself (end-of-text or end of turn), not cut at max_new_tokens."""
    fluency_bpb: float | None = None
    """Bits per byte of the completion under the reference model; None without one (or for an empty completion)."""
    judge: dict[str, Any] | None = None
    """The judge's grades (0-10 each, or None when unreadable), age group, raw answers and whether it was malformed."""


@dataclass
class StoriesResult:
    model: str
    samples: int
    sampling: dict[str, Any]
    stories: list[Story]
    reference: str | None = None
    judge: dict[str, str] | None = None
    scores: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompts": TINYSTORIES_EVALUATION_PROMPTS.name,
            "samples_per_prompt": self.samples,
            "sampling": self.sampling,
            "reference": self.reference,
            "judge": self.judge,
            "scores": self.scores,
            "stories": [asdict(story) for story in self.stories],
        }

    def summary(self) -> str:
        """The scores as a few lines of text."""
        return "\n".join(f"{name}: {format_score(value)}" for name, value in flat_scores(self.scores).items())

    def markdown(self) -> str:
        """stories.md: the scores, then each prompt with its completions and their grades."""
        lines = [f"# Story quality of {self.model}", ""]
        lines += [f"{len(self.stories)} completions ({self.samples} per prompt) of the TinyStories evaluation prompts."]
        lines += ["", "| score | value |", "|---|--:|"]
        lines += [f"| {name} | {format_score(value)} |" for name, value in flat_scores(self.scores).items()]
        for story in self.stories:
            if story.sample == 0:
                lines += ["", f"## Prompt {story.prompt_index + 1}", "", quote(story.prompt)]
            details = [f"{story.tokens} tokens", "ended" if story.ended else "cut at max_new_tokens"]
            if story.fluency_bpb is not None:
                details.append(f"fluency {story.fluency_bpb:.3f} bits/byte")
            if story.judge is not None:
                grades = story.judge["grades"]
                details.append(
                    "judge: malformed answer"
                    if story.judge["malformed"]
                    else ", ".join(f"{name} {grades[name]:g}" for name in GRADES)
                )
            lines += ["", f"**Sample {story.sample + 1}** ({'; '.join(details)})", "", quote(story.completion)]
        return "\n".join(lines) + "\n"


def quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text or "(empty)").splitlines() or [""])


def evaluation_prompts() -> list[str]:
    """The paper's 44 story beginnings (from the cache, the offline mirror or the dataset's page)."""
    path = fetch(TINYSTORIES_FOLDER, TINYSTORIES_EVALUATION_PROMPTS)
    prompts = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise TinylmError(f"{path} is not a YAML list of prompts; delete it so that it is fetched again")
    return prompts


def evaluate_stories(
    model: str | Run,
    samples: int = 1,
    sampling: dict[str, Any] | None = None,
    reference: str | Run | None = None,
    judge: str | None = None,
    judge_model: str | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> StoriesResult:
    """Complete the evaluation prompts (the first `limit` of them) `samples` times each with `model` (sampling: the
    run's `sample` config with these options in place), and score the completions (see the module docstring)."""
    if samples < 1:
        raise TinylmError(f"--samples must be at least 1, not {samples}")
    if batch_size < 1:
        raise TinylmError(f"--batch-size must be at least 1, not {batch_size}")
    if (judge is None) != (judge_model is None):
        raise TinylmError("--judge URL and --judge-model NAME go together: the endpoint and the model it serves")
    run = model if isinstance(model, Run) else load(model)
    prompts = evaluation_prompts()[:limit]
    settings = run.sampling(**(sampling or {}))
    stories = complete_stories(run, prompts, samples, settings, batch_size)
    result = StoriesResult(str(model if not isinstance(model, Run) else model.path), samples, asdict(settings), stories)
    result.scores = text_scores([story.completion for story in stories])
    result.scores["ended"] = sum(story.ended for story in stories) / len(stories)
    if reference is not None:
        scorer = reference if isinstance(reference, Run) else load(reference)
        result.reference = str(reference if not isinstance(reference, Run) else reference.path)
        bpb = fluency_bpb(scorer, [(s.prompt, s.completion) for s in stories], batch_size)
        for story, value in zip(stories, bpb):
            story.fluency_bpb = value
        measured = [value for value in bpb if value is not None]
        result.scores["fluency_bpb"] = sum(measured) / len(measured) if measured else None
    if judge is not None:
        result.judge = {"url": judge, "model": judge_model}
        for story in stories:
            story.judge = grade_story(judge, judge_model, story.prompt, story.completion)
        result.scores["judge"] = judge_scores([story.judge for story in stories])
    return result


def complete_stories(
    run: Run, prompts: list[str], samples: int, sampling: SampleConfig, batch_size: int
) -> list[Story]:
    """`samples` completions of each prompt, batch_size prompts at a time. Sample k draws with seed + k, so the
    samples differ and a rerun (with the same batch size) gives the same stories."""
    ids = [encode_prompt(run.tokenizer, prompt, "an evaluation prompt") for prompt in prompts]
    stories = []
    for sample in range(samples):
        settings = replace(sampling, seed=None if sampling.seed is None else sampling.seed + sample)
        for first in range(0, len(prompts), batch_size):
            batch = list(range(first, min(first + batch_size, len(prompts))))
            rows = [Story(index, sample, prompts[index], "", 0, False) for index in batch]
            for piece in run.stream_ids([ids[index] for index in batch], settings):
                story = rows[piece.row]
                story.completion += piece.text
                story.tokens = piece.tokens
                story.ended = piece.finish_reason == "stop"
            stories += rows
    return sorted(stories, key=lambda story: (story.prompt_index, story.sample))


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def text_scores(completions: list[str]) -> dict[str, float]:
    """distinct-1, distinct-2 over all completions, and the mean repetition rate within each (module docstring)."""
    tokenized = [words(text) for text in completions]
    scores = {}
    for n in (1, 2):
        grams = [tuple(w[i : i + n]) for w in tokenized for i in range(len(w) - n + 1)]
        scores[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    rates = [repetition_rate(w) for w in tokenized if len(w) >= REPETITION_N]
    scores["repetition"] = sum(rates) / len(rates) if rates else 0.0
    return scores


def repetition_rate(tokens: list[str], n: int = REPETITION_N) -> float:
    """The share of the n-grams of `tokens` that already occurred earlier in them."""
    seen, repeated = set(), 0
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams)


def fluency_bpb(reference: Run, texts: Iterable[tuple[str, str]], batch_size: int) -> list[float | None]:
    """Bits per byte of each continuation after its context under `reference` (None for an empty one). The pair is
    tokenized whole and split where the context's tokens end, as lm-eval does, so a word cut by the split is
    scored as the reference would read it."""
    pairs, sizes = [], []
    for context, continuation in texts:
        context_ids = reference.tokenizer.encode(context) or [reference.tokenizer.end_of_text]
        whole = reference.tokenizer.encode(context + continuation)
        pairs.append((context_ids, whole[len(context_ids) :] if continuation else []))
        sizes.append(len(continuation.encode()))
    scored = continuation_logprobs(reference.model, pairs, batch_size)
    return [-logprob / math.log(2) / size if size else None for (logprob, _), size in zip(scored, sizes)]


def grade_story(url: str, model: str, prompt: str, completion: str) -> dict[str, Any]:
    """The judge's assessment and grades of one completion (the paper's two turns); never raises for an answer
    it cannot read, only when the endpoint itself fails."""
    messages = [{"role": "user", "content": ASSESSMENT_PROMPT.format(prompt=prompt, completion=completion)}]
    assessment = chat_completion(url, model, messages)
    messages += [{"role": "assistant", "content": assessment}, {"role": "user", "content": GRADING_PROMPT}]
    grading = chat_completion(url, model, messages)
    grades = parse_grades(grading)
    return {
        "grades": grades,
        "age_group": parse_age_group(grading),
        "malformed": any(value is None for value in grades.values()),
        "answers": [assessment, grading],
    }


def parse_grades(answer: str) -> dict[str, float | None]:
    """Each of GRADES as a number from 0 to 10, or None where the answer gives none (or one out of range)."""
    grades: dict[str, float | None] = {}
    for name in GRADES:
        found = re.search(
            rf"{name}\W{{0,6}}(?:score\W{{0,3}})?(?:is\s+|of\s+)?(\d+(?:\.\d+)?)\s*(?:/\s*10|out of 10)?",
            answer,
            re.IGNORECASE,
        )
        value = float(found[1]) if found else None
        grades[name] = value if value is not None and 0 <= value <= 10 else None
    return grades


def parse_age_group(answer: str) -> str | None:
    found = re.search(r"age(?: group)?\W{0,4}\(?([A-F])\b", answer, re.IGNORECASE)
    return found[1].upper() if found else None


def judge_scores(grades: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean grade per category over the well-formed answers, and how many answers were graded or malformed."""
    readable = [g for g in grades if not g["malformed"]]
    scores: dict[str, Any] = {
        name: sum(g["grades"][name] for g in readable) / len(readable) if readable else None for name in GRADES
    }
    scores["graded"] = len(readable)
    scores["malformed"] = len(grades) - len(readable)
    return scores


def chat_completion(url: str, model: str, messages: list[dict[str, str]]) -> str:
    """The text of one answer of an OpenAI-compatible /chat/completions endpoint (greedy). OPENAI_API_KEY, when set,
    is sent as the bearer token. An answer without text is returned as ""; a failing endpoint is a TinylmError."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": JUDGE_MAX_TOKENS}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    endpoint = url.rstrip("/") + "/chat/completions"
    request = urllib.request.Request(endpoint, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=JUDGE_TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace").strip().splitlines()
        raise TinylmError(
            f"the judge at {endpoint} answered HTTP {error.code} ({detail[0][:200] if detail else error.reason}); "
            "check --judge and --judge-model"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise TinylmError(f"the judge at {endpoint} cannot be reached ({reason}); start it or check --judge") from None
    try:
        return answer["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


def save_stories(result: StoriesResult, model: str, out: str | None = None) -> Path | None:
    """stories.json (everything) and stories.md (to read) in `results_folder(model, out)`; the JSON file's path, or
    None where there is no folder to write into."""
    folder = results_folder(model, out)
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / STORIES_RESULT_FILE, result.record())
    write_atomically(folder / STORIES_REPORT_FILE, result.markdown())
    return folder / STORIES_RESULT_FILE
