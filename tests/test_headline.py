"""benchmarks/headline.py: the published sequence, and a labelled re-bake published beside the earlier results."""

from __future__ import annotations

from pathlib import Path

from benchmarks.headline import RESULTS, steps


def test_a_labelled_rebake_writes_only_into_its_own_folders_and_evaluates_retention_per_bake():
    data = Path("../shared/datasets")
    plain, labelled = steps(data), steps(data, "2026-12-05")
    # the same bakes, verifies and domain evals in the same order; only where they publish differs
    assert [c[:3] for g, c, _ in plain if g != "retention"] == [c[:3] for g, c, _ in labelled if g != "retention"]
    published = [done for _, _, done in labelled if done.is_relative_to(RESULTS)]
    assert published and all(done.parent.name in ("medical-2026-12-05", "safety-2026-12-05") for done in published)
    for _, command, done in labelled:  # every output a command names is the one that marks it done
        if "--json" in command:
            assert Path(command[command.index("--json") + 1]) == done
    retention = [(command[2], done) for group, command, done in labelled if group == "retention"]
    assert [(bake.split("/")[-1], done.name) for bake, done in retention] == [
        ("medical", "eval-mmlu.json"), ("medical", "eval-gsm8k.json"), ("safety", "eval-mmlu.json"), ("safety", "eval-gsm8k.json")]
    assert {done.parent.name for _, done in retention} == {"medical-2026-12-05", "safety-2026-12-05"}
    plain_retention = [done for group, _, done in plain if group == "retention"]
    assert {done.parent for done in plain_retention} == {RESULTS / "retention"} and len(plain_retention) == 2
