"""Running a suite: greedy answers of base, prompted and each adapter on one runtime, scored side by side."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from promptbake.errors import PromptbakeError
from promptbake.evals.scoring import markdown_table, score
from promptbake.evals.suites import load_items, load_suite


def run_eval(
    suite_name: str,
    adapters: list[str | Path],
    *,
    data: str | Path | None = None,
    limit: int | None = None,
    conditions: list[str] | None = None,
    prompt: str | Path | None = None,
    model: str | None = None,
    seed: int = 0,
    groups: Literal["all", "train", "test"] = "all",
    batch_size: int = 16,
    on_condition=None,
    resume: str | Path | None = None,
    precision: str | None = None,
) -> dict:
    """Greedy answers of each condition (base, prompted, each adapter) to the suite, scored side by side.

    `resume`: a folder that keeps each finished condition's answers, so an interrupted eval (a 1,000-question
    suite takes hours on a CPU) starts again at the first unfinished condition. An entry is used only when
    everything that decides its answers is the same: items, decoding settings, weights, prompt or adapter.
    `precision` (auto, bf16, fp32): decode in it instead of the first adapter's recorded precision."""
    from promptbake.config import PRECISIONS

    if precision is not None and precision not in PRECISIONS:  # before the heavy imports: a typo fails at once
        choices = ", ".join(PRECISIONS[:-1]) + f" or {PRECISIONS[-1]}"
        raise PromptbakeError(f"--precision must be {choices}, got {precision!r}")

    from promptbake.artifact import read_manifest
    from promptbake.measure import decode_all, generate_ids
    from promptbake.models import manifest_base_dir, resolve_model
    from promptbake.runtime import load_runtime
    from promptbake.spec import load_spec
    suite = load_suite(suite_name)
    items = load_items(suite, data, limit, seed, groups)
    manifests = [read_manifest(a) for a in adapters]
    bases = {m.base_weights_sha256 for m in manifests}
    if len(bases) > 1:
        raise PromptbakeError("adapters were baked on different base models; evaluate them separately")
    names = [m.name for m in manifests]
    if len(set(names)) != len(names):
        names = [f"{m.name}@{Path(a).name}" for m, a in zip(manifests, adapters)]
    # The prompted baseline: --prompt for all; else each adapter's own prompt ("prompted" when they share one,
    # "prompted:<adapter>" per distinct prompt when they differ, so every adapter meets its own baseline).
    prompt_of: dict[str, str] = {}   # prompted condition -> prompt file
    own: dict[str, str] = {}         # adapter condition -> its prompted condition
    if prompt is not None or not manifests:
        if prompt is not None:
            prompt_of["prompted"] = str(prompt)
        own = {n: "prompted" for n in names}
    else:
        first_with: dict[str, str] = {}  # prompt sha256 -> first adapter baked from it
        for n, m in zip(names, manifests):
            first_with.setdefault(m.prompt_sha256, n)
        for n, m in zip(names, manifests):
            cond = "prompted" if len(first_with) == 1 else f"prompted:{first_with[m.prompt_sha256]}"
            prompt_of.setdefault(cond, m.prompt_file)
            own[n] = cond
    default = ["base"] + [c for n in names for c in (own[n], n)] if manifests else ["base", "prompted"]
    default = list(dict.fromkeys(default))
    wanted = conditions or default
    known = ("base", "prompted", *prompt_of, *names)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise PromptbakeError(f"--conditions: unknown {unknown}; choose from {', '.join(dict.fromkeys(known))}")
    if "prompted" in wanted and "prompted" not in prompt_of:
        raise PromptbakeError("condition 'prompted' needs --prompt (or adapters baked from one prompt)")
    system_prompts = {c: load_spec(f).system_prompt for c, f in prompt_of.items() if c in wanted}

    model_dir = resolve_model(model) if model or not manifests else manifest_base_dir(manifests[0])
    runtime = load_runtime(model_dir, adapters=[(n, Path(a)) for n, a in zip(names, adapters)],
                           precision=precision or (manifests[0].precision if manifests else "auto"))
    tokenizer, model, engine = runtime.tokenizer, runtime.model, runtime.engine()
    student = runtime.renderer("-")
    queries = [[{"role": "user", "content": it.prompt}] for it in items]

    from promptbake.models import weights_sha256

    base_sha = manifests[0].base_weights_sha256 if manifests else weights_sha256(model_dir)
    identity = {"base": "base", **{c: hashlib.sha256(p.encode()).hexdigest() for c, p in system_prompts.items()},
                **{n: m.adapter_sha256 for n, m in zip(names, manifests)}}
    items_sha = hashlib.sha256(json.dumps([[it.prompt, it.options] for it in items]).encode()).hexdigest()
    ids: dict[str, list[list[int]]] = {}
    for cond in wanted:
        key = hashlib.sha256(json.dumps([suite.name, suite.max_new_tokens, batch_size, items_sha, base_sha, runtime.bf16,
                                         identity[cond]]).encode()).hexdigest()
        saved = Path(resume) / f"{hashlib.sha256(cond.encode()).hexdigest()[:16]}.json" if resume else None
        if saved is not None and saved.is_file():
            entry = json.loads(saved.read_text())
            if entry.get("key") == key:
                ids[cond] = entry["ids"]
                if on_condition:
                    on_condition(f"{cond} (answers kept from an earlier run)")
                continue
        if cond in system_prompts:
            teacher = runtime.renderer(system_prompts[cond])
            prompts = [teacher.teacher_ids(q) for q in queries]
        else:
            prompts = [student.student_ids(q) for q in queries]
        if cond in names:
            model.set_adapter(cond)
        ids[cond] = generate_ids(engine, tokenizer, prompts, adapter=cond in names,
                                 max_new_tokens=suite.max_new_tokens, batch_size=batch_size)
        if saved is not None:
            from promptbake.atomic import write_text_atomic

            write_text_atomic(saved, json.dumps({"condition": cond, "key": key, "ids": ids[cond]}) + "\n")
        if on_condition:
            on_condition(cond)
    responses = decode_all(tokenizer, ids)
    references = {c: own.get(c, "prompted") for c in wanted if c not in prompt_of}
    results = score(suite, items, responses, reference=references)
    return {
        "suite": suite.name,
        "task": suite.task,
        "n": len(items),
        "seed": seed,
        "limit": limit,
        "groups": groups,
        "precision": "bf16" if runtime.bf16 else "fp32",  # what the answers were decoded in
        "prompt_file": prompt_of.get("prompted"),
        "prompt_files": prompt_of,
        "adapters": {n: str(a) for n, a in zip(names, adapters)},
        "adapter_sha256": {n: m.adapter_sha256 for n, m in zip(names, manifests)},  # which bakes were measured
        "references": references,  # condition -> the prompted condition its answers are compared with
        "results": results,
        "markdown": markdown_table(suite, results),
        "examples": {c: responses[c][:3] for c in responses},
        "responses": responses,  # every answer, so a result can be audited or re-scored without decoding again
    }


