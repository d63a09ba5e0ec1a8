"""`verify`: does a baked adapter still behave like its prompted baseline? A CI gate with exit codes.

On the manifest's held-out queries (or a given query file) it compares base (no prompt), teacher (prompt)
and baked (adapter, no prompt):
- reverse KL(baked || teacher) on the baked model's samples, forward KL(teacher || baked) on the teacher's,
  the same for the base, and the KL gap closed = 1 - KL(baked)/KL(base);
- greedy agreement with the teacher over the first N tokens: exact match and token-level agreement;
- each check's pass rate per condition and the baked/teacher ratio;
all with 95 % bootstrap intervals over queries. Thresholds come from the prompt's `verify:` block or flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


from promptbake.artifact import read_manifest, sha256_file
from promptbake.checks import check_outcomes
from promptbake.errors import PromptbakeError
from promptbake.measure import condition_ids, decode_all, kl_to_teacher
from promptbake.models import manifest_base_dir, weights_sha256
from promptbake.queries import load_queries
from promptbake.lengths import fraction, ids_hit_cap
from promptbake.rollout import eos_token_ids
from promptbake.rules import split_rules
from promptbake.runtime import load_runtime
from promptbake.spec import VerifyThresholds, load_spec
from promptbake.stats import Estimate, gap_closed_ci, mean_ci, ratio_of_means_ci


@dataclass
class RuleResult:
    """How well one rule of the prompt was learned, on the held-out queries that exercise it."""

    rule: str  # a rule id of promptbake.rules, 'off-topic', or a query tag
    text: str
    num_queries: int
    kl_gap_closed: Estimate
    reverse_kl_baked: Estimate
    checks_teacher: Estimate | None = None  # every applicable check passes, greedy
    checks_baked: Estimate | None = None

    def to_dict(self) -> dict:
        return {"rule": self.rule, "text": self.text, "num_queries": self.num_queries,
                **{k: getattr(self, k).to_dict() for k in ("kl_gap_closed", "reverse_kl_baked", "checks_teacher",
                                                           "checks_baked") if getattr(self, k) is not None}}


def rule_groups(queries: list) -> dict[str, list[int]]:
    """Query positions per rule: a query's `rule` when it has one, else each of its tags."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        for key in [q.rule] if q.rule else q.tags:
            groups.setdefault(key, []).append(i)
    return groups


def per_rule_results(queries: list, rule_texts: dict[str, str], baked, base,
                     checks_all: dict[str, list[float]] | None) -> list[RuleResult]:
    """Gap closed and check rates per rule, with bootstrap intervals over that rule's queries, worst first."""
    out = []
    for key, idx in rule_groups(queries).items():
        pick = lambda values: [values[i] for i in idx]  # noqa: E731
        result = RuleResult(
            key, rule_texts.get(key, "off-topic messages" if key == "off-topic" else f"queries tagged '{key}'"), len(idx),
            gap_closed_ci(pick(baked.per_query), pick(base.per_query), pick(baked.tokens), pick(base.tokens)),
            mean_ci(pick(baked.per_query)))
        if checks_all:
            result.checks_teacher = mean_ci(pick(checks_all["teacher"]))
            result.checks_baked = mean_ci(pick(checks_all["baked"]))
        out.append(result)
    return sorted(out, key=lambda r: (r.kl_gap_closed.value if r.kl_gap_closed.value == r.kl_gap_closed.value
                                      else float("inf"), r.rule))


