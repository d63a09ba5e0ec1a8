"""`compile_prompt`: prompt file + queries -> baked LoRA adapter. The CLI's `compile` is a thin wrapper.

Reads top to bottom as the stages of a compile: parse and validate everything (fail before any work),
load the model once, measure held-out KL, train, measure again, compare checks, write the artifact.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError

from promptbake.artifact import BakeManifest, check_output_free, sha256_file, write_artifact
from promptbake.chat import ChatRenderer
from promptbake.config import BakeConfig
from promptbake.errors import PromptbakeError
from promptbake.measure import check_rates, condition_ids, decode_all, kl_to_teacher
from promptbake.models import (
    DEFAULT_MODEL, check_same_tokenizer, load_model, load_tokenizer, resolve_model, weights_sha256,
)
from promptbake.queries import Query, load_queries, split_queries
from promptbake.spec import PromptSpec, load_spec
from promptbake.rollout import HFRolloutEngine
from promptbake.teacher import PromptedTeacher
from promptbake.train import StepLog, TrainResult, train_opcd


@dataclass
class BakeResult:
    out_dir: Path
    manifest: BakeManifest
    train: TrainResult
    responses: dict[str, list[str]]


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast only where it is fast: CUDA with bf16, or CPUs with AMX/AVX-512."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


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


def make_student(base_model, config: BakeConfig):
    """Base + fresh LoRA (no modules_to_save, so vLLM can serve it)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in base_model.named_modules()}
    missing = [t for t in config.lora_targets if t not in present]
    if missing:
        raise PromptbakeError(f"train.lora_targets: modules {missing} do not exist in this model")
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets), task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(base_model, lora)


