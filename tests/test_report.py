"""report: a real tiny adapter with real verify and eval results turned into report.html / report.md."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from conftest import SHARED_DATA, write_prompt
from promptbake.cli import app


@pytest.mark.slow
def test_report_has_plots_and_aligned_tables(tmp_path, tiny_model_dir):
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/datasets not present")
    prompt = write_prompt(tmp_path / "p", front="name: r\nqueries: queries.txt\nchecks:\n  - {name: short, max_words: 50}\n")
    out = tmp_path / "adapter"
    runner = CliRunner()
    fast = ["--steps", "3", "--batch-size", "4", "--heldout", "4", "--max-new-tokens", "6"]
    assert runner.invoke(app, ["compile", str(prompt), "--model", str(tiny_model_dir), "--out", str(out), *fast]).exit_code == 0
    reports = out / "reports"
    reports.mkdir()
    assert runner.invoke(app, ["verify", str(out), "--json", str(reports / "verify.json")]).exit_code in (0, 1)
    result = runner.invoke(app, ["eval", str(out), "--suite", "mmlu", "--data", str(SHARED_DATA), "--limit", "3",
                                 "--json", str(reports / "eval-mmlu.json")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0

    page = (out / "report.html").read_text()
    steps = len((out / "train_log.jsonl").read_text().splitlines())
    points = re.search(r'<polyline [^>]*points="([^"]+)"', page).group(1).split()
    assert len(points) == steps == 3  # the KL curve has one point per step
    assert page.count("<svg") >= 3  # KL curve, check bars, eval bars
    verify = json.loads((reports / "verify.json").read_text())
    assert f"{verify['metrics']['kl_gap_closed']['value']:.3f}" in page
    # eval table: 'prompted' has no agreement-with-itself; its cell stays empty instead of shifting the row
    evals = json.loads((reports / "eval-mmlu.json").read_text())["results"]
    header = ["metric", *evals]
    table = page[page.index("Eval: mmlu"):]
    row = re.search(r"<tr><td>agreement_with_prompted</td>(.*?)</tr>", table).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert len(cells) == len(header) - 1
    assert cells[header.index("prompted") - 1] == ""
    want = evals["r"]["metrics"]["agreement_with_prompted"]["value"]
    assert cells[header.index("r") - 1].startswith(f"{want:.1%}")
    md = (out / "report.md").read_text()
    assert "## Verify" in md and "## Eval: mmlu (n=3)" in md

    # Both results name the bake they measured; a second bake of the same prompt leaves them out of its report
    # and says so, instead of showing the first bake's numbers as its own.
    sha = json.loads((out / "bake.json").read_text())["adapter_sha256"]
    assert verify["adapter_sha256"] == sha
    assert json.loads((reports / "eval-mmlu.json").read_text())["adapter_sha256"] == {"r": sha}
    again = tmp_path / "again"
    assert runner.invoke(app, ["compile", str(prompt), "--model", str(tiny_model_dir), "--out", str(again), *fast,
                               "--seed", "1"]).exit_code == 0
    assert json.loads((again / "bake.json").read_text())["adapter_sha256"] != sha
    (again / "reports").mkdir()
    for name in ("verify.json", "eval-mmlu.json"):
        (again / "reports" / name).write_text((reports / name).read_text())
    assert runner.invoke(app, ["report", str(again)]).exit_code == 0
    md = (again / "report.md").read_text()
    assert "## Verify" not in md and "## Eval: mmlu" not in md
    assert "## Left out" in md and "verify.json, eval-mmlu.json" in md
    assert "Left out" in (again / "report.html").read_text()
