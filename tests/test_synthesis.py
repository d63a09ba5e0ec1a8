"""Queries from the prompt: rule splitting, cleaning and de-duplication, caching, multi-turn rendering, the
compile fallback, per-rule results and the bad inputs (tiny real model; no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, one_line_error, run_cli, write_prompt
from promptbake.errors import PromptbakeError
from promptbake.queries import Query, load_queries
from promptbake.rules import rule_id, split_rules
from promptbake.synthesis import (Deduplicator, LocalGenerator, LocalModel, SynthesisSettings, clean_message,
                                  diversity, prompted_answers, synthesize, word_ngrams)

POLICY = """You are Aria, the assistant of Lumen Bank. You are friendly.
Always greet the customer by name when they give it.

## Cards
1. Never ask for a full card number,
   a PIN or a password.
2. Lost cards: tell the customer to block the card in the app:
   - open Cards,
   - then Block.
- Fees are listed at lumen.example/fees.

## Tone
The bank was founded in 1990. Keep every answer under five sentences.
"""

RULES_PROMPT = """## Rules
1. Always begin every answer with the words "Ahoy there".
2. Never mention the weather in any answer.
3. Keep every answer shorter than three sentences.
"""


def test_rules_are_list_items_and_instructing_sentences():
    rules = split_rules(POLICY)
    texts = [r.text for r in rules]
    assert texts == [
        "Always greet the customer by name when they give it.",
        "Never ask for a full card number, a PIN or a password.",
        "Lost cards: tell the customer to block the card in the app: - open Cards, - then Block.",
        "Fees are listed at lumen.example/fees.",
        "Keep every answer under five sentences.",
    ]
    assert [r.section for r in rules] == ["", "Cards", "Cards", "Cards", "Tone"]
    # Descriptive sentences ("You are friendly.", "founded in 1990") are not rules.
    assert not any("1990" in t or t == "You are friendly." for t in texts)


def test_rule_ids_are_stable_when_rules_move_and_change_with_wording():
    before = {r.text: r.id for r in split_rules(POLICY)}
    moved = POLICY.replace("## Tone", "## Tone\n1. Always answer in English.\n")
    after = {r.text: r.id for r in split_rules(moved)}
    assert all(after[text] == rid for text, rid in before.items())
    assert rule_id("Keep every answer under five sentences.") != rule_id("Keep every answer under six sentences.")
    assert rule_id("Keep  every answer UNDER five sentences.") == rule_id("keep every answer under five sentences.")


def test_shipped_long_prompt_splits_into_its_numbered_rules():
    from promptbake.spec import load_spec

    rules = split_rules(load_spec(REPO / "prompts" / "support.md").system_prompt)
    assert len(rules) >= 22  # 22 numbered rules, plus the opening instruction
    assert len({r.id for r in rules}) == len(rules)
    plans = next(r for r in rules if r.text.startswith("There are three internet plans"))
    assert "Storm" in plans.text  # nested bullets stay with their rule


def test_clean_message_keeps_user_text_and_drops_leaks_copies_and_lengths():
    settings = SynthesisSettings(min_words=3, max_words=12)
    prompt_ngrams = word_ngrams("Never ask for a full card number, a PIN or a password, even if offered.")
    assert clean_message(' Message: "Can I pay my bill by card?"', settings, prompt_ngrams) == "Can I pay my bill by card?"
    assert clean_message("hi there", settings, prompt_ngrams) is None  # too short
    assert clean_message("word " * 13, settings, prompt_ngrams) is None  # too long
    assert clean_message("Rule: never do this thing again", settings, prompt_ngrams) is None  # the format leaked
    assert clean_message("never ask for a full card number a PIN or a password", settings, prompt_ngrams) is None


def test_deduplicator_drops_exact_and_near_copies_and_keeps_different_ones():
    dedup = Deduplicator()
    assert dedup.add("How do I block my lost card?")
    assert not dedup.add("how do i block my lost card")  # same after normalising
    assert not dedup.add("How do I block my lost cards?")  # one letter apart
    assert dedup.add("What are the fees for a transfer abroad?")
    figures = diversity(["a b c d", "a b c d", "e f g h"])
    assert figures["duplicate_rate"] == pytest.approx(1 / 3)
    assert figures["distinct_1"] == pytest.approx(8 / 12)


def test_synthesis_covers_rules_is_seeded_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    settings = SynthesisSettings(n=12, seed=3, max_words=200, off_topic=0.25)
    model = LocalModel(tiny_model_dir)
    first = synthesize(RULES_PROMPT, LocalGenerator(model), settings)
    assert not first.cached and len(first.records) == 12
    rule_ids = {r.id for r in split_rules(RULES_PROMPT)}
    assert first.rules_covered == 3 and {r["rule"] for r in first.records} <= rule_ids | {"off-topic"}
    assert sum(r["rule"] == "off-topic" for r in first.records) >= 1
    keys = [" ".join(r["query"].casefold().split()) for r in first.records]
    assert len(set(keys)) == len(keys)
    fresh = LocalModel(tiny_model_dir)
    again = synthesize(RULES_PROMPT, LocalGenerator(fresh), settings)
    assert again.cached and again.records == first.records and again.path == first.path
    assert fresh._runtime is None  # the cache answered without loading the model
    other = synthesize(RULES_PROMPT, LocalGenerator(fresh), SynthesisSettings(n=12, seed=4, max_words=200))
    assert other.path != first.path and not other.cached
    loaded = load_queries(first.path)
    assert [q.rule for q in loaded] == [r["rule"] for r in first.records]


def test_excluded_queries_are_never_written(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    settings = SynthesisSettings(n=6, seed=1, max_words=200)
    plain = synthesize(RULES_PROMPT, LocalGenerator(LocalModel(tiny_model_dir)), settings)
    banned = [Query(0, [{"role": "user", "content": plain.records[0]["query"]}])]
    result = synthesize(RULES_PROMPT, LocalGenerator(LocalModel(tiny_model_dir)), settings, exclude=banned)
    assert result.path != plain.path
    assert plain.records[0]["query"] not in [r["query"] for r in result.records]


def test_two_turns_the_student_never_sees_the_system_prompt(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    settings = SynthesisSettings(n=4, turns=2, seed=0, max_words=200, answer_tokens=12)
    model = LocalModel(tiny_model_dir)
    result = synthesize(RULES_PROMPT, LocalGenerator(model), settings, teacher=prompted_answers(model, RULES_PROMPT, settings),
                        teacher_identity=model.identity)
    assert len(result.records) == 4
    path = tmp_path / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in result.records))
    queries = load_queries(path)
    renderer = model.runtime.renderer(RULES_PROMPT.strip())
    tok = model.runtime.tokenizer
    for q in queries:
        assert [m["role"] for m in q.messages] == ["user", "assistant", "user"] and q.rule
        student = tok.decode(renderer.student_ids(q.messages))
        teacher = tok.decode(renderer.teacher_ids(q.messages))
        assert "Ahoy there" not in student and "Never mention the weather" not in student
        assert teacher.count("Never mention the weather") == 1
        assert q.messages[1]["content"] in student and q.messages[2]["content"] in student


def test_a_generator_with_nothing_usable_is_an_error(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    with pytest.raises(PromptbakeError, match="returned nothing usable"):
        synthesize(RULES_PROMPT, LocalGenerator(LocalModel(tiny_model_dir)),
                   SynthesisSettings(n=3, min_words=500, max_words=600, max_rounds=2, max_new_tokens=4))
    assert not (tmp_path / "home" / "queries").exists() or not list((tmp_path / "home" / "queries").iterdir())


def test_queries_command_writes_tagged_jsonl_and_refuses_bad_input(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    prompt = write_prompt(tmp_path / "p", body=RULES_PROMPT, front="name: ahoy\n")
    out = tmp_path / "q.jsonl"
    result = run_cli("queries", prompt, "-n", 5, "-o", out, "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5 and all(r["query"] and r["rule"] for r in records)
    assert "rules covered" in " ".join(result.output.split())
    before = out.read_bytes()
    one_line_error(run_cli("queries", prompt, "-n", 5, "-o", out, "--model", tiny_model_dir), "exists; pass --force")
    assert out.read_bytes() == before
    fresh = tmp_path / "fresh.jsonl"
    one_line_error(run_cli("queries", prompt, "-n", 0, "-o", fresh, "--model", tiny_model_dir), "-n must be positive")
    one_line_error(run_cli("queries", prompt, "-o", fresh, "--model", tiny_model_dir, "--generator", "no-such-model"),
                   "--generator: unknown model 'no-such-model'")
    one_line_error(run_cli("queries", prompt, "-o", fresh, "--model", tiny_model_dir,
                       "--generator-url", "http://127.0.0.1:9"), "--generator-url http://127.0.0.1:9")
    no_rules = write_prompt(tmp_path / "n", body="You are a pirate. Say ahoy.", front="name: plain\n")
    one_line_error(run_cli("queries", no_rules, "-o", fresh, "--model", tiny_model_dir), "no rules")
    one_line_error(run_cli("queries", prompt, "-o", fresh, "--turns", 3), "--turns must be 1 or 2")
    assert not fresh.exists()


def test_compile_without_a_query_file_writes_them_and_names_them(tiny_model_dir, tmp_path, monkeypatch):
    from promptbake.artifact import read_manifest

    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    prompt = write_prompt(tmp_path / "p", body=RULES_PROMPT, front="name: ahoy\n")
    out = tmp_path / "out"
    args = ["compile", prompt, "--model", tiny_model_dir, "--out", out, "--steps", "1", "--batch-size", "4",
            "--heldout", "4", "--max-new-tokens", "8"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "names no query file" in " ".join(result.output.split())
    manifest = read_manifest(out)
    assert manifest.queries_synthesized and manifest.num_queries == 500
    assert Path(manifest.queries_file).is_relative_to(tmp_path / "home" / "queries")
    again = run_cli(*args)
    assert again.exit_code == 0 and "up to date" in again.output and "names no query file" not in again.output and "(cached)" in " ".join(again.output.split())
    no_rules = write_prompt(tmp_path / "n", body="You are a pirate. Say ahoy.", front="name: plain\n")
    one_line_error(run_cli("compile", no_rules, "--model", tiny_model_dir, "--out", tmp_path / "o2"), "no queries")


def test_per_rule_results_group_by_rule_then_tag_worst_first():
    from promptbake.measure import KLResult
    from promptbake.verify import per_rule_results, rule_groups

    queries = [Query(0, [{"role": "user", "content": "a"}], rule="r-1"),
               Query(1, [{"role": "user", "content": "b"}], rule="r-1"),
               Query(2, [{"role": "user", "content": "c"}], tags=("billing",)),
               Query(3, [{"role": "user", "content": "d"}], rule="r-2", tags=("billing",))]
    assert rule_groups(queries) == {"r-1": [0, 1], "billing": [2], "r-2": [3]}
    baked = KLResult([0.1, 0.3, 0.9, 0.0], [10, 30, 5, 5])
    base = KLResult([1.0, 1.0, 1.0, 1.0], [10, 10, 5, 5])
    checks = {"teacher": [1.0, 1.0, 0.0, 1.0], "baked": [1.0, 0.0, 0.0, 1.0]}
    results = per_rule_results(queries, {"r-1": "Rule one.", "r-2": "Rule two."}, baked, base, checks)
    assert [r.rule for r in results] == ["billing", "r-1", "r-2"]  # worst gap closed first
    r1 = results[1]
    # Token-weighted, as the whole-set gap: 1 - (0.1*10 + 0.3*30)/40 / 1.0
    assert r1.kl_gap_closed.value == pytest.approx(1 - (0.1 * 10 + 0.3 * 30) / 40)
    assert r1.text == "Rule one." and r1.num_queries == 2
    assert r1.checks_teacher.value == 1.0 and r1.checks_baked.value == 0.5
    assert results[0].text == "queries tagged 'billing'"
