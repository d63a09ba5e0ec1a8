"""benchmarks/token_products.py: every way of running a token's products gives F.linear's outputs, in model order."""

from __future__ import annotations

import json

import torch

from benchmarks.token_products import LAYOUTS, frozen_weights, main


def test_every_layout_matches_linear_and_each_rows_threads_cell_is_timed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "products.json"
    threads = torch.get_num_threads()
    main(["--model", str(tiny_model_dir), "--rows", "3,5", "--threads", "1", "--rounds", "2", "--repeats", "1",
          "--json", str(out)])
    saved = json.loads(out.read_text())
    # Two layers of seven weights and the output layer; the packed and concatenated forms compute the same numbers.
    assert saved["weights"] == 2 * 7 + 1
    assert set(saved["agreement_with_linear"]) == set(LAYOUTS)
    assert all(diff < 1e-4 for diff in saved["agreement_with_linear"].values()), saved["agreement_with_linear"]
    cells = {(c["layout"], c["rows"], c["threads"]): c for c in saved["cells"]}
    assert set(cells) == {(layout, rows, 1) for layout in LAYOUTS for rows in (3, 5)}
    assert all(len(c["ms"]) == 2 and min(c["ms"]) > 0 for c in cells.values())
    assert cells["weight-first", 3, 1]["weight_first_over_this"] == 1.0
    assert "| onednn-packed | 5 | 1 |" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the process's thread count is back as it was


def test_concatenated_weights_hold_the_same_rows_in_the_same_order(tiny):
    model, _ = tiny
    plain, fused = frozen_weights(model)
    assert len(fused) == 2 * 4 + 1
    assert torch.equal(torch.cat([w.flatten() for w in plain]), torch.cat([w.flatten() for w in fused]))
