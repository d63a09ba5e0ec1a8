"""verify: metric helpers against hand-computed cases, and the CI gate's exit codes on a tiny adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_prompt
from promptbake.cli import app
from promptbake.stats import bootstrap, gap_closed_ci, mean_ci, ratio_of_means_ci
from promptbake.verify import token_agreement


def test_token_agreement_hand_cases():
    assert token_agreement([1, 2, 3], [1, 2, 3], 32) == 1.0
    assert token_agreement([1, 2, 3], [1, 9, 3], 32) == pytest.approx(2 / 3)
    assert token_agreement([1, 2], [1, 2, 3, 4], 32) == pytest.approx(0.5)
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 9], 2) == 1.0
    assert token_agreement([], [], 5) == 1.0


def test_bootstrap_interval_contains_value_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = mean_ci(rng.integers(0, 2, 20).tolist())
    large = mean_ci(rng.integers(0, 2, 2000).tolist())
    assert small.lo <= small.value <= small.hi and large.lo <= large.value <= large.hi
    assert (large.hi - large.lo) < (small.hi - small.lo)
    constant = mean_ci([1.0] * 10)
    assert constant.value == constant.lo == constant.hi == 1.0


def test_bootstrap_matches_direct_percentiles():
    values = [0.0, 1.0, 1.0, 0.0, 1.0]
    est = bootstrap([values], lambda a: float(a.mean()), n_boot=500, seed=3)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 5, size=(500, 5))
    direct = np.percentile(np.asarray(values)[idx].mean(axis=1), [2.5, 97.5])
    assert (est.lo, est.hi) == pytest.approx(tuple(direct))


def test_ratio_and_gap_closed_values():
    assert ratio_of_means_ci([1, 0, 1, 1], [1, 1, 1, 1]).value == pytest.approx(0.75)
    # token-weighted: baked (0.1*10 + 0.3*10)/20 = 0.2, base (0.4*10 + 0.4*30)/40 = 0.4 -> gap 0.5
    assert gap_closed_ci([0.1, 0.3], [0.4, 0.4], [10, 10], [10, 30]).value == pytest.approx(0.5)


def test_length_threshold_is_two_sided():
    """max_length_change fails a bake that runs long and one that stops short, and names the ratio."""
    from promptbake.spec import VerifyThresholds
    from promptbake.stats import Estimate
    from promptbake.verify import VerifyReport, apply_thresholds

    def gate(ratio: float, limit: float) -> list[str]:
        report = VerifyReport("a", 10, metrics={"length_ratio": Estimate(ratio, ratio, ratio, 10)})
        apply_thresholds(report, VerifyThresholds(max_length_change=limit))
        return report.failures

    assert gate(1.2, 0.25) == [] and gate(0.8, 0.25) == []
    assert "length_ratio = 1.300" in gate(1.3, 0.25)[0] and "length_ratio = 0.700" in gate(0.7, 0.25)[0]
    assert gate(float("nan"), 0.25)  # no answers measured is a failure, not a pass
    assert gate(1.0, 0.0) == []


@pytest.mark.slow
def test_verify_exit_code_flips_with_threshold(tmp_path, tiny_model_dir):
    prompt = write_prompt(tmp_path / "p", front="name: v\nqueries: queries.txt\nchecks:\n  - {name: short, max_words: 50}\n")
    out = tmp_path / "adapter"
    runner = CliRunner()
    fast = ["--steps", "3", "--batch-size", "4", "--heldout", "6", "--max-new-tokens", "8", "--lr", "0.003"]
    assert runner.invoke(app, ["compile", str(prompt), "--model", str(tiny_model_dir), "--out", str(out), *fast]).exit_code == 0

    report_path = tmp_path / "report.json"
    ok = runner.invoke(app, ["verify", str(out), "--json", str(report_path), "--min-token-agreement", "0"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["num_queries"] == 6
    agreement = report["metrics"]["token_agreement"]["value"]
    for key in ("reverse_kl_baked", "reverse_kl_base", "forward_kl_baked", "forward_kl_base", "kl_gap_closed", "exact_match"):
        assert key in report["metrics"]
    assert set(report["checks"]["short"]) == {"base", "teacher", "baked"}
    m = report["metrics"]
    for cond in ("teacher", "base", "baked"):  # sampled answers, 1 token up to the 8-token cap
        assert 1 <= m[f"answer_tokens_{cond}"]["value"] <= 8
    assert m["length_ratio"]["value"] == pytest.approx(m["answer_tokens_baked"]["value"] / m["answer_tokens_teacher"]["value"])
    wide = runner.invoke(app, ["verify", str(out), "--max-length-change", "10"])
    assert wide.exit_code == 0, wide.output

    fail = runner.invoke(app, ["verify", str(out), "--min-token-agreement", str(min(agreement + 0.01, 1.01))])
    assert fail.exit_code == 1 and "token_agreement" in fail.output

    # A changed prompt is refused unless asked for, and a tampered adapter is refused.
    prompt.write_text(prompt.read_text() + "\nOne more rule.\n")
    changed = runner.invoke(app, ["verify", str(out)])
    assert changed.exit_code == 2 and "allow-prompt-change" in changed.output
    assert runner.invoke(app, ["verify", str(out), "--allow-prompt-change", "--limit", "2"]).exit_code == 0
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    tampered = runner.invoke(app, ["verify", str(out), "--allow-prompt-change"])
    assert tampered.exit_code == 2 and "sha256" in tampered.output


@pytest.mark.slow
def test_verify_several_adapters_matches_one_at_a_time(tmp_path, tiny_model_dir):
    """Base and teacher measured once for several adapters give each adapter the numbers it gets alone."""
    from promptbake.errors import PromptbakeError
    from promptbake.verify import verify_adapter, verify_adapters

    prompt = write_prompt(tmp_path / "p", front="name: v\nqueries: queries.txt\nchecks:\n  - {name: short, max_words: 50}\n")
    runner = CliRunner()
    fast = ["--steps", "2", "--batch-size", "4", "--heldout", "5", "--max-new-tokens", "8"]
    folders = {}
    for name, extra in {"a": ["--lr", "0.003"], "b": ["--lr", "0.01"], "other_seed": ["--lr", "0.003", "--seed", "7"]}.items():
        folders[name] = tmp_path / name
        result = runner.invoke(app, ["compile", str(prompt), "--model", str(tiny_model_dir), "--out", str(folders[name]), *fast, *extra])
        assert result.exit_code == 0, result.output

    together = verify_adapters([folders["a"], folders["b"]])
    alone = [verify_adapter(folders["a"]), verify_adapter(folders["b"])]
    assert [r.adapter for r in together] == [str(folders["a"]), str(folders["b"])]
    assert together[0].metrics["reverse_kl_baked"].value != together[1].metrics["reverse_kl_baked"].value
    for t, a in zip(together, alone):
        assert set(t.metrics) == set(a.metrics)
        for key in t.metrics:
            assert t.metrics[key].value == pytest.approx(a.metrics[key].value, abs=1e-5), key
        assert t.samples == a.samples
        assert {c: {k: e.value for k, e in d.items()} for c, d in t.checks.items()} == \
               {c: {k: e.value for k, e in d.items()} for c, d in a.checks.items()}

    with pytest.raises(PromptbakeError, match="held-out queries differ"):
        verify_adapters([folders["a"], folders["other_seed"]])
    json_path = tmp_path / "both.json"
    both = runner.invoke(app, ["verify", str(folders["a"]), str(folders["b"]), "--json", str(json_path)])
    assert both.exit_code == 0, both.output
    assert [r["adapter"] for r in json.loads(json_path.read_text())] == [str(folders["a"]), str(folders["b"])]
