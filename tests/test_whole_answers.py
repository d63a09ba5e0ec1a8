"""Whole answers and separate held-out files: the response cap sized from the teacher's answers, every cut
counted, held-out queries read from their own file and never trained on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from promptbake.lengths import MIN_CAP, hit_cap, ids_hit_cap, quantile_length, size_cap
from promptbake.plan import plan_compile
from promptbake.rollout import rollout_from_lists

EOS = 2


@pytest.mark.parametrize("lengths", [[5], [1, 2, 3, 4], list(range(1, 101)), [7, 7, 7, 300, 2, 90, 45]])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 1.0])
def test_quantile_length_is_the_smallest_length_covering_q(lengths, q):
    got = quantile_length(lengths, q)
    # brute force: the smallest observed length L with at least q of the answers <= L
    want = min(L for L in lengths if sum(x <= L for x in lengths) >= q * len(lengths) - 1e-9)
    assert got == want


def test_size_cap_rounds_up_within_bounds():
    assert size_cap([10] * 20, 0.95, 512) == MIN_CAP  # short answers still get the floor
    assert size_cap([40] * 19 + [1000], 0.95, 512) == 48  # 40 rounded up to 16s; the one outlier is beyond 95 %
    assert size_cap([40] * 18 + [1000] * 2, 0.95, 512) == 512  # 10 % unfinished: the limit
    assert size_cap([100] * 20, 0.95, 64) == 64
    assert size_cap([17] * 20, 1.0, 20) == 20  # a limit below the floor wins
    for n in range(1, 300, 7):
        cap = size_cap([n], 1.0, 1000)
        assert cap % 16 == 0 and cap >= n and cap - n < 16 + MIN_CAP


def test_hit_cap_counts_only_answers_cut_before_their_end():
    responses = [[5, 6, 7, 8], [5, 6, 7, EOS], [5, EOS], [5, 6, 7]]
    rollout = rollout_from_lists(responses, pad_id=0)
    assert hit_cap(rollout, 4, [EOS]) == [True, False, False, False]
    assert hit_cap(rollout, 3, [EOS]) == [True, False, False, True]  # an answer that ended is never "cut"
    assert ids_hit_cap(responses, 4, [EOS]) == [True, False, False, False]


def test_sampled_rows_that_hit_the_cap_are_the_ones_without_eos(tiny):
    from promptbake.rollout import sample

    model, tok = tiny
    torch.manual_seed(3)
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10], [1, 4]]
    cap = 5
    ro = sample(model, prompts, max_new_tokens=cap, temperature=1.0, eos_ids=[EOS, 7, 9], pad_id=0)
    cut = hit_cap(ro, cap, [EOS, 7, 9])
    for row in range(len(prompts)):
        ids = ro.response_ids_BT[row][ro.response_mask_BT[row].bool()].tolist()
        assert cut[row] == (len(ids) == cap and ids[-1] not in (EOS, 7, 9))


def _prompt(folder, front: str, train: int = 30, heldout_lines: list[str] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "q.txt").write_text("".join(f"Question number {i}: what is {i} plus {i}?\n" for i in range(train)))
    if heldout_lines is not None:
        (folder / "h.txt").write_text("".join(f"{line}\n" for line in heldout_lines))
    path = folder / "prompt.md"
    path.write_text(f"---\nqueries: q.txt\n{front}---\nYou are a pirate. Say ahoy.\n")
    return path


def test_heldout_file_is_measured_on_and_every_training_query_is_trained(tmp_path):
    held = [f"Another question {i}?" for i in range(5)]
    plan = plan_compile(_prompt(tmp_path, "heldout: h.txt\n", heldout_lines=held), overrides={"batch_size": 4})
    train, heldout = plan.split()
    assert len(train) == 30 and [q.text for q in heldout] == held
    # an explicit count measures on the file's first N (0: none); training keeps every query of its file
    for count, expected in ((3, held[:3]), (0, []), (50, held)):
        for how in ({"overrides": {"batch_size": 4, "heldout": count}}, {"front": f"train: {{heldout: {count}}}\n"}):
            path = _prompt(tmp_path / f"n{count}-{'front' if 'front' in how else 'flag'}", "heldout: h.txt\n" + how.get("front", ""),
                           heldout_lines=held)
            limited = plan_compile(path, overrides=how.get("overrides", {"batch_size": 4}))
            train_n, heldout_n = limited.split()
            assert len(train_n) == 30 and [q.text for q in heldout_n] == expected
    # without the file, the seeded split of the query file is the fallback
    plan2 = plan_compile(_prompt(tmp_path / "b", "", heldout_lines=None), overrides={"batch_size": 4, "heldout": 6})
    train2, heldout2 = plan2.split()
    assert len(train2) == 24 and len(heldout2) == 6 and not {q.id for q in train2} & {q.id for q in heldout2}


def test_heldout_file_is_part_of_the_build_key(tmp_path, tiny_model_dir):
    path = _prompt(tmp_path, "heldout: h.txt\n", heldout_lines=["one?", "two?"])
    first = plan_compile(path, model=str(tiny_model_dir))
    first.resolve()
    (tmp_path / "h.txt").write_text("one?\nthree?\n")
    second = plan_compile(path, model=str(tiny_model_dir))
    second.resolve()
    assert first.build_key != second.build_key


FAST = dict(steps=2, batch_size=2, micro_batch_size=2, max_new_tokens_limit=24, length_probe_queries=6, checkpoint_every=100)


def test_compile_sizes_the_cap_from_the_teacher_and_reports_every_cut(tmp_path, tiny_model_dir, monkeypatch):
    """Auto cap = the size_cap of the teacher's probe answers; the manifest names it and the cut fractions,
    and the held-out file's queries are the ones measured and verified."""
    from promptbake import bake
    from promptbake.bake import compile_prompt
    from promptbake.verify import verify_adapter

    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    seen = {}
    real = bake.probe_teacher_lengths

    def spy(*args, **kwargs):
        seen["lengths"], seen["ended"] = real(*args, **kwargs)
        return seen["lengths"], seen["ended"]

    monkeypatch.setattr(bake, "probe_teacher_lengths", spy)
    held = [f"Held-out question {i}?" for i in range(4)]
    path = _prompt(tmp_path, "heldout: h.txt\nchecks: [{name: short, max_words: 400}]\n", heldout_lines=held)
    result = compile_prompt(path, out=tmp_path / "out", model=str(tiny_model_dir), overrides=FAST)
    m = result.manifest
    assert len(seen["lengths"]) == 6 and all(0 < n <= 24 for n in seen["lengths"])
    assert m.response_cap == size_cap(seen["lengths"], 0.95, 24)
    assert m.response_lengths["source"] == "auto" and m.response_lengths["limit"] == 24
    assert math.isclose(m.response_lengths["teacher_unfinished_at_limit"], sum(not e for e in seen["ended"]) / 6)
    assert set(m.cap_hit) >= {"heldout_before", "heldout_after", "train_rollouts", "greedy_base", "greedy_teacher", "greedy_baked"}
    assert all(0.0 <= v <= 1.0 for v in m.cap_hit.values())
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert m.cap_hit["train_rollouts"] == pytest.approx(sum(s["capped_rows"] for s in log) / sum(s["rows"] for s in log), abs=1e-4)
    assert m.heldout_file == str(tmp_path / "h.txt") and m.heldout_ids == [0, 1, 2, 3]

    # The probe is cached: a forced rebuild does not sample the teacher's answers again.
    seen.clear()
    compile_prompt(path, out=tmp_path / "out", model=str(tiny_model_dir), overrides=FAST, force=True)
    assert not seen

    report = verify_adapter(tmp_path / "out")
    assert report.num_queries == 4 and report.response_cap == m.response_cap
    assert set(report.cap_hit) >= {"samples_reverse_kl_baked", "greedy_teacher"}
    assert [s for s in report.samples["teacher"]]  # measured on the held-out file's queries