@dataclass
class VerifyReport:
    adapter: str
    num_queries: int
    adapter_sha256: str = ""  # the bake measured, so a report never shows another bake's numbers
    metrics: dict[str, Estimate] = field(default_factory=dict)
    checks: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    check_ratios: dict[str, Estimate] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    samples: dict[str, list[str]] = field(default_factory=dict)
    response_cap: int = 0
    cap_hit: dict[str, float] = field(default_factory=dict)  # fraction of answers the cap cut, per measurement
    rules: list[RuleResult] = field(default_factory=list)  # per rule (or tag), worst KL gap closed first

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> str:
        return json.dumps({
            "adapter": self.adapter,
            "adapter_sha256": self.adapter_sha256,
            "num_queries": self.num_queries,
            "passed": self.passed,
            "failures": self.failures,
            "thresholds": self.thresholds,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "checks": {c: {k: v.to_dict() for k, v in d.items()} for c, d in self.checks.items()},
            "check_ratios": {k: v.to_dict() for k, v in self.check_ratios.items()},
            "response_cap": self.response_cap,
            "cap_hit": self.cap_hit,
            "rules": [r.to_dict() for r in self.rules],
            "samples": {k: v[:5] for k, v in self.samples.items()},
        }, indent=2)


def token_agreement(a: list[int], b: list[int], n: int) -> float:
    """Fraction of the first n positions where both sequences hold the same token (missing = disagree)."""
    width = min(n, max(len(a), len(b)))
    if width == 0:
        return 1.0
    return sum(1 for i in range(width) if i < len(a) and i < len(b) and a[i] == b[i]) / width


def apply_thresholds(report: VerifyReport, thresholds: VerifyThresholds) -> None:
    """Fill `report.failures` with each metric under its minimum (value and threshold named)."""
    limits = {k: v for k, v in thresholds.model_dump().items() if v is not None}
    report.thresholds = limits
    simple = {"min_kl_gap_closed": "kl_gap_closed", "min_exact_match": "exact_match", "min_token_agreement": "token_agreement"}
    for key, metric in simple.items():
        if key in limits and not report.metrics[metric].value >= limits[key]:
            report.failures.append(f"{metric} = {report.metrics[metric].value:.3f} < {key} {limits[key]}")
    if "max_length_change" in limits:
        ratio = report.metrics["length_ratio"].value
        if not abs(ratio - 1) <= limits["max_length_change"]:
            report.failures.append(f"length_ratio = {ratio:.3f}, more than max_length_change {limits['max_length_change']} "
                                   "from 1 (baked answers against the teacher's, mean tokens)")
    if "min_check_ratio" in limits:
        for name, ratio in report.check_ratios.items():
            if not ratio.value >= limits["min_check_ratio"]:
                report.failures.append(f"check '{name}' baked/teacher = {ratio.value:.3f} < min_check_ratio {limits['min_check_ratio']}")


def verify_adapter(adapter_dir: str | Path, **kwargs) -> VerifyReport:
    """Verify one adapter; see `verify_adapters` for the arguments."""
    return verify_adapters([adapter_dir], **kwargs)[0]


SHARED_MANIFEST_FIELDS = ("base_weights_sha256", "prompt_sha256", "teacher_model", "queries_sha256", "heldout_sha256",
                          "response_cap")
SHARED_CONFIG_KEYS = ("max_new_tokens", "temperature", "precision")


