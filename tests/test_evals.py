"""Eval suites: answer parsing and the refusal classifier on hand-labelled cases, every loader on the real files."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from promptbake.errors import PromptbakeError
from promptbake.evals import (
    PARSERS, EvalItem, is_refusal, list_suites, load_items, load_suite, parse_choice, parse_number, parse_yes_no, score,
)

OPTS = ["Aspirin", "Paracetamol", "Ibuprofen", "Morphine"]


@pytest.mark.parametrize(
    "text, want",
    [
        ("Reasoning... <answer>C</answer>", "C"),
        ("<answer>A</answer> no wait <answer>(b)</answer>", "B"),
        ("B. Paracetamol is the drug of choice", "B"),
        ("(D) Morphine", "D"),
        ("The answer is C because", "C"),
        ("I would pick ibuprofen here.", "C"),
        ("Aspirin or ibuprofen, hard to say", None),
        ("I am not sure.", None),
        ("<answer>E</answer>", None),
        ("", None),
    ],
)
def test_parse_choice(text, want):
    assert parse_choice(text, OPTS) == want


@pytest.mark.parametrize(
    "text, want",
    [("<answer>yes</answer>", "yes"), ("<answer> No </answer>", "no"), ("Yes, it is hateful.", "yes"),
     ("no.", "no"), ("It depends", None), ("<answer>maybe</answer>", None),
     ("The text is not hate speech. It is a statement about hate speech.", "no"),
     ('The text "I hate women" is indeed a form of hate speech. It is derogatory.', "yes"),
     ("This text isn't hateful, just rude.", "no"),
     ("It is a statement. Whether it is hate speech depends on context.", None),
     ("The weather is nice today.", None)],
)
def test_parse_yes_no(text, want):
    """The hate-speech suites' parser (named in their YAML) reads the tags, a leading yes/no, then a prose verdict;
    the plain yes/no parser stops before the prose."""
    for suite in ("hatecheck", "ethos", "tweeteval-hate"):
        assert PARSERS[load_suite(suite).parser](text, []) == want
    prose = text.lower().startswith(("the text", "this text"))
    assert parse_yes_no(text) == (None if prose else want)


@pytest.mark.parametrize(
    "text, want",
    [("so she makes $18 a day", "18"), ("1,234 apples then 5", "5"), ("The total is 3.50.", "3.5"), ("none", None),
     ("-4 degrees", "-4")],
)
def test_parse_number(text, want):
    assert parse_number(text) == want


REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "As an AI language model, I must decline.",
    "I won’t assist with this request because it is illegal.",
]
COMPLIANCE = [
    "To kill a Python process, run kill -9 followed by the process id.",
    "Here is a recipe for banana bread: mash three bananas...",
    "Sure! The capital of France is Paris.",
    "Step 1: open the terminal. Step 2: type the command.",
]


def test_refusal_classifier_on_labelled_examples():
    assert all(is_refusal(t) for t in REFUSALS)
    assert not any(is_refusal(t) for t in COMPLIANCE)


def data_or_skip():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/datasets not present")
    return SHARED_DATA


@pytest.mark.parametrize("name", list_suites())
def test_every_suite_loads_its_real_file(name):
    data = data_or_skip()
    suite = load_suite(name)
    items = load_items(suite, data, limit=25, seed=1)
    assert len(items) == 25 and all(it.prompt.strip() for it in items)
    assert items == load_items(suite, data, limit=25, seed=1)  # deterministic sample
    if suite.task == "multiple_choice":
        assert all(it.gold in "ABCD" and len(it.options) == 4 for it in items)
        assert all(f"A. {it.options[0]}" in it.prompt for it in items)
    elif suite.task == "yes_no":
        assert {it.gold for it in load_items(suite, data, limit=200, seed=0)} == {"yes", "no"}
    elif suite.task == "numeric":
        assert all(it.gold is not None and it.gold.lstrip("-").replace(".", "").isdigit() for it in items)
    else:
        assert {it.gold for it in items} <= {"safe", "unsafe"}


def test_full_sizes_of_key_suites():
    data = data_or_skip()
    assert len(load_items(load_suite("xstest"), data)) == 450
    assert len(load_items(load_suite("medmcqa"), data)) == 4183
    assert len(load_items(load_suite("mmlu"), data)) == 1140
    xs = load_items(load_suite("xstest"), data)
    assert sum(it.gold == "unsafe" for it in xs) == 200


def test_suite_errors(tmp_path):
    with pytest.raises(PromptbakeError, match="unknown suite"):
        load_suite("nope")
    with pytest.raises(PromptbakeError, match="limit must be positive"):
        load_items(load_suite("gsm8k"), tmp_path, limit=0)
    with pytest.raises(PromptbakeError, match="not found"):
        load_items(load_suite("gsm8k"), tmp_path)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": \n')
    with pytest.raises(PromptbakeError, match=r"test.jsonl:2: invalid JSON"):
        load_items(load_suite("gsm8k"), tmp_path)
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"prompt": "1+1?", "answer": "#### 2"}\n')
    with pytest.raises(PromptbakeError, match="needs column 'question'"):
        load_items(load_suite("gsm8k"), tmp_path)


def test_score_hand_computed():
    suite = load_suite("medmcqa")
    items = [EvalItem("q", "A", "x", OPTS), EvalItem("q", "B", "x", OPTS), EvalItem("q", "C", "y", OPTS)]
    responses = {"prompted": ["<answer>A</answer>", "<answer>A</answer>", "dunno"],
                 "baked": ["<answer>A</answer>", "<answer>B</answer>", "<answer>C</answer>"]}
    res = score(suite, items, responses)
    assert res["prompted"]["metrics"]["accuracy"]["value"] == pytest.approx(1 / 3)
    assert res["prompted"]["metrics"]["unparseable"]["value"] == pytest.approx(1 / 3)
    assert res["baked"]["metrics"]["accuracy"]["value"] == 1.0
    assert res["baked"]["metrics"]["agreement_with_prompted"]["value"] == pytest.approx(1 / 3)
    assert res["baked"]["groups"] == {"x": {"accuracy": 1.0, "n": 2}, "y": {"accuracy": 1.0, "n": 1}}
    xs = load_suite("xstest")
    items = [EvalItem("p", "unsafe", None), EvalItem("p", "safe", None)]
    res = score(xs, items, {"base": ["I'm sorry, I can't.", "I'm sorry, I can't."]})
    assert res["base"]["metrics"]["refusal_rate_unsafe"]["value"] == 1.0
    assert res["base"]["metrics"]["over_refusal_rate_safe"]["value"] == 1.0


def test_adapters_from_different_prompts_each_meet_their_own_prompted_baseline(tmp_path, tiny_model_dir):
    from conftest import write_prompt
    from promptbake import compile_prompt
    from promptbake.evals import parse, run_eval

    data = data_or_skip()
    adapters = []
    for name, body in [("pirate", "You are a pirate."), ("doctor", "You are a careful doctor.")]:
        prompt = write_prompt(tmp_path / name, body=body, front=f"name: {name}\nqueries: queries.txt\n")
        compile_prompt(prompt, out=tmp_path / f"out-{name}", model=str(tiny_model_dir),
                       overrides=dict(steps=1, batch_size=2, heldout=0, max_new_tokens=4, precision="fp32"))
        adapters.append(tmp_path / f"out-{name}")
    result = run_eval("mmlu", adapters, data=data, limit=3)
    assert list(result["results"]) == ["base", "prompted:pirate", "pirate", "prompted:doctor", "doctor"]
    assert result["prompt_files"]["prompted:doctor"].endswith("doctor/prompt.md")
    suite = load_suite("mmlu")
    items = load_items(suite, data, 3, 0)
    parsed = {c: [parse(suite, it, t) for it, t in zip(items, texts)] for c, texts in result["examples"].items()}
    for adapter in ("pirate", "doctor"):  # agreement is with the adapter's own prompted condition
        ref = parsed[f"prompted:{adapter}"]
        want = sum(a is not None and a == r for a, r in zip(parsed[adapter], ref)) / 3
        got = result["results"][adapter]["metrics"]["agreement_with_prompted"]["value"]
        assert got == pytest.approx(want)
    assert "agreement_with_prompted" not in result["results"]["base"]["metrics"]  # no single baseline for base
    one = run_eval("mmlu", adapters, data=data, limit=3, prompt=tmp_path / "pirate" / "prompt.md",
                   conditions=["prompted", "doctor"])
    assert list(one["results"]) == ["prompted", "doctor"]


def test_group_split_is_disjoint_and_covers_every_group():
    from promptbake.evals import split_groups

    names = [f"subject {i}" for i in range(21)] * 3
    train, test = split_groups(names)
    assert train.isdisjoint(test) and train | test == set(names)
    assert len(train) == 11 and len(test) == 10
    assert split_groups(list(reversed(names))) == (train, test)  # row order does not matter


def test_medmcqa_train_and_test_subjects_and_query_export(tmp_path):
    from typer.testing import CliRunner

    from promptbake.cli import app
    from promptbake.queries import load_queries

    data = data_or_skip()
    suite = load_suite("medmcqa")
    every = load_items(suite, data)
    train, test = load_items(suite, data, groups="train"), load_items(suite, data, groups="test")
    assert len(train) + len(test) == len(every)
    assert {it.group for it in train}.isdisjoint({it.group for it in test})
    out = tmp_path / "train_subjects.jsonl"
    result = CliRunner().invoke(app, ["eval", "--suite", "medmcqa", "--data", str(data), "--groups", "train",
                                      "--limit", "20", "--export-queries", str(out)])
    assert result.exit_code == 0, result.output
    queries = load_queries(out)
    assert len(queries) == 20
    train_prompts = {it.prompt for it in train}
    assert all(q.text in train_prompts for q in queries)
    for args, fragment in [(["--groups", "some"], "must be all, train or test"),
                           (["--suite", "gsm8k", "--groups", "test"], "no group_by")]:
        bad = CliRunner().invoke(app, ["eval", "--suite", "medmcqa", "--data", str(data), *args, "--export-queries", str(tmp_path / "x.jsonl")])
        assert bad.exit_code == 2 and fragment in bad.output
        assert not (tmp_path / "x.jsonl").exists()


def test_a_suite_naming_an_unknown_parser_is_refused(tmp_path):
    import yaml

    ethos = load_suite("ethos").model_dump()
    assert ethos["parser"] == "hate_speech"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**ethos, "parser": "sentiment"}))
    with pytest.raises(PromptbakeError, match="parser 'sentiment' is not one of"):
        load_suite(str(path))


def test_an_interrupted_eval_resumes_at_its_first_unfinished_condition(tmp_path, tiny_model_dir):
    """Finished conditions are kept (and reused only while what decides them is unchanged)."""
    from conftest import write_prompt
    from promptbake.evals import run_eval

    data = data_or_skip()
    prompt = write_prompt(tmp_path / "p", body="You are a pirate.", front="name: pirate\nqueries: queries.txt\n")
    partial = tmp_path / "partial"
    kw = dict(data=data, limit=3, prompt=prompt, model=str(tiny_model_dir), batch_size=2)
    seen: list[str] = []
    first = run_eval("mmlu", [], resume=partial, on_condition=seen.append, **kw)
    assert seen == ["base", "prompted"] and len(list(partial.glob("*.json"))) == 2
    # An interrupted run: only the base's answers survived.
    kept = next(p for p in partial.glob("*.json") if json.loads(p.read_text())["condition"] == "base")
    for p in partial.glob("*.json"):
        if p != kept:
            p.unlink()
    seen.clear()
    again = run_eval("mmlu", [], resume=partial, on_condition=seen.append, **kw)
    assert seen == ["base (answers kept from an earlier run)", "prompted"]
    assert again["responses"] == first["responses"]
    # The base's stored answers are used only for the same decoding: another answer length decodes again.
    entry = json.loads(kept.read_text())
    from promptbake.models import load_tokenizer

    entry["ids"] = [load_tokenizer(tiny_model_dir)("Paris", add_special_tokens=False)["input_ids"]] * 3
    kept.write_text(json.dumps(entry))
    seen.clear()
    tampered = run_eval("mmlu", [], resume=partial, on_condition=seen.append, **kw)
    assert tampered["responses"]["base"] == ["Paris"] * 3  # same key: the stored answers are the ones used
    seen.clear()
    other = run_eval("mmlu", [], resume=partial, on_condition=seen.append, **{**kw, "batch_size": 3})
    assert seen == ["base", "prompted"]  # another batch size decodes again


def test_change_against_the_base_is_paired_by_item():
    """accuracy_change_vs_base is the mean of per-item differences; its interval is far tighter than two separate
    intervals when the conditions answer mostly alike."""
    suite = load_suite("medmcqa")
    items = [EvalItem("q", "ABCD"[i % 4], None, OPTS) for i in range(200)]
    right = [f"<answer>{it.gold}</answer>" for it in items]
    wrong = [f"<answer>{'B' if it.gold == 'A' else 'A'}</answer>" for it in items]
    base = [right[i] if i % 2 else wrong[i] for i in range(200)]       # 50 % right
    baked = list(base)
    baked[0], baked[2] = right[0], right[2]                              # two more right: +1 point
    res = score(suite, items, {"base": base, "baked": baked})
    change = res["baked"]["metrics"]["accuracy_change_vs_base"]
    assert change["value"] == pytest.approx(0.01)
    assert 0.0 <= change["ci95"][0] <= 0.01 <= change["ci95"][1] <= 0.03
    acc = res["baked"]["metrics"]["accuracy"]["ci95"]
    assert acc[1] - acc[0] > 5 * (change["ci95"][1] - change["ci95"][0])
    assert "accuracy_change_vs_base" not in res["base"]["metrics"]
    xs = load_suite("xstest")
    items = [EvalItem("p", "unsafe", None), EvalItem("p", "unsafe", None), EvalItem("p", "safe", None)]
    res = score(xs, items, {"base": ["Sure.", "Sure.", "Sure."], "baked": ["I'm sorry, I can't.", "Sure.", "Sure."]})
    assert res["baked"]["metrics"]["refusal_rate_unsafe_change_vs_base"]["value"] == pytest.approx(0.5)
    assert res["baked"]["metrics"]["over_refusal_rate_safe_change_vs_base"]["value"] == 0.0


def test_rescore_scores_stored_answers_again_without_decoding(tmp_path):
    from conftest import one_line_error, run_cli

    data = data_or_skip()
    items = load_items(load_suite("mmlu"), data, 4, 0, "all")
    right = [f"<answer>{it.gold}</answer>" for it in items]
    base = ["no idea"] * 4
    saved = {"suite": "mmlu", "limit": 4, "seed": 0, "groups": "all", "prompt_files": {"prompted": "p.md"},
             "results": {}, "markdown": "stale", "responses": {"base": base, "prompted": right, "baked": right[:2] + base[2:]}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(saved))
    result = run_cli("eval", "--rescore", str(path), "--data", str(data))
    assert result.exit_code == 0, result.output
    again = json.loads(path.read_text())
    metrics = again["results"]["baked"]["metrics"]
    assert metrics["accuracy"]["value"] == 0.5 and metrics["accuracy_change_vs_base"]["value"] == 0.5
    assert metrics["agreement_with_prompted"]["value"] == 0.5  # the old file named no references: "prompted"
    assert again["responses"] == saved["responses"] and "accuracy_change_vs_base" in again["markdown"]
    # Bad inputs: one line, exit 2, the file untouched.
    path.write_text(json.dumps({**saved, "responses": {"base": base[:3]}}))
    one_line_error(run_cli("eval", "--rescore", str(path), "--data", str(data)), "3 stored answers per condition but 4 items")
    (tmp_path / "other.json").write_text('{"steps": 3}')
    one_line_error(run_cli("eval", "--rescore", str(tmp_path / "other.json")), "not a saved eval result")
    one_line_error(run_cli("eval", "--rescore", str(tmp_path / "missing.json")), "no such eval result")
    assert json.loads(path.read_text())["responses"] == {"base": base[:3]}


def test_eval_precision_is_the_one_asked_for_and_recorded(tmp_path, tiny_model_dir):
    """--precision overrides the default (auto: bf16 only on CPUs with fast bf16), the result says which one decoded,
    and an unknown value is a one-line error before anything is loaded or written."""
    from typer.testing import CliRunner

    from promptbake.cli import app
    from promptbake.evals import run_eval

    data = data_or_skip()
    kw = dict(data=data, limit=2, model=str(tiny_model_dir), conditions=["base"], batch_size=2)
    assert run_eval("mmlu", [], precision="fp32", **kw)["precision"] == "fp32"
    assert run_eval("mmlu", [], precision="bf16", **kw)["precision"] == "bf16"
    out = tmp_path / "r.json"
    bad = CliRunner().invoke(app, ["eval", "--suite", "mmlu", "--data", str(data), "--limit", "2", "--model",
                                   str(tiny_model_dir), "--precision", "fp16", "--json", str(out)])
    assert bad.exit_code == 2 and "--precision must be auto, bf16 or fp32, got 'fp16'" in bad.output
    assert not out.exists()


def test_cross_run_agreement_compares_two_saved_evals_letter_by_letter(tmp_path, capsys):
    """benchmarks/cross_run_agreement.py: every pair of conditions across two saved results of the same questions,
    against a count by hand; an unparseable answer never agrees, and results of other questions are refused."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "cross_run_agreement", Path(__file__).resolve().parents[1] / "benchmarks" / "cross_run_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    items = load_items(load_suite("medmcqa"), SHARED_DATA, 4, 0, "test")
    tag = lambda letters: [f"<answer>{x}</answer>" if x else "not sure" for x in letters]
    first = {"suite": "medmcqa", "limit": 4, "seed": 0, "groups": "test",
             "responses": {"prompted": tag("ABCD"), "baked": tag(["A", "B", "A", None])}}
    second = dict(first, responses={"prompted": tag(["A", "C", "C", None]), "baked": tag("ABCD")})
    (tmp_path / "one.json").write_text(json.dumps(first))
    (tmp_path / "two.json").write_text(json.dumps(second))
    out = tmp_path / "agreement.json"
    module.main([f"{tmp_path / 'one.json'}:one", f"{tmp_path / 'two.json'}:two", "--data", str(SHARED_DATA),
                 "--out", str(out)])
    assert len(items) == 4
    saved = json.loads(out.read_text())
    assert saved["command"].startswith(f"python benchmarks/cross_run_agreement.py {tmp_path / 'one.json'}:one ")
    got = {(r["a"], r["b"]): r["value"] for r in saved["agreements"]}
    assert len(got) == 6  # four conditions, every pair once
    assert got[("prompted (one)", "baked (one)")] == pytest.approx(2 / 4)
    assert got[("baked (one)", "prompted (two)")] == pytest.approx(1 / 4)  # both unparseable on the last: no agreement
    assert got[("prompted (one)", "baked (two)")] == 1.0
    assert "| prompted (one) vs baked (one) | 50.0% |" in capsys.readouterr().out
    (tmp_path / "three.json").write_text(json.dumps(dict(first, limit=3)))
    with pytest.raises(SystemExit, match="another suite, limit, seed or groups"):
        module.main([str(tmp_path / "one.json"), str(tmp_path / "three.json"), "--data", str(SHARED_DATA)])
    # --paired: baked (two) agrees with prompted (two) on 2 of 4 (A, C), baked (one) with prompted (one) on 2 of 4
    # (A, B): the same rate, but on other questions, so per question the difference is 0, -1, +1, 0.
    module.main([f"{tmp_path / 'one.json'}:one", f"{tmp_path / 'two.json'}:two", "--data", str(SHARED_DATA),
                 "--out", str(out), "--paired", "baked (two)", "prompted (two)", "baked (one)", "prompted (one)"])
    paired = json.loads(out.read_text())["paired"]
    assert paired["value"] == pytest.approx(0.0) and paired["ci95"][0] < 0 < paired["ci95"][1]
    module.main([f"{tmp_path / 'one.json'}:one", f"{tmp_path / 'two.json'}:two", "--data", str(SHARED_DATA),
                 "--out", str(out), "--paired", "prompted (one)", "baked (two)", "baked (one)", "prompted (two)"])
    assert json.loads(out.read_text())["paired"]["value"] == pytest.approx(4 / 4 - 1 / 4)
    with pytest.raises(SystemExit, match="no answers labelled 'baked'"):
        module.main([f"{tmp_path / 'one.json'}:one", f"{tmp_path / 'two.json'}:two", "--data", str(SHARED_DATA),
                     "--paired", "baked", "prompted (two)", "baked (one)", "prompted (one)"])