def test_explicit_cap_skips_the_probe(tmp_path, tiny_model_dir, monkeypatch):
    from promptbake import bake
    from promptbake.bake import compile_prompt

    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(bake, "probe_teacher_lengths", lambda *a, **k: pytest.fail("probed with an explicit cap"))
    result = compile_prompt(_prompt(tmp_path, ""), out=tmp_path / "out", model=str(tiny_model_dir),
                            overrides={**FAST, "max_new_tokens": 6, "heldout": 4})
    assert result.manifest.response_cap == 6 and result.manifest.response_lengths == {"cap": 6, "source": "config"}
    assert result.manifest.heldout_file is None and len(result.manifest.heldout_ids) == 4


def test_presets_fill_only_what_no_layer_sets():
    from promptbake.config import PRESETS, BakeConfig

    quick = BakeConfig.from_layers({"preset": "quick"})
    assert all(getattr(quick, k) == v for k, v in PRESETS["quick"].items())
    # the front matter (first layer) and the flags (second) win over the preset, the flags over the front matter
    mixed = BakeConfig.from_layers({"steps": 30, "preset": "quick"}, {"lr": 3e-3, "steps": None})
    assert mixed.steps == 30 and mixed.lr == 3e-3 and mixed.max_new_tokens == PRESETS["quick"]["max_new_tokens"]
    assert BakeConfig.from_layers({"preset": "quick"}, {"preset": "faithful"}).max_new_tokens == BakeConfig().max_new_tokens
    with pytest.raises(ValueError):
        BakeConfig.from_layers({"preset": "fastest"})
