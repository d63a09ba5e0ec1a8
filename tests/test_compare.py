"""`compare`: variants, equal token budgets, the seed statistics, and a whole run on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import write_prompt
from promptbake.compare import SeedRun, Variant, aggregate, compare_methods, variants
from promptbake.errors import PromptbakeError
from promptbake.stats import seeds_mean_ci

from conftest import SHARED_DATA as DATA


def test_seeds_mean_ci_is_the_t_interval():
    values = [0.2, 0.4, 0.9]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 dof)
    est = seeds_mean_ci(values)
    assert est.value == pytest.approx(mean)
    assert (est.lo, est.hi) == (pytest.approx(mean - half), pytest.approx(mean + half))
    one = seeds_mean_ci([0.7])
    assert (one.value, one.lo, one.hi, one.n) == (0.7, 0.7, 0.7, 1)
    # a rate's interval stops at its range; the mean is untouched
    clipped = seeds_mean_ci(values, bounds=(0.0, 1.0))
    assert clipped.value == pytest.approx(mean) and clipped.lo == 0.0 and clipped.hi == 1.0
    assert mean - half < 0 and mean + half > 1


def test_rate_columns_are_clipped_to_their_range():
    runs = [SeedRun("opcd-frozen", "opcd", "frozen", s, f"a{s}", 2, 100, None, metrics={"kl_gap_closed": g},
                    checks={"c": {"base": 1.0, "teacher": 1.0, "baked": b}})
            for s, (g, b) in enumerate([(-0.5, 1.0), (0.9, 0.6), (0.95, 1.0)])]
    row = aggregate(runs)["opcd-frozen"]
    assert row["check:c"].hi == 1.0 and row["check:c"].lo > 0.0
    assert row["kl_gap_closed"].hi > 1.0  # not a rate: a gap closed can be anything, no clipping


def test_variants_put_the_budget_setter_first_and_skip_sft_live():
    got = variants(["sft", "offpolicy", "opcd"], ["live", "frozen"])
    assert got[0] == Variant("opcd", "frozen")
    assert Variant("sft", "live") not in got
    assert {v.name for v in got} == {"opcd-frozen", "offpolicy-frozen", "sft-frozen", "opcd-live", "offpolicy-live"}
    with pytest.raises(PromptbakeError, match="unknown"):
        variants(["opcd", "dpo"], ["frozen"])


def test_aggregate_means_over_seeds_and_keeps_reference_rows():
    runs = [SeedRun("opcd-frozen", "opcd", "frozen", s, f"a{s}", 2, 100 + s, None,
                    metrics={"kl_gap_closed": g}, checks={"c": {"base": 0.0, "teacher": 1.0, "baked": b}},
                    evals={"mmlu": {"accuracy": acc}})
            for s, (g, b, acc) in enumerate([(0.5, 0.6, 0.3), (0.7, 0.8, 0.4)])]
    table = aggregate(runs, {"base": {"mmlu": {"accuracy": 0.35}}})
    assert table["opcd-frozen"]["kl_gap_closed"].value == pytest.approx(0.6)
    assert table["opcd-frozen"]["check:c"].value == pytest.approx(0.7)
    assert table["opcd-frozen"]["mmlu:accuracy"].value == pytest.approx(0.35)
    assert table["prompted"]["check:c"].value == 1.0 and table["base"]["check:c"].value == 0.0
    assert table["base"]["mmlu:accuracy"].value == 0.35
    twice = aggregate(runs + [SeedRun("sft-frozen", "sft", "frozen", 0, "b0", 2, 100, None,
                                      checks={"c": {"base": 0.0, "teacher": 1.0, "baked": 0.5}})])
    assert twice["prompted"]["check:c"].n == 2  # one value per seed, however many variants share it


def test_compare_gives_every_method_the_same_token_budget(tmp_path, tiny_model_dir, monkeypatch):
    prompt = write_prompt(tmp_path / "p", front="queries: queries.txt\nchecks:\n  - name: says_ahoy\n    contains: ahoy\n")
    suites = ["mmlu"] if (DATA / "mmlu").is_dir() else []
    result = compare_methods(
        prompt, methods=["sft", "opcd", "offpolicy"], teacher_modes=["frozen"], seeds=2, suites=suites, eval_limit=4,
        data=DATA, out=tmp_path / "cmp", model=str(tiny_model_dir),
        overrides=dict(steps=2, batch_size=4, heldout=4, max_new_tokens=8, precision="fp32"),
    )
    runs = result["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [
        (v, s) for s in (0, 1) for v in ("opcd-frozen", "sft-frozen", "offpolicy-frozen")]
    for seed in (0, 1):
        ref, *others = [r for r in runs if r["seed"] == seed]
        assert ref["token_budget"] is None and ref["steps"] == 2
        for r in others:
            assert r["token_budget"] == ref["tokens_trained"]
            log = [json.loads(line) for line in (Path(r["adapter"]) / "train_log.jsonl").read_text().splitlines()]
            total = sum(e["response_tokens"] for e in log)
            assert total == r["tokens_trained"] >= r["token_budget"]  # reached the budget ...
            assert total - log[-1]["response_tokens"] < r["token_budget"]  # ... and stopped at the first step past it
            assert r["steps"] == len(log) <= 8
    table = result["table"]
    assert set(table) == {"opcd-frozen", "sft-frozen", "offpolicy-frozen", "base", "prompted"}
    gap = table["offpolicy-frozen"]["kl_gap_closed"]
    assert gap["n"] == 2 and gap["ci95"][0] <= gap["value"] <= gap["ci95"][1]
    assert "check:says_ahoy" in table["sft-frozen"]
    if suites:
        assert "mmlu:accuracy" in table["base"] and "mmlu:accuracy" in table["opcd-frozen"]
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["markdown"] == result["markdown"] and "| opcd-frozen |" in result["markdown"]

    # run again: every adapter is up to date and every measurement is saved, so nothing trains or measures
    def measured_twice(*args, **kwargs):
        raise AssertionError("a saved measurement was recomputed")

    monkeypatch.setattr("promptbake.verify.verify_adapters", measured_twice)
    monkeypatch.setattr("promptbake.evals.run_eval", measured_twice)
    again = compare_methods(
        prompt, methods=["sft", "opcd", "offpolicy"], teacher_modes=["frozen"], seeds=2, suites=suites, eval_limit=4,
        data=DATA, out=tmp_path / "cmp", model=str(tiny_model_dir),
        overrides=dict(steps=2, batch_size=4, heldout=4, max_new_tokens=8, precision="fp32"),
    )
    assert [r["tokens_trained"] for r in again["runs"]] == [r["tokens_trained"] for r in runs]
    assert again["markdown"] == result["markdown"]
    # a different eval setting is a different measurement: not reused
    if suites:
        with pytest.raises(AssertionError, match="recomputed"):
            compare_methods(
                prompt, methods=["sft", "opcd", "offpolicy"], teacher_modes=["frozen"], seeds=2, suites=suites,
                eval_limit=5, data=DATA, out=tmp_path / "cmp", model=str(tiny_model_dir),
                overrides=dict(steps=2, batch_size=4, heldout=4, max_new_tokens=8, precision="fp32"),
            )


def test_eval_limits_per_suite():
    from promptbake.cli import _eval_limits
    from promptbake.compare import suite_limits

    assert _eval_limits("150", ["mmlu", "gsm8k"]) == 150
    assert suite_limits(150, ["mmlu", "gsm8k"]) == {"mmlu": 150, "gsm8k": 150}
    assert _eval_limits("100,gsm8k=40", ["mmlu", "gsm8k"]) == {"mmlu": 100, "gsm8k": 40}
    assert suite_limits({"gsm8k": 40}, ["mmlu", "gsm8k"]) == {"mmlu": None, "gsm8k": 40}  # unnamed: the whole suite
    assert suite_limits(None, ["mmlu"]) == {"mmlu": None}
