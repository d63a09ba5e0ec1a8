"""Experiential knowledge: lesson parsing, de-duplication and contradictions, the token budget, the bad inputs,
and `learn` end to end on a tiny real model with real GSM8K tasks (its outputs accepted by verify, eval, serve)."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA, one_line_error, run_cli
from promptbake.errors import PromptbakeError
from promptbake.learn import (KNOWLEDGE_HEADER, LearnSettings, Lesson, accumulate, clean_lesson, contradicts,
                              fit_budget, knowledge_text, learn)

SETTINGS = LearnSettings(suite="gsm8k")
PROBLEM = "Sara buys 4 boxes of 6 eggs each and uses 5 eggs for a cake. How many eggs are left?"


def test_clean_lesson_reads_the_line_and_refuses_answers_copies_and_leaks():
    assert clean_lesson(" Lesson: Multiply first, then subtract what was used.", PROBLEM, "19", [], SETTINGS) == \
        "Multiply first, then subtract what was used."
    assert clean_lesson("Too short.", PROBLEM, "19", [], SETTINGS) is None
    assert clean_lesson("word " * 41, PROBLEM, "19", [], SETTINGS) is None
    assert clean_lesson("The eggs left are 19, so always count carefully.", PROBLEM, "19", [], SETTINGS) is None
    assert clean_lesson("buys 4 boxes of 6 eggs each and uses 5 eggs", PROBLEM, "19", [], SETTINGS) is None
    assert clean_lesson("Result: wrong, check the units next time", PROBLEM, "19", [], SETTINGS) is None
    assert clean_lesson("7. 2. 3. 4. 5. 7. 8. 9.", PROBLEM, "19", [], SETTINGS) is None  # not words
    assert clean_lesson("How many rolls of the same pizza are there?", PROBLEM, "19", [], SETTINGS) is None  # a problem
    options = ["Vitamin A", "Vitamin C", "Iron", "Zinc"]
    question = "Which deficiency causes scurvy?"
    assert clean_lesson("The answer is B when the disease is scurvy.", question, "B", options, SETTINGS) is None
    assert clean_lesson("Scurvy always comes from a lack of vitamin C.", question, "B", options, SETTINGS) is None
    assert clean_lesson("Match each disease to the nutrient whose lack causes it.", question, "B", options, SETTINGS)


def test_contradictions_and_repeats_are_settled_by_measured_effect():
    assert contradicts("Always check the units of the answer.", "Never check the units of the answer.")
    assert not contradicts("Always check the units of the answer.", "Always check the units of your answer.")
    assert not contradicts("Read every option before answering.", "Never guess without reading the question.")
    old = [Lesson("Always check the units of the answer.", 1, effect=0.05)]
    merged, counts = accumulate(old, [Lesson("Never check the units of the answer.", 2, effect=0.0),
                                      Lesson("always check the units of the answer!", 2, effect=0.2),
                                      Lesson("Write each step on its own line.", 2, effect=0.0)])
    assert [l.text for l in merged] == ["Always check the units of the answer.", "Write each step on its own line."]
    assert counts == {"added": 1, "duplicates": 1, "contradictions_replaced": 0, "contradictions_dropped": 1}
    better = Lesson("Never check the units of the answer.", 3, effect=0.10)
    merged, counts = accumulate(merged, [better])
    assert merged[0] is better and counts["contradictions_replaced"] == 1


def test_token_budget_keeps_the_strongest_lessons_in_order():
    lessons = [Lesson("one two three four", 1, effect=0.0), Lesson("five six seven eight", 1, effect=0.3),
               Lesson("nine ten eleven twelve", 2, effect=0.1)]
    words = lambda text: len(text.split())  # noqa: E731
    header = words(KNOWLEDGE_HEADER)
    kept = fit_budget(lessons, words, header + 2 * 5)  # room for two "- a b c d" lines
    assert [l.text for l in kept] == ["five six seven eight", "nine ten eleven twelve"]
    assert words(knowledge_text(kept)) <= header + 10
    assert fit_budget(lessons, words, header) == []


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, tiny_model_dir):
    out = tmp_path / "exp"
    common = ["-o", out, "--data", SHARED_DATA, "--model", tiny_model_dir]
    one_line_error(run_cli("learn", "--suite", "no-such-suite", *common), "unknown suite 'no-such-suite'")
    one_line_error(run_cli("learn", "--suite", "gsm8k", "--rounds", 0, *common), "--rounds must be positive")
    one_line_error(run_cli("learn", "--suite", "xstest", *common), "has no gold answer")
    one_line_error(run_cli("learn", "--suite", "gsm8k", "--train-limit", 2, "--rounds", 3, *common), "fewer tasks")
    assert not out.exists()
    out.mkdir()
    one_line_error(run_cli("learn", "--suite", "gsm8k", *common), "exists; pass --force")


def test_an_extractor_with_nothing_usable_is_an_error(tmp_path, tiny_model_dir):
    settings = LearnSettings(suite="gsm8k", train_limit=2, heldout_limit=2, rounds=1, min_words=500, max_words=600)
    with pytest.raises(PromptbakeError, match="no usable lesson"):
        learn(settings, tmp_path / "exp", data=SHARED_DATA, model=str(tiny_model_dir))
    assert not (tmp_path / "exp").exists()


def test_learn_end_to_end_gives_a_prompt_file_and_an_adapter_the_tools_accept(tmp_path, tiny_model_dir, monkeypatch):
    from promptbake.artifact import read_manifest
    from promptbake.evals import run_eval
    from promptbake.serve import plan_serving
    from promptbake.spec import load_spec
    from promptbake.verify import verify_adapter

    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    out = tmp_path / "exp-gsm8k"
    settings = LearnSettings(suite="gsm8k", train_limit=4, heldout_limit=3, rounds=2, max_words=200)
    fast = {"steps": 1, "batch_size": 2, "max_new_tokens": 8}
    result = learn(settings, out, data=SHARED_DATA, model=str(tiny_model_dir), compile_overrides=fast)
    assert result.lessons and len(result.rounds) == 2
    report = json.loads((out / "learn.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert set(report["final"]) >= {"heldout_base", "heldout_in_context", "heldout_baked", "knowledge_tokens"}
    assert 0 <= report["final"]["heldout_baked"]["value"] <= 1
    spec = load_spec(out / "knowledge.md")
    assert spec.system_prompt == result.knowledge and spec.system_prompt.startswith(KNOWLEDGE_HEADER)
    assert len((out / "train_tasks.jsonl").read_text().splitlines()) == 4
    manifest = read_manifest(out / "adapter")
    assert manifest.prompt_file == str(out / "knowledge.md") and manifest.heldout_file == str(out / "heldout_tasks.jsonl")
    assert not list(tmp_path.glob(".exp-gsm8k*")), "temporary folders left behind"
    checked = verify_adapter(out / "adapter", limit=2)
    assert checked.num_queries == 2 and "kl_gap_closed" in checked.metrics
    evaluated = run_eval("gsm8k", [out / "adapter"], data=SHARED_DATA, limit=2)
    assert set(evaluated["results"]) == {"base", "prompted", "exp-gsm8k"}
    base_dir, served = plan_serving([out / "adapter"])
    assert served[0].name == "exp-gsm8k"