def verify_adapters(
    adapter_dirs: list[str | Path],
    *,
    prompt: str | Path | None = None,
    queries: str | Path | None = None,
    thresholds: dict[str, float | None] | None = None,
    allow_prompt_change: bool = False,
    limit: int | None = None,
    agreement_tokens: int = 32,
    max_new_tokens: int | None = None,
    seed: int = 1234,
) -> list[VerifyReport]:
    """One report per adapter, all on the same queries; the base and teacher are measured once for all of them.

    The adapters must share base weights, prompt, teacher, query file, sampling settings and (without
    `queries`) held-out ids: `compare` verifies every variant of one seed this way, so the base KLs, the
    teacher's samples and the greedy base/teacher answers are not recomputed per variant."""
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise PromptbakeError("verify: give at least one adapter folder")
    manifests = [read_manifest(d) for d in dirs]
    manifest = manifests[0]
    for d, m in zip(dirs[1:], manifests[1:]):
        for key in SHARED_MANIFEST_FIELDS:
            if getattr(m, key) != getattr(manifest, key):
                raise PromptbakeError(f"{d}: {key} differs from {dirs[0]}'s; verify these adapters separately")
        for key in SHARED_CONFIG_KEYS:
            if m.config.get(key) != manifest.config.get(key):
                raise PromptbakeError(f"{d}: train.{key} = {m.config.get(key)} differs from {dirs[0]}'s "
                                      f"{manifest.config.get(key)}; verify these adapters separately")
        if queries is None and m.heldout_ids != manifest.heldout_ids:
            raise PromptbakeError(f"{d}: held-out queries differ from {dirs[0]}'s (another seed?); "
                                  "verify separately or pass --queries")
    adapter_dir = dirs[0]
    spec = load_spec(prompt or manifest.prompt_file)
    if spec.prompt_sha256 != manifest.prompt_sha256 and not allow_prompt_change:
        raise PromptbakeError(
            f"{spec.path}: rendered prompt differs from the one {adapter_dir} was baked from "
            f"(sha256 {spec.prompt_sha256[:12]} vs {manifest.prompt_sha256[:12]}); rebake, or pass --allow-prompt-change"
        )
    if queries:
        query_list = load_queries(queries)
    else:
        source = manifest.heldout_file or manifest.queries_file
        if manifest.heldout_file and Path(source).is_file() and sha256_file(Path(source)) != manifest.heldout_sha256:
            raise PromptbakeError(f"{source}: held-out file changed since {adapter_dir} was baked; pass --queries {source} "
                                  "to measure on it as it is now")
        query_list = load_queries(source)
        by_id = {q.id: q for q in query_list}
        missing = [i for i in manifest.heldout_ids if i not in by_id]
        if missing:
            raise PromptbakeError(f"{source}: held-out ids {missing[:5]} from the manifest are not in the file")
        query_list = [by_id[i] for i in manifest.heldout_ids]
    if limit is not None:
        if limit <= 0:
            raise PromptbakeError(f"--limit must be positive, got {limit}")
        query_list = query_list[:limit]
    if not query_list:
        raise PromptbakeError(f"{adapter_dir}: no held-out queries to verify on; pass --queries")

    model_dir = manifest_base_dir(manifest)
    if weights_sha256(model_dir) != manifest.base_weights_sha256:
        raise PromptbakeError(f"{model_dir}: base weights differ from the ones {adapter_dir} was baked on (sha256 mismatch)")
    names = [f"adapter{i}" for i in range(len(dirs))]
    runtime = load_runtime(model_dir, adapters=list(zip(names, dirs)), precision=manifest.precision)
    tokenizer, model, bf16 = runtime.tokenizer, runtime.model, runtime.bf16
    renderer = runtime.renderer(spec.system_prompt)
    configured = manifest.config.get("max_new_tokens", 48)
    new_tokens = max_new_tokens or manifest.response_cap or (configured if isinstance(configured, int) else 48)
    teacher = runtime.teacher(renderer, manifest.teacher_model)
    teacher.prepare(query_list, new_tokens, str(queries or manifest.heldout_file or manifest.queries_file))
    engine = runtime.engine()
    temperature = float(manifest.config.get("temperature", 1.0))
    kw = dict(max_new_tokens=new_tokens, temperature=temperature, seed=seed, bf16=bf16)

    kl = {name: kl_to_teacher(model, engine, teacher, renderer, tokenizer, query_list, adapter=False,
                              on_teacher_samples=on_teacher, **kw)
          for name, on_teacher in [("reverse_kl_base", False), ("forward_kl_base", True)]}
    shared_ids = condition_ids(engine, tokenizer, renderer, query_list, max_new_tokens=max(new_tokens, agreement_tokens),
                               conditions=("base", "teacher"))
    base_agree = [token_agreement(b, t, agreement_tokens) for b, t in zip(shared_ids["base"], shared_ids["teacher"])]
    eos_ids = eos_token_ids(tokenizer)
    decode_cap = max(new_tokens, agreement_tokens)
    rule_texts = {rule.id: rule.text for rule in split_rules(spec.system_prompt)}
    merged = spec.verify.model_copy(update={k: v for k, v in (thresholds or {}).items() if v is not None})

    reports = []
    for d, name, m in zip(dirs, names, manifests):
        model.set_adapter(name)
        report = VerifyReport(str(d), len(query_list), m.adapter_sha256, response_cap=new_tokens)
        for key, on_teacher in [("reverse_kl_baked", False), ("forward_kl_baked", True)]:
            kl[key] = kl_to_teacher(model, engine, teacher, renderer, tokenizer, query_list, adapter=True,
                                    on_teacher_samples=on_teacher, **kw)
        for key in ("reverse_kl_baked", "reverse_kl_base", "forward_kl_baked", "forward_kl_base"):
            report.metrics[key] = mean_ci(kl[key].per_query)
        for direction, gap in (("reverse", "kl_gap_closed"), ("forward", "forward_kl_gap_closed")):
            baked, base = kl[f"{direction}_kl_baked"], kl[f"{direction}_kl_base"]
            report.metrics[gap] = gap_closed_ci(baked.per_query, base.per_query, baked.tokens, base.tokens)
        # Answer lengths of the sampled answers (up to the cap): the teacher's are its forward-KL samples. A missed
        # stop costs the per-token KL once per position, so a bake can close most of the gap and still run long.
        teacher_tokens = kl["forward_kl_base"].tokens
        for cond, tokens in (("teacher", teacher_tokens), ("base", kl["reverse_kl_base"].tokens),
                             ("baked", kl["reverse_kl_baked"].tokens)):
            report.metrics[f"answer_tokens_{cond}"] = mean_ci(tokens)
        report.metrics["length_ratio"] = ratio_of_means_ci(kl["reverse_kl_baked"].tokens, teacher_tokens)

        ids = {**shared_ids, **condition_ids(engine, tokenizer, renderer, query_list,
                                             max_new_tokens=max(new_tokens, agreement_tokens), conditions=("baked",))}
        exact = [float(b[:agreement_tokens] == t[:agreement_tokens]) for b, t in zip(ids["baked"], ids["teacher"])]
        agree = [token_agreement(b, t, agreement_tokens) for b, t in zip(ids["baked"], ids["teacher"])]
        report.metrics["exact_match"] = mean_ci(exact)
        report.metrics["token_agreement"] = mean_ci(agree)
        report.metrics["token_agreement_base"] = mean_ci(base_agree)

        report.cap_hit = {**{f"samples_{key}": kl[key].capped_fraction for key in sorted(kl)},
                          **{f"greedy_{cond}": fraction(ids_hit_cap(rows, decode_cap, eos_ids)) for cond, rows in ids.items()}}
        texts = decode_all(tokenizer, ids)
        report.samples = texts
        outcomes = {cond: check_outcomes(spec.checks, texts[cond], [q.tags for q in query_list]) for cond in texts}
        for check in spec.checks:
            passed = {cond: outcomes[cond][check.name] for cond in texts}
            if not passed["baked"]:
                continue  # no query carries this check's tags
            report.checks[check.name] = {cond: mean_ci(v) for cond, v in passed.items()}
            report.check_ratios[check.name] = ratio_of_means_ci(passed["baked"], passed["teacher"])
        checks_all = {cond: outcomes[cond]["all"] for cond in ("teacher", "baked")} if spec.checks else None
        report.rules = per_rule_results(query_list, rule_texts, kl["reverse_kl_baked"], kl["reverse_kl_base"],
                                        checks_all)
        apply_thresholds(report, merged)
        reports.append(report)
    return reports