def prepare(
    prompt: str | Path,
    *,
    queries: str | Path | None = None,
    model: str | None = None,
    teacher: str | None = None,
    overrides: dict[str, Any] | None = None,
    variables: dict[str, str] | None = None,
) -> tuple[PromptSpec, BakeConfig, list[Query], Path]:
    """Parse and validate the inputs of a compile without loading any model."""
    spec = load_spec(prompt, variables)
    try:
        config = BakeConfig().merged(spec.train).merged({**(overrides or {}), "teacher": teacher})
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise PromptbakeError(f"invalid setting{f' {key!r}' if key else ''}: {first['msg']}") from None
    queries_path = Path(queries) if queries else spec.queries_path
    if queries_path is None:
        raise PromptbakeError(f"{spec.path}: no queries: set 'queries:' in the front matter or pass --queries")
    loaded = load_queries(queries_path)
    train_count = len(loaded) - min(config.heldout, len(loaded))
    if train_count < config.batch_size:
        raise PromptbakeError(
            f"{queries_path}: {len(loaded)} queries leave {train_count} for training after {config.heldout} held out; "
            f"a batch needs {config.batch_size}"
        )
    return spec, config, loaded, queries_path


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
    trust_pickle: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> BakeResult:
    """Bake a prompt file into a LoRA adapter with OPCD. Raises PromptbakeError on bad input."""
    stage = on_stage or (lambda _msg: None)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    # 1. Inputs: everything a user can get wrong is checked before the model loads.
    spec, config, all_queries, queries_path = prepare(
        prompt, queries=queries, model=model, teacher=teacher, overrides=overrides, variables=variables
    )
    out_dir = Path(out) if out else Path("build") / spec.name
    check_output_free(out_dir, force)
    train_queries, heldout_queries = split_queries(all_queries, config.heldout, config.seed)
    model_name = model or spec.model or DEFAULT_MODEL

    # 2. Models: one copy of the base weights serves as student (with LoRA) and teacher (LoRA off).
    stage(f"loading {model_name}")
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model_dir = resolve_model(model_name, trust_pickle)
    tokenizer = load_tokenizer(model_dir)
    vocab = len(tokenizer)
    if config.kl == "topk" and config.topk > vocab:
        raise PromptbakeError(f"train.topk={config.topk} is larger than the vocabulary ({vocab} tokens)")
    base = load_model(model_dir, trust_pickle)
    max_context = int(getattr(base.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        renderer = ChatRenderer.for_tokenizer(tokenizer, spec.system_prompt, max_context)
    for w in caught:
        stage(f"warning: {w.message}")
    student = make_student(base, config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student.to(device)
    bf16 = use_bf16(config.precision, device)
    if config.teacher:
        teacher_dir = resolve_model(config.teacher, trust_pickle)
        check_same_tokenizer(tokenizer, load_tokenizer(teacher_dir), config.teacher)
        teacher_model = load_model(teacher_dir, trust_pickle).to(device)
        teacher = PromptedTeacher(teacher_model, renderer, tokenizer.pad_token_id, is_student=False, bf16=bf16,
                                  prefix_cache=config.prefix_cache)
    else:
        teacher = PromptedTeacher(student, renderer, tokenizer.pad_token_id, is_student=True, bf16=bf16,
                                  prefix_cache=config.prefix_cache)
    engine = HFRolloutEngine(student, bf16=bf16)
    teacher.prepare(all_queries, max(config.max_new_tokens, config.eval_max_new_tokens), str(queries_path))
    timings["load_s"] = time.perf_counter() - t_start

    # 3. Held-out KL before training (adapter is zero-initialised, so this is the base model).
    measure_kw = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed + 1, bf16=bf16,
                      batch_size=config.batch_size * config.rollouts)
    kl_before = None
    if heldout_queries:
        stage(f"measuring held-out KL on {len(heldout_queries)} queries")
        t = time.perf_counter()
        kl_before = kl_to_teacher(student, engine, teacher, renderer, tokenizer, heldout_queries, adapter=True, **measure_kw).mean
        timings["measure_before_s"] = time.perf_counter() - t

    # 4. Train.
    stage(f"training {config.steps} steps")
    with tempfile.TemporaryDirectory(prefix="promptbake-") as tmp:
        log_path = Path(tmp) / "train_log.jsonl"
        result = train_opcd(student, teacher, renderer, tokenizer, train_queries, config, bf16=bf16,
                            engine=engine, log_path=log_path, on_step=on_step)
        timings["train_s"] = result.seconds

        # 5. Measure again and compare checks on held-out queries.
        kl_after, responses, rates = None, {}, {}
        if heldout_queries:
            stage("measuring held-out KL and checks after training")
            t = time.perf_counter()
            kl_after = kl_to_teacher(student, engine, teacher, renderer, tokenizer, heldout_queries, adapter=True, **measure_kw).mean
            responses = decode_all(tokenizer, condition_ids(engine, tokenizer, renderer, heldout_queries,
                                                            max_new_tokens=config.eval_max_new_tokens))
            rates = check_rates(spec.checks, responses)
            timings["measure_after_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start

        # 6. Artifact.
        manifest = BakeManifest(
            name=spec.name,
            description=spec.description,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            prompt_file=str(spec.path),
            prompt_file_sha256=spec.file_sha256,
            prompt_sha256=spec.prompt_sha256,
            prompt_tokens=len(tokenizer(spec.system_prompt, add_special_tokens=False)["input_ids"]),
            base_model=model_name,
            base_model_path=str(model_dir),
            base_weights_sha256=weights_sha256(model_dir),
            tokenizer_sha256=tokenizer_sha256(tokenizer),
            teacher_model=config.teacher,
            queries_file=str(queries_path),
            queries_sha256=sha256_file(queries_path),
            num_queries=len(all_queries),
            heldout_ids=[q.id for q in heldout_queries],
            config=config.model_dump(),
            seed=config.seed,
            precision="bf16" if bf16 else "fp32",
            heldout_kl_before=kl_before,
            heldout_kl_after=kl_after,
            check_rates=rates,
            loss_summary=result.summary(),
            timings={k: round(v, 3) for k, v in timings.items()},
            versions=package_versions(),
        )
        write_artifact(out_dir, student, manifest, log_path, force)
    return BakeResult(out_dir, manifest, result, responses)