def rescore(result_file: str | Path, data: str | Path | None = None) -> dict:
    """Score a saved eval result again from its stored answers, with today's parsers and metrics, and rewrite it
    (atomically). Nothing is decoded; the items are loaded again with the result's own suite, limit, seed and
    groups, and must line up with the stored answers."""
    from promptbake.atomic import write_text_atomic

    path = Path(result_file)
    try:
        result = json.loads(path.read_text())
        suite_name, limit, seed, groups = result["suite"], result["limit"], result["seed"], result["groups"]
        result["responses"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PromptbakeError(f"{path}: not a saved eval result ({type(e).__name__}: {e})") from None
    suite = load_suite(suite_name)
    items = load_items(suite, data, limit, seed, groups)
    lengths = {len(answers) for answers in result["responses"].values()}
    if lengths != {len(items)}:
        raise PromptbakeError(f"{path}: {', '.join(map(str, sorted(lengths)))} stored answers per condition but {len(items)} items; "
                              "was it made from other data?")
    references = result.get("references")
    if references is None:  # saved before results named them: each adapter meets the prompted condition named
        prompted = set(result.get("prompt_files") or {})  # after it, else the one shared "prompted"
        references = {c: next((p for p in prompted if p == f"prompted:{c}"), "prompted")
                      for c in result["responses"] if c not in prompted}
    result["results"] = score(suite, items, result["responses"], reference=references)
    result["markdown"] = markdown_table(suite, result["results"])
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return result
