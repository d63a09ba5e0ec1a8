"""`compare`: which way of baking works best for *this* prompt? OPCD against its baselines, on the user's data.

For every seed and every variant (method x teacher mode) it compiles the prompt (without compile's own
before/after measurement), verifies that seed's adapters together against the prompted teacher on the
seed's held-out queries (base and teacher measured once), and runs the eval suites on all adapters side
by side (base and prompted once: greedy decoding makes them the same for every seed). Each metric
is then the mean over seeds with a 95 % t-interval: with three seeds a bootstrap over seeds says nothing.

Equal budgets: the first variant of a seed (opcd with the frozen teacher, when asked for) trains its
`steps`; every other variant of that seed stops once it has trained on as many response tokens
(`token_budget`), with four times the steps as the upper bound. The table reports the tokens each used.

Every compile goes to its own folder under `out`, so an interrupted compare picks up where it stopped:
finished adapters are "up to date" and the one in progress resumes from its checkpoint. Each seed's
verify results and each suite's eval results are saved there too (verify-s<seed>.json, eval-<suite>.json,
keyed by the adapters' build keys and the eval settings), so they are not measured twice either.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from promptbake.errors import PromptbakeError
from promptbake.stats import Estimate, seeds_mean_ci

METHODS = ("opcd", "offpolicy", "sft")
TEACHER_MODES = ("frozen", "live")
STEP_CAP = 4  # budget-matched variants may take up to this many times the reference's steps


@dataclass(frozen=True)
class Variant:
    method: str
    teacher_mode: str

    @property
    def name(self) -> str:
        return f"{self.method}-{self.teacher_mode}"


def variants(methods: list[str], teacher_modes: list[str]) -> list[Variant]:
    """Every method x teacher mode, opcd-frozen first (it sets the budget); sft has no teacher logits, so no live."""
    bad = [m for m in methods if m not in METHODS] + [t for t in teacher_modes if t not in TEACHER_MODES]
    if bad:
        raise PromptbakeError(f"compare: unknown {bad}; methods are {', '.join(METHODS)}, teacher modes {', '.join(TEACHER_MODES)}")
    if not methods or not teacher_modes:
        raise PromptbakeError("compare: give at least one method and one teacher mode")
    out = [Variant(m, t) for t in teacher_modes for m in methods if not (m == "sft" and t == "live")]
    out.sort(key=lambda v: v != Variant("opcd", "frozen"))
    return list(dict.fromkeys(out))


@dataclass
class SeedRun:
    """One compiled and measured adapter."""

    variant: str
    method: str
    teacher_mode: str
    seed: int
    adapter: str
    steps: int
    tokens_trained: int
    token_budget: int | None
    metrics: dict[str, float] = field(default_factory=dict)           # verify: kl_gap_closed, reverse_kl_baked, ...
    checks: dict[str, dict[str, float]] = field(default_factory=dict)  # check -> condition -> pass rate
    evals: dict[str, dict[str, float]] = field(default_factory=dict)   # suite -> metric -> value


EVAL_METRICS = ("accuracy", "refusal_rate_unsafe", "over_refusal_rate_safe")
VERIFY_METRICS = ("kl_gap_closed", "reverse_kl_baked", "forward_kl_gap_closed", "token_agreement")


def aggregate(runs: list[SeedRun], reference: dict[str, dict[str, dict[str, float]]] | None = None) -> dict[str, dict[str, Estimate]]:
    """Per variant, every measured number as mean over seeds with a 95 % t-interval.

    `reference` (condition -> suite -> metric -> value) adds the base and prompted rows of the evals; their
    check pass rates come from the verify runs (per seed, since each seed holds out other queries)."""
    rows: dict[str, dict[str, list[float]]] = {}
    reference_seeds: set[int] = set()
    for r in runs:
        row = rows.setdefault(r.variant, {})
        row.setdefault("tokens_trained", []).append(float(r.tokens_trained))
        row.setdefault("steps", []).append(float(r.steps))
        for k, v in r.metrics.items():
            row.setdefault(k, []).append(v)
        for check, by_cond in r.checks.items():
            row.setdefault(f"check:{check}", []).append(by_cond["baked"])
            if r.seed in reference_seeds:
                continue  # base and teacher answers are the same for every variant of a seed: count them once
            for cond in ("base", "teacher"):
                rows.setdefault(cond if cond == "base" else "prompted", {}).setdefault(f"check:{check}", []).append(by_cond[cond])
        reference_seeds.add(r.seed)
        for suite, metrics in r.evals.items():
            for k, v in metrics.items():
                row.setdefault(f"{suite}:{k}", []).append(v)
    for cond, suites in (reference or {}).items():
        for suite, metrics in suites.items():
            for k, v in metrics.items():
                rows.setdefault(cond, {})[f"{suite}:{k}"] = [v]
    return {name: {k: seeds_mean_ci(v, bounds=(0.0, 1.0) if is_rate(k) else None) for k, v in cols.items()}
            for name, cols in rows.items()}


def is_rate(column: str) -> bool:
    """Columns that are fractions in [0, 1]: check pass rates, suite rates, token agreement."""
    return column.startswith("check:") or column.split(":")[-1] in EVAL_METRICS or column == "token_agreement"


def markdown(table: dict[str, dict[str, Estimate]], seeds: int) -> str:
    columns = list(dict.fromkeys(k for row in table.values() for k in row if k != "steps"))
    order = [n for n in table if n not in ("base", "prompted")] + [n for n in ("base", "prompted") if n in table]
    lines = [f"| variant ({seeds} seed{'s' if seeds != 1 else ''}) | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in order:
        cells = []
        for col in columns:
            est = table[name].get(col)
            if est is None:
                cells.append("")
            elif col == "tokens_trained":
                cells.append(f"{est.value:,.0f}")
            elif is_rate(col):
                cells.append(f"{est.value:.1%}" + (f" [{est.lo:.1%}, {est.hi:.1%}]" if est.n > 1 else ""))
            else:
                cells.append(f"{est.value:.3f}" + (f" [{est.lo:.3f}, {est.hi:.3f}]" if est.n > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def suite_limits(eval_limit: int | dict[str, int] | None, suites: list[str]) -> dict[str, int | None]:
    """Items per suite: one number for all, or per suite ({"gsm8k": 40}; suites not named keep the full set)."""
    from promptbake.evals import load_suite

    for suite in suites:
        load_suite(suite)
    if isinstance(eval_limit, int) and eval_limit <= 0:
        raise PromptbakeError(f"--eval-limit must be positive, got {eval_limit}")
    per_suite = eval_limit if isinstance(eval_limit, dict) else {s: eval_limit for s in suites}
    unknown = sorted(set(per_suite) - set(suites))
    if unknown:
        raise PromptbakeError(f"--eval-limit names {', '.join(unknown)}, which are not among the suites ({', '.join(suites) or 'none'})")
    for suite, n in per_suite.items():
        if n is not None and n <= 0:
            raise PromptbakeError(f"--eval-limit must be positive, got {n} for {suite}")
    return {s: per_suite.get(s) for s in suites}


def compare_methods(
    prompt: str | Path,
    *,
    methods: list[str],
    teacher_modes: list[str],
    seeds: int = 3,
    suites: list[str] | None = None,
    eval_limit: int | dict[str, int] | None = 200,
    eval_batch_size: int = 16,
    data: str | Path | None = None,
    out: str | Path | None = None,
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> dict:
    """Compile, verify and evaluate every variant for `seeds` seeds; write compare.json and compare.md to `out`."""
    from promptbake.atomic import write_text_atomic
    from promptbake.bake import compile_prompt
    from promptbake.evals import run_eval
    from promptbake.plan import plan_compile
    from promptbake.verify import verify_adapters

    stage = on_message or (lambda _msg: None)
    if seeds <= 0:
        raise PromptbakeError(f"--seeds must be positive, got {seeds}")
    if eval_batch_size <= 0:
        raise PromptbakeError(f"--eval-batch-size must be positive, got {eval_batch_size}")
    todo = variants(methods, teacher_modes)
    suites = suites or []
    limits = suite_limits(eval_limit, suites)  # bad limits and unknown suites fail before hours of training
    overrides = dict(overrides or {})
    first = plan_compile(prompt, model=model, overrides=overrides)  # bad prompt/flags fail here, before any training
    out_dir = Path(out) if out else Path("build") / f"compare-{first.spec.name}"
    out_dir.mkdir(parents=True, exist_ok=True)

    runs: list[SeedRun] = []
    all_keys: list[str] = []  # build keys of every adapter, in run order: what the saved eval results belong to
    for seed in range(seeds):
        budget: int | None = None
        seed_runs: list[SeedRun] = []
        build_keys: list[str] = []
        for v in todo:
            settings = {**overrides, "method": v.method, "teacher_mode": v.teacher_mode, "seed": seed}
            if budget is not None:
                settings.update(token_budget=budget, steps=STEP_CAP * first.config.steps)
            adapter = out_dir / f"{v.name}-s{seed}"
            stage(f"seed {seed}: compiling {v.name}" + (f" (budget {budget:,} tokens)" if budget else ""))
            result = compile_prompt(prompt, out=adapter, model=model, overrides=settings, measure=False)
            summary = result.manifest.loss_summary
            tokens = int(summary.get("response_tokens", 0))
            if budget is None:
                budget = tokens
            build_keys.append(result.manifest.build_key)
            seed_runs.append(SeedRun(
                variant=v.name, method=v.method, teacher_mode=v.teacher_mode, seed=seed, adapter=str(adapter),
                steps=int(summary.get("steps", 0)), tokens_trained=tokens, token_budget=settings.get("token_budget"),
            ))

        def verify_seed(seed_runs: list[SeedRun] = seed_runs, seed: int = seed) -> dict:
            stage(f"seed {seed}: verifying {len(seed_runs)} adapters on the same held-out queries")
            reports = verify_adapters([r.adapter for r in seed_runs])
            return {r.adapter: {"metrics": {k: rep.metrics[k].value for k in VERIFY_METRICS if k in rep.metrics},
                                "checks": {c: {cond: est.value for cond, est in by.items()} for c, by in rep.checks.items()}}
                    for r, rep in zip(seed_runs, reports)}

        verified = _saved(out_dir / f"verify-s{seed}.json", {"adapters": build_keys}, verify_seed,
                          lambda: stage(f"seed {seed}: verify results reused from {out_dir / f'verify-s{seed}.json'}"))
        for r in seed_runs:
            r.metrics, r.checks = verified[r.adapter]["metrics"], verified[r.adapter]["checks"]
        runs += seed_runs
        all_keys += build_keys

    reference: dict[str, dict[str, dict[str, float]]] = {}
    for suite in suites:
        def evaluate(suite: str = suite) -> dict:
            stage(f"evaluating {suite} on base, prompted and {len(runs)} adapters")
            return run_eval(suite, [r.adapter for r in runs], data=data, limit=limits[suite], prompt=prompt,
                            batch_size=eval_batch_size)

        key = {"adapters": all_keys, "limit": limits[suite], "data": str(data), "batch_size": eval_batch_size}
        result = _saved(out_dir / f"eval-{suite}.json", key, evaluate,
                        lambda: stage(f"{suite} results reused from {out_dir / f'eval-{suite}.json'}"))
        by_path = {path: name for name, path in result["adapters"].items()}
        for r in runs:
            r.evals[suite] = _headline(result["results"][by_path[r.adapter]])
        for cond in ("base", "prompted"):
            reference.setdefault(cond, {})[suite] = _headline(result["results"][cond])

    table = aggregate(runs, reference)
    md = markdown(table, seeds)
    summary = {
        "prompt": str(prompt), "seeds": seeds, "variants": [v.name for v in todo], "suites": suites,
        "eval_limit": limits, "runs": [asdict(r) for r in runs],
        "table": {name: {k: e.to_dict() for k, e in row.items()} for name, row in table.items()},
        "markdown": md,
    }
    write_text_atomic(out_dir / "compare.json", json.dumps(summary, indent=2))
    write_text_atomic(out_dir / "compare.md", md + "\n")
    return summary


def _saved(path: Path, key: dict, compute: Callable[[], Any], on_reuse: Callable[[], None]) -> Any:
    """compute()'s result, kept in `path` under `key`: a rerun after an interruption reuses what finished."""
    from promptbake.atomic import write_text_atomic

    key = json.loads(json.dumps(key))  # what it reads back as
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") == key:
            on_reuse()
            return saved["value"]
    value = compute()
    write_text_atomic(path, json.dumps({"key": key, "value": value}))
    return value


def _headline(result: dict) -> dict[str, float]:
    return {k: v["value"] for k, v in result["metrics"].items() if k in EVAL_METRICS}
