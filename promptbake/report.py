"""`report`: a self-contained report.html (inline SVG plots) and report.md for a baked adapter.

Reads the artifact (manifest, train log) plus any JSON results found in the adapter's `reports/`
folder: `verify.json` from `promptbake verify --json`, `eval-*.json` from `promptbake eval --json`,
`serving.json` from the serving benchmark.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from promptbake.artifact import read_manifest
from promptbake.atomic import write_text_atomic

COLORS = {"base": "#9e9e9e", "teacher": "#1f77b4", "prompted": "#1f77b4", "baked": "#d62728"}


def _color(name: str, i: int) -> str:
    return COLORS.get(name, ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e"][i % 4])


def line_svg(values: list[float], width: int = 640, height: int = 220, label: str = "KL") -> str:
    """A polyline of values over steps, with y axis ticks."""
    if not values:
        return "<p>no training log</p>"
    pad, top = 44, max(values) * 1.1 or 1.0
    low = min(0.0, min(values))
    span = top - low
    xs = [pad + i * (width - pad - 10) / max(1, len(values) - 1) for i in range(len(values))]
    ys = [height - 24 - (v - low) / span * (height - 40) for v in values]
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    ticks = "".join(
        f'<line x1="{pad}" x2="{width - 10}" y1="{height - 24 - f * (height - 40):.1f}" y2="{height - 24 - f * (height - 40):.1f}" stroke="#eee"/>'
        f'<text x="4" y="{height - 20 - f * (height - 40):.1f}">{low + f * span:.3f}</text>'
        for f in (0, 0.25, 0.5, 0.75, 1.0)
    )
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{label} per step">{ticks}'
            f'<polyline fill="none" stroke="#d62728" stroke-width="2" points="{points}"/>'
            f'<text x="{pad}" y="{height - 6}">step 1</text><text x="{width - 60}" y="{height - 6}">step {len(values)}</text></svg>')


def bars_svg(groups: dict[str, dict[str, tuple[float, float, float]]], width: int = 720) -> str:
    """Grouped bars: {group: {condition: (value, lo, hi)}} with rates in [0, 1] and CI whiskers."""
    if not groups:
        return ""
    conds = list(dict.fromkeys(c for g in groups.values() for c in g))
    bar, gap, chart_h, left = 22, 18, 180, 40
    height = chart_h + 60
    width = max(width, left + len(groups) * (len(conds) * bar + gap) + 20)
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="rates per condition">']
    for f in (0, 0.5, 1.0):
        y = 10 + chart_h * (1 - f)
        parts.append(f'<line x1="{left}" x2="{width}" y1="{y}" y2="{y}" stroke="#eee"/><text x="4" y="{y + 4}">{f:.0%}</text>')
    x = left + 10
    for gname, vals in groups.items():
        for i, cond in enumerate(conds):
            if cond not in vals:
                continue
            v, lo, hi = vals[cond]
            h = chart_h * max(0.0, min(1.0, v))
            parts.append(f'<rect x="{x + i * bar}" y="{10 + chart_h - h:.1f}" width="{bar - 4}" height="{h:.1f}" fill="{_color(cond, i)}">'
                         f'<title>{html.escape(cond)}: {v:.1%} [{lo:.1%}, {hi:.1%}]</title></rect>')
            if hi == hi and lo == lo:  # not NaN
                cx = x + i * bar + (bar - 4) / 2
                parts.append(f'<line x1="{cx}" x2="{cx}" y1="{10 + chart_h * (1 - hi):.1f}" y2="{10 + chart_h * (1 - lo):.1f}" stroke="#000"/>')
        fits = max(4, int((len(conds) * bar + gap) / 6.5))  # ~6.5 px per character: labels must not overlap
        label = gname if len(gname) <= fits else gname[:fits - 1] + "…"
        parts.append(f'<text x="{x}" y="{chart_h + 28}">{html.escape(label)}<title>{html.escape(gname)}</title></text>')
        x += len(conds) * bar + gap
    legend = " ".join(f'<tspan fill="{_color(c, i)}">■ {html.escape(c)}</tspan>' for i, c in enumerate(conds))
    parts.append(f'<text x="{left}" y="{height - 6}">{legend}</text></svg>')
    return "".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows])


def _ci(estimate: dict, spec: str) -> str:
    lo, hi = estimate["ci95"]
    return f"{estimate['value']:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def measured_another_bake(result: dict, adapter_sha256: str) -> bool:
    """True when a saved verify or eval result names the bakes it measured and this one is not among them: a
    results file left from an earlier bake of the same name. Results saved before they named their bakes pass."""
    measured = result.get("adapter_sha256")
    if isinstance(measured, dict):  # eval: adapter name -> sha256; empty when only base and prompted were run
        return bool(measured) and adapter_sha256 not in measured.values()
    return bool(measured) and measured != adapter_sha256


def build_report(adapter_dir: str | Path) -> tuple[Path, Path]:
    adapter_dir = Path(adapter_dir)
    m = read_manifest(adapter_dir)
    log_path = adapter_dir / "train_log.jsonl"
    kl = [json.loads(line)["kl"] for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    reports = adapter_dir / "reports"
    checks = {name: {cond: (rates[name], float("nan"), float("nan")) for cond, rates in m.check_rates.items()}
              for name in next(iter(m.check_rates.values()), {})}
    check_rows = [[name] + [f"{v[0]:.0%}" for v in d.values()] for name, d in checks.items()]
    check_header = ["check"] + list(m.check_rates)
    md = [f"# {m.name}", "", m.description, "", f"- prompt tokens saved per request: {m.prompt_tokens}",
          f"- held-out reverse KL to the prompted teacher: {m.heldout_kl_before} -> {m.heldout_kl_after}",
          f"- training: {m.loss_summary.get('steps')} steps, {m.loss_summary.get('seconds', 0):.0f} s", ""]
    if check_rows:
        md += ["## Checks", _md_table(check_header, check_rows), ""]

    left_out: list[str] = []  # results files in reports/ that measured another bake of this name
    verify_table = rules_table = ""
    verify = json.loads((reports / "verify.json").read_text()) if (reports / "verify.json").is_file() else None
    if verify is not None and measured_another_bake(verify, m.adapter_sha256):
        left_out.append("verify.json")
        verify = None
    if verify is not None:
        rows = [[k, f"{v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"] for k, v in verify["metrics"].items()]
        verify_table = _table(["metric", "value [95% CI]"], rows)
        md += ["## Verify", _md_table(["metric", "value [95% CI]"], rows), ""]
        if verify.get("rules"):
            header = ["rule", "queries", "KL gap closed [95% CI]", "checks teacher", "checks baked"]
            rule_rows = [[f"{r['rule']}: {r['text']}", str(r["num_queries"]), _ci(r["kl_gap_closed"], ".2f"),
                          _ci(r["checks_teacher"], ".0%") if "checks_teacher" in r else "-",
                          _ci(r["checks_baked"], ".0%") if "checks_baked" in r else "-"] for r in verify["rules"]]
            rules_table = _table(header, rule_rows)
            md += ["## Per rule, worst first", _md_table(header, rule_rows), ""]
    evals = []
    for path in sorted(reports.glob("eval-*.json")) if reports.is_dir() else []:
        data = json.loads(path.read_text())
        if measured_another_bake(data, m.adapter_sha256):
            left_out.append(path.name)
            continue
        groups: dict[str, dict[str, tuple[float, float, float]]] = {}
        for cond, res in data["results"].items():
            for metric, est in res["metrics"].items():
                groups.setdefault(metric, {})[cond] = (est["value"], *est["ci95"])
        header = ["metric"] + list(data["results"])
        rows = [[metric] + [f"{conds[c][0]:.1%} [{conds[c][1]:.1%}, {conds[c][2]:.1%}]" if c in conds else ""
                            for c in header[1:]] for metric, conds in groups.items()]
        evals.append({"suite": data["suite"], "n": data["n"], "svg": bars_svg(groups), "table": _table(header, rows)})
        md += [f"## Eval: {data['suite']} (n={data['n']})", data.get("markdown", ""), ""]
    serving = ""
    if (reports / "serving.json").is_file():
        s = json.loads((reports / "serving.json").read_text())
        serving = f"<pre>{html.escape(s.get('markdown', json.dumps(s, indent=2)))}</pre>"
        md += ["## Serving", s.get("markdown", ""), ""]

    if left_out:
        md += ["## Left out", f"Measured another bake than this one (adapter sha256 {m.adapter_sha256[:12]}): "
               + ", ".join(left_out), ""]

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html", "j2"]))
    from markupsafe import Markup

    page = env.get_template("report.html.j2").render(
        m=m,
        kl_svg=Markup(line_svg(kl)),
        check_svg=Markup(bars_svg(checks)) if checks else "",
        check_table=Markup(_table(check_header, check_rows)) if check_rows else "",
        verify=verify, verify_table=Markup(verify_table), rules_table=Markup(rules_table),
        evals=[{**e, "svg": Markup(e["svg"]), "table": Markup(e["table"])} for e in evals],
        serving=Markup(serving), left_out=left_out,
        config=json.dumps(m.config), versions=", ".join(f"{k} {v}" for k, v in m.versions.items()),
    )
    html_path, md_path = adapter_dir / "report.html", adapter_dir / "report.md"
    write_text_atomic(html_path, page)
    write_text_atomic(md_path, "\n".join(md) + "\n")
    return html_path, md_path
