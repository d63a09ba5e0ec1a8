"""benchmarks/quality.py --paired: one run's KL gap closed minus the mean of others', paired by held-out query."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks.quality import paired_difference, reference_path, run_path


def _measurement(rng: random.Random, queries: int, scale: float) -> dict:
    per_query = [rng.uniform(0.01, 0.2) * scale for _ in range(queries)]
    tokens = [rng.randint(5, 256) for _ in range(queries)]
    return {"mean": sum(per_query) / queries, "per_query": per_query, "tokens": tokens}


def _gap(run: dict, base: dict) -> float:
    """1 - KL(run) / KL(base), each a token-weighted mean over queries, written out longhand."""
    run_kl = sum(k * n for k, n in zip(run["per_query"], run["tokens"])) / sum(run["tokens"])
    base_kl = sum(k * n for k, n in zip(base["per_query"], base["tokens"])) / sum(base["tokens"])
    return 1 - run_kl / base_kl


def _save(path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_the_paired_difference_is_the_first_runs_gap_less_the_others_mean_with_an_interval_around_it(tmp_path):
    rng = random.Random(0)
    reference = {kind: _measurement(rng, 30, 1.0) for kind in ("reverse", "forward")}
    _save(reference_path(tmp_path, "demo", 256), reference)
    runs = {name: {kind: _measurement(rng, 30, scale) for kind in ("reverse", "forward")}
            for name, scale in (("first", 0.2), ("a", 0.3), ("b", 0.4))}
    for name, measured in runs.items():
        _save(run_path(tmp_path, "demo", name), {"measured": measured})

    result = paired_difference(tmp_path, "demo", "first", ["a", "b"])

    for kind in ("reverse", "forward"):
        want = _gap(runs["first"][kind], reference[kind]) - (
            _gap(runs["a"][kind], reference[kind]) + _gap(runs["b"][kind], reference[kind])) / 2
        got = result[kind]
        assert got["value"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        lo, hi = got["ci95"]
        assert lo < got["value"] < hi and got["n"] == 30


def test_a_run_paired_with_itself_differs_by_nothing_and_a_missing_run_is_one_line(tmp_path):
    rng = random.Random(1)
    reference = {kind: _measurement(rng, 12, 1.0) for kind in ("reverse", "forward")}
    _save(reference_path(tmp_path, "demo", 256), reference)
    same = {kind: _measurement(rng, 12, 0.3) for kind in ("reverse", "forward")}
    _save(run_path(tmp_path, "demo", "x"), {"measured": same})

    result = paired_difference(tmp_path, "demo", "x", ["x"])
    assert result["reverse"]["value"] == 0 and result["reverse"]["ci95"] == [0, 0]

    with pytest.raises(SystemExit, match=r"nope\.json: no saved run of that name"):
        paired_difference(tmp_path, "demo", "x", ["nope"])


def test_lengths_split_each_models_answers_at_the_cap_and_the_gap_on_answers_that_ended(tmp_path):
    """--lengths: answers at the measure cap apart from the ones that ended; the gap on answers that ended is the
    token-weighted gap over those answers alone, written out longhand here."""
    from benchmarks.quality import lengths_table

    base = {"per_query": [0.10, 0.04, 0.08, 0.02], "tokens": [40, 256, 60, 256]}
    teacher = {"per_query": [0.05, 0.05, 0.05, 0.05], "tokens": [30, 50, 256, 20]}
    baked = {"per_query": [0.02, 0.01, 0.03, 0.02], "tokens": [35, 256, 45, 70]}
    _save(reference_path(tmp_path, "p", 256), {"reverse": base, "forward": teacher})
    _save(run_path(tmp_path, "p", "v-s0-b0k"), {"measured": {"reverse": baked}, "reverse_gap": _gap(baked, base)})
    text, data = lengths_table(tmp_path, "p", 256)
    rows = data["rows"]
    assert (rows["base"]["cut"], rows["teacher (its forward-KL samples)"]["cut"], rows["v-s0-b0k"]["cut"]) == (2, 1, 1)
    assert rows["v-s0-b0k"]["median_tokens"] == 57.5 and rows["v-s0-b0k"]["ended_mean_tokens"] == 50
    assert rows["base"]["cut_token_share"] == pytest.approx(512 / 612)
    ended_baked = (0.02 * 35 + 0.03 * 45 + 0.02 * 70) / 150
    ended_base = (0.10 * 40 + 0.08 * 60) / 100
    assert data["gaps"]["v-s0-b0k"]["ended"] == pytest.approx(1 - ended_baked / ended_base)
    assert data["gaps"]["v-s0-b0k"]["all"] == pytest.approx(_gap(baked, base))
    assert "v-s0-b0k" in text


def test_versus_is_the_mean_over_shared_seeds_of_each_seeds_paired_difference(tmp_path):
    """--versus A B: per seed where both runs exist, A's gap minus B's (written out longhand), then their mean;
    a seed with only one of the two is left out rather than compared with nothing."""
    from benchmarks.quality import run_name, seeds_difference

    rng = random.Random(2)
    reference = {kind: _measurement(rng, 20, 1.0) for kind in ("reverse", "forward")}
    _save(reference_path(tmp_path, "demo", 256), reference)
    runs = {}
    for variant, seeds, scale in (("a", (0, 1, 2), 0.2), ("b", (0, 1), 0.35)):
        for seed in seeds:
            runs[variant, seed] = {kind: _measurement(rng, 20, scale) for kind in ("reverse", "forward")}
            _save(run_path(tmp_path, "demo", run_name(variant, seed, 0)), {"measured": runs[variant, seed]})

    result = seeds_difference(tmp_path, "demo", "a", "b", [0, 1, 2], budget=0)

    assert result["seeds"] == [0, 1]
    for kind in ("reverse", "forward"):
        per_seed = [_gap(runs["a", s][kind], reference[kind]) - _gap(runs["b", s][kind], reference[kind]) for s in (0, 1)]
        assert result[kind]["per_seed"] == pytest.approx(per_seed, abs=1e-4)
        assert result[kind]["value"] == pytest.approx(sum(per_seed) / 2, rel=1e-9)
        lo, hi = result[kind]["ci95"]
        assert lo < result[kind]["value"] < hi
    assert seeds_difference(tmp_path, "demo", "a", "b", [2], budget=0)["seeds"] == []
