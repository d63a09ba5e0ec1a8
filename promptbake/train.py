"""The OPCD training loop: the student samples, the prompted teacher scores, the student minimises reverse KL.

One step:
    1. sample `batch_size` train queries, `rollouts` responses each, from the student without the prompt;
    2. in micro-batches of similar length: the teacher scores those exact tokens with the prompt (adapter off,
       prefix cache; consecutive micro-batches in one call while their logits fit `TEACHER_SCORING_BYTES`):
       full-vocabulary logits, or with kl=sampled only the sampled tokens' log-probs; student
       logits with gradient; per-token reverse KL summed and divided by the valid response tokens of the whole
       batch, so the accumulated gradient is that of the batch mean;
    3. clip the gradient norm, AdamW step, refresh the rollout engine's weights. With `updates_per_batch` k > 1
       the batch's rows are split into k parts and 2-3 run once per part: k optimizer updates from one round of
       sampling and teacher scoring (the later parts' samples are then a few updates old). A step whose gradient is not
       finite while its loss is (a NaN from an attention kernel's backward, say) is skipped, not applied: one
       such step must not poison the adapter and Adam's moments; several in a row stop the compile.
    4. with `ema_decay`, fold the new weights into their moving average; after the last step the average replaces
       the weights (promptbake.averaging).
The loop goes through `accelerate`, so `accelerate launch` runs it data-parallel without changes: each
process draws its own queries and gradients are averaged. The same loop trains the off-policy baselines
(promptbake.losses.OFF_POLICY) on the teacher's fixed samples; the log names the objective of each number.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch._functorch.config  # the partitioner's activation budget (config.activation_memory_budget)
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from promptbake.chat import ChatRenderer
from promptbake.averaging import WeightAverage
from promptbake.checkpoint import (Checkpointing, python_rng_from_json, python_rng_to_json, restore, save_checkpoint,
                                   trainable)
from promptbake.compile_cache import cache_is_warm, compile_key, remember_compiled
from promptbake.fastdecode import shared_prefix
from promptbake.faults import fault_point, fault_requested
from promptbake.hidden import (common_suffix_length, dimension_scales, hidden_distance, layer_increments, query_states,
                               recorded_layer_outputs, response_states)
from promptbake.config import BakeConfig
from promptbake.errors import PromptbakeError
from promptbake.lengths import hit_cap
from promptbake.losses import (compiled_loss, distill_loss, future_divergence_surrogate, loss_compiles, stop_kl,
                               token_loss, token_weights)
from promptbake.memory import release_free_memory
from promptbake.queries import Query
from promptbake.rollout import (
    HFRolloutEngine,
    Rollout,
    autocast,
    compiled_decoding,
    eos_token_ids,
    packs_rows,
    response_logits,
    rollout_from_lists,
    trainable_prefix,
)
from promptbake.teacher import PromptedTeacher


@dataclass
class StepLog:
    step: int
    kl: float
    grad_norm: float
    lr: float
    response_tokens: int
    mean_response_len: float
    seconds: float
    sample_seconds: float
    teacher_seconds: float
    student_seconds: float
    tokens_per_s: float
    rows: int = 0
    capped_rows: int = 0  # rollouts cut by max_new_tokens before their end-of-turn token
    loss: str = "reverse_kl_full"  # what `kl` holds: the objective's name (cross_entropy for sft, ...)
    skipped: bool = False  # the gradient was not finite: (one of) this step's update(s) was not applied
    updates: int = 1  # optimizer updates made from this step's rollouts (updates_per_batch)
    hidden_distance: float | None = None  # hidden_match_weight: the layers' mean cosine distance to the teacher's
    on_teacher_samples: bool = False  # trained on the teacher's answers (offpolicy, sft, opcd's teacher_sample_steps)
    prompt_ce: float | None = None  # prompt_lm_weight: the student's next-token cross-entropy on the prompt's text
    stop_kl: float | None = None  # stop_kl_weight: the mean two-outcome KL of ending the answer at each token

    def to_json(self) -> str:
        # a non-finite number (the gradient norm of a skipped step) is written as null: the log stays strict JSON
        return json.dumps({k: (round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v
                           for k, v in self.__dict__.items()})


@dataclass
class TrainResult:
    log: list[StepLog] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1

    def summary(self) -> dict:
        if not self.log:
            return {}
        kls = [s.kl for s in self.log]
        n = max(1, len(kls) // 5)
        own = [s for s in self.log if not s.on_teacher_samples] or self.log
        return {
            "steps": len(self.log),
            "kl_first": kls[0],
            "kl_last": kls[-1],
            "kl_first_fifth_mean": sum(kls[:n]) / n,
            "kl_last_fifth_mean": sum(kls[-n:]) / n,
            "seconds": self.seconds,
            "median_step_seconds": sorted(s.seconds for s in self.log)[len(self.log) // 2],
            "response_tokens": sum(s.response_tokens for s in self.log),
            # The student's rollouts (the teacher's answers where it sampled none: offpolicy, sft).
            "rollouts": sum(s.rows for s in own),
            "rollouts_capped": sum(s.capped_rows for s in own),
            "skipped_steps": [s.step for s in self.log if s.skipped],
            "tokens_per_s": sum(s.response_tokens for s in self.log) / max(self.seconds, 1e-9),
            "processes": self.processes,
        }


# Optimizer updates in a row with a non-finite gradient before the compile stops: one is a kernel's bad moment (seen on CUDA
# at a finite loss), several mean the training itself diverged.
MAX_NONFINITE_UPDATES = 3
# The wsd schedule's decay: the last fifth of the steps, a common choice for warm-up-stable-decay schedules.
WSD_DECAY_FRACTION = 0.2


def repeated_blocks(model) -> list[torch.nn.Module]:
    """The model's decoder layers: the module classes transformers lists as never split across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


@contextlib.contextmanager
def compiled_blocks(model, enabled: bool):
    """`torch.compile` each decoder layer while training, eager again afterwards.

    Regional compilation: the layers share their code, so one compile (dynamic shapes, so varying sequence
    lengths do not recompile) serves all of them. It fuses the small element-wise ops around the matmuls
    (norms, rotary, LoRA scaling, casts) that dominate a small model's step on a CPU. Anything else that runs
    through these layers during training (teacher scoring, sampling without the merged copy) is kept eager
    with `eager_only()`, so the compiled code sees one kind of call only.
    """
    blocks = repeated_blocks(model) if enabled else []
    for block in blocks:
        block.compile(dynamic=True)
    try:
        yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; None is eager again


# torch_compile unset turns on from this many steps: compiling the layers and the decode step costs about 1-2 minutes
# in step 1 and saved about 6 s per step at the faithful cap on a 2-core AVX-512 CPU in bf16; in fp32 on a 2-core AVX2
# CPU, about 2 minutes cold for 1.4x the tokens per second at that cap (docs/performance.md).
AUTO_COMPILE_MIN_STEPS = 40
# ... and from this many when torch's compile cache already holds the model's graphs (promptbake.compile_cache): step 1
# then cost 7-12 s more than eager at cap 64 (floats specialised, below), and 8 steps trained 1.04-1.21x faster
# compiled, 16 steps 1.06-1.27x (benchmarks/short_compile.py, docs/performance.md).
WARM_COMPILE_MIN_STEPS = 8


# Python floats in the compiled code (the LoRA scaling) are constants of a run. Traced as symbols (torch's default),
# each graph was traced twice: the first attempt ends in a restart that specialises them, about 4-5 s per graph on a
# 2-core CPU even with a warm compile cache (benchmarks/short_compile.py, docs/performance.md).
SPECIALIZE_FLOATS = True


def use_torch_compile(config: BakeConfig, bf16: bool, device: torch.device, model=None) -> bool:
    """`torch_compile` as set; unset, on only where it was measured to pay: a CPU (bf16 where it has bf16
    instructions; fp32 elsewhere, where the decode step compiles through the policy), a C++ compiler for inductor,
    and a run long enough to repay compiling: 40 steps, or 8 when an earlier run compiled the same `model`'s graphs
    into a cache still in place.
    GPUs were not measured, so they stay eager unless asked."""
    if config.torch_compile is not None:
        return config.torch_compile
    compiler = shutil.which(os.environ.get("CXX") or "g++") or shutil.which("clang++")
    if device.type != "cpu" or compiler is None or config.steps < WARM_COMPILE_MIN_STEPS:
        return False
    if config.steps >= AUTO_COMPILE_MIN_STEPS:
        return True
    key = run_compile_key(model, bf16, config)
    return key is not None and cache_is_warm(key)


def run_compile_key(model, bf16: bool, config: BakeConfig) -> str | None:
    """The compile cache's key for training `model` under `config` (None for a model without a config); where the
    decode step compiles through the policy (fp32, `rollout.compiles_policy_decoding`) it holds the response cap too
    (promptbake.compile_cache says why), and whether that step's linears run weight first (another graph). The
    layers' activation budget changes their backward graphs, so one other than torch's default is in it too."""
    from promptbake import fastdecode
    from promptbake.rollout import compiles_policy_decoding

    model_config = getattr(model, "config", None)
    cap, key_cap = config.max_new_tokens, None
    if isinstance(cap, int) and compiles_policy_decoding(bf16):
        key_cap = f"{cap}+weight-first" if fastdecode.WEIGHT_FIRST_LINEARS else cap
    if model_config is None:
        return None
    return compile_key(model_config, bf16, key_cap, activation_budget=config.activation_memory_budget)


# The student's rows of an update share their first tokens (SmolLM2's chat template adds the same 24-token system
# turn to every query: over a quarter of a row at the 48-token cap). Their forward and backward run once per update
# (`rollout.TrainablePrefix`), not once per row. One process only: under DDP its backward would come after the
# gradients were synced. Not with gradient checkpointing either: transformers then fills no cache.
SHARE_STUDENT_PREFIX = True

# Each step's batch comes from a seeded order of the training queries per epoch (`step_queries`); False: each step
# draws its own batch at random, so after 8 steps of 16 from 196 queries about 97 distinct ones were trained on, not 128.
QUERY_EPOCHS = True


def eager_only(enabled: bool):
    return torch.compiler.set_stance("force_eager") if enabled else contextlib.nullcontext()


@contextlib.contextmanager
def recomputed_activations(model):
    """Activation checkpointing of the decoder layers while training (non-reentrant: no input needs a gradient,
    and it composes with DDP); switched off again afterwards."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()


def lr_factor(step_index: int, config: BakeConfig) -> float:
    """Learning-rate multiplier of the optimizer step `step_index` (0-based): linear warm-up, then constant,
    cosine decay over the whole run, or (wsd) constant and a linear decay over the last fifth of the run, which
    keeps 90 % of the constant schedule's total learning rate where cosine keeps half."""
    warm = min(1.0, (step_index + 1) / max(1, config.warmup_steps))
    if config.lr_schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * step_index / config.steps))
    if config.lr_schedule == "wsd":
        decay_steps = max(1, round(config.steps * WSD_DECAY_FRACTION))
        return warm * min(1.0, (config.steps - step_index) / (decay_steps + 1))
    return warm


def _summed_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits_NV.float(), targets_N, reduction="sum")


def prompt_text_loss(model, ids_1P: torch.Tensor, bf16: bool, chunk_tokens: int = 256) -> torch.Tensor:
    """prompt_lm_weight's term: the student's mean next-token cross-entropy reading the system prompt as plain text.

    A long prompt's fp32 logits are large (1,600 tokens x 49k vocabulary: 0.3 GiB per copy), so past `chunk_tokens`
    the cross-entropy runs over chunks whose fp32 copies are recomputed in the backward pass instead of kept; the
    value and gradient are those of the whole."""
    device = ids_1P.device
    with autocast(device, bf16):
        logits_1PV = model(input_ids=ids_1P, use_cache=False).logits  # no cache: the compiled layers see the training call
    logits_NV, targets_N = logits_1PV[0, :-1], ids_1P[0, 1:]
    n = targets_N.shape[0]
    if n <= chunk_tokens:
        return _summed_cross_entropy(logits_NV, targets_N) / n
    from torch.utils.checkpoint import checkpoint

    total = sum(checkpoint(_summed_cross_entropy, logits_NV[s:s + chunk_tokens], targets_N[s:s + chunk_tokens],
                           use_reentrant=False) for s in range(0, n, chunk_tokens))
    return total / n


def step_queries(queries: list, batch_size: int, seed: int, step: int) -> list:
    """The global batch of `step` (from 1): each epoch puts the training queries in a fresh seeded order and cuts it
    into batches, so every query is trained on once before any is trained on twice (an epoch's last
    len(queries) % batch_size wait for the next order). A function of the step alone, so a resumed or continued
    compile draws what an uninterrupted one would."""
    per_epoch = len(queries) // batch_size
    epoch, index = divmod(step - 1, per_epoch)
    order = list(range(len(queries)))
    random.Random(f"promptbake-queries-{seed}-{epoch}").shuffle(order)
    return [queries[i] for i in order[index * batch_size:(index + 1) * batch_size]]


def update_parts(rows: int, updates: int) -> list[list[int]]:
    """The rows of one process's rollouts split into `updates` consecutive parts of near-equal size, one optimizer
    update each. The batch is drawn at random, so consecutive parts are random parts. Each process holds every
    `world`-th query of the global batch, so when its rows divide evenly into the parts, the processes' k-th parts
    together are the k-th part a single process would train on."""
    return [list(range(i * rows // updates, (i + 1) * rows // updates)) for i in range(updates)]


def micro_batches(lengths: list[int], size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Row indices grouped by similar total length, so little compute goes to padding: at most `size` rows per
    group, and (`max_tokens`) at most that many tokens, rows x the group's longest row, one row at the least."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < size and (max_tokens is None or (len(groups[-1]) + 1) * lengths[i] <= max_tokens):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# Teacher scoring runs eager, and two rows a call left much of its time to per-call overhead; so consecutive
# micro-batches are scored in one call while their logits fit this many bytes (one micro-batch at the least).
# 64 MiB is four rows of 128 tokens at a 49k vocabulary in bf16 (benchmarks/train_step.py, docs/performance.md).
TEACHER_SCORING_BYTES = 64 * 2**20


def teacher_spans(group_rows: list[int], group_widths: list[int], vocab: int, value_bytes: int) -> list[list[int]]:
    """Consecutive micro-batch indices, each list scored by one teacher call: as many micro-batches as keep the
    call's logits (rows x widest response x vocab) within TEACHER_SCORING_BYTES, and at least one."""
    spans: list[list[int]] = []
    for index, (rows, width) in enumerate(zip(group_rows, group_widths)):
        if spans:
            span = spans[-1]
            together = (sum(group_rows[j] for j in span) + rows) * max(width, *(group_widths[j] for j in span))
            if together * vocab * value_bytes <= TEACHER_SCORING_BYTES:
                span.append(index)
                continue
        spans.append([index])
    return spans


@dataclass
class TeacherTargets:
    """What the teacher gives one micro-batch: logits_BTV or logp_BT (`out`), and with the layers' term its states
    at the response (states_LBTD) and at the user turn (query_LBQD, query_mask_BQ, the rows' `suffix` lengths)."""

    out: torch.Tensor | None
    states_LBTD: torch.Tensor | None = None
    query_LBQD: torch.Tensor | None = None
    query_mask_BQ: torch.Tensor | None = None
    suffix: list[int] | None = None


def score_teacher(teacher, row_groups: list[list[int]], widths: list[int], rollout: Rollout, batch: list[Query],
                  prompts: list[list[int]], *, teacher_input: str, temperature: float, blocks: list, matched: Callable,
                  match_hidden: bool, match_query: bool, compiling: bool) -> list[TeacherTargets]:
    """One teacher call over the rows of several micro-batches (each `widths` response tokens wide), split back into
    each micro-batch's targets. Each row's targets are its own whatever it is scored with: responses are right-padded
    and prompts end where the responses begin, so a micro-batch takes its rows, its response width and its last
    query columns."""
    rows = [r for group in row_groups for r in group]
    together, queries = rollout.select(rows), [batch[r] for r in rows]
    T = together.response_ids_BT.shape[1]
    with eager_only(compiling), recorded_layer_outputs(blocks) as layers:
        if teacher_input == "logits":
            out = teacher.logits(queries, together, left_padded=match_hidden)  # logits_BTV
        elif teacher_input == "sampled_logprobs":
            out = teacher.sampled_logprobs(queries, together, temperature)  # logp_BT
        else:
            out = None
    states_LBTD = matched(response_states(layers, len(blocks), T)) if match_hidden else None
    if match_query:  # the user turn both prompts end with, as far as the teacher's pass reads
        suffix = [min(common_suffix_length(prompts[r], teacher.prompt_ids(q)), n)
                  for r, q, n in zip(rows, queries, teacher.scored_prompt_lengths(queries))]
        query_LBQD, query_mask_BQ = query_states(layers, len(blocks), T, suffix)
        query_LBQD = matched(query_LBQD)
    del layers
    targets, start = [], 0
    for group, width in zip(row_groups, widths):
        b = slice(start, start + len(group))
        start += len(group)
        # Contiguous copies: the loss sees the layout it would have had alone, and the call's tensors can go.
        target = TeacherTargets(out[b, :width].contiguous() if out is not None else None,
                                states_LBTD[:, b, :width].contiguous() if states_LBTD is not None else None)
        if match_query:
            target.suffix = suffix[b]
            first_q = query_LBQD.shape[2] - max((max(n - 1, 0) for n in target.suffix), default=0)  # right-aligned
            target.query_LBQD = query_LBQD[:, b, first_q:].contiguous()
            target.query_mask_BQ = query_mask_BQ[b, first_q:].contiguous()
        targets.append(target)
    return targets


def refuse_sharded_muon(config: BakeConfig, distributed_type: DistributedType) -> None:
    """Muon orthogonalises each LoRA matrix whole; under FSDP a process holds a flat shard of it, so the step it
    took would be another one, silently. Refused before anything is prepared."""
    if config.optimizer == "muon" and distributed_type == DistributedType.FSDP:
        raise PromptbakeError("train.optimizer: muon needs each LoRA matrix whole on every process and FSDP shards "
                              "them; use adamw under FSDP (or DDP with muon)")


def train_student(
    student,
    teacher: PromptedTeacher,
    renderer: ChatRenderer,
    tokenizer,
    train_queries: list[Query],
    config: BakeConfig,
    *,
    bf16: bool,
    engine: HFRolloutEngine | None = None,
    log_path: Path | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    checkpointing: Checkpointing | None = None,
    fixed_responses: dict[int, list[list[int]]] | None = None,
) -> TrainResult:
    """Run `config.steps` steps of `config.method` on `student` (a PEFT model) in place, resuming from a checkpoint
    if given. OPCD samples the student each step (after its first `teacher_sample_steps`); offpolicy, sft and those
    first steps train on `fixed_responses` (the teacher's)."""
    objective = token_loss(config.method, config.kl, config.forward_kl_weight)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise PromptbakeError(f"train.batch_size={config.batch_size} is the batch of all {world} processes together; "
                              f"make it a multiple of {world}")
    if config.batch_size // world * config.rollouts < config.updates_per_batch:
        raise PromptbakeError(f"train.updates_per_batch={config.updates_per_batch} needs at least that many rollouts per "
                              f"process; each of the {world} processes has {config.batch_size // world * config.rollouts}")
    refuse_sharded_muon(config, accelerator.distributed_type)
    params = [p for p in student.parameters() if p.requires_grad]
    if config.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(student, torch.optim.AdamW, lr=config.lr, weight_decay=config.weight_decay,
                                              loraplus_lr_ratio=config.loraplus_lr_ratio)
    elif config.optimizer == "muon":
        optimizer = torch.optim.Muon(params, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw")
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    wrapped, optimizer = accelerator.prepare(student, optimizer)
    policy = accelerator.unwrap_model(wrapped)
    # Every process draws the same global batch and keeps its share, so a step trains on the same queries
    # whatever the number of processes; sampling noise differs per process (its own torch seed).
    rng = random.Random(config.seed * 1000)
    if world > 1:
        torch.manual_seed(config.seed * 1000 + rank)
    # The weight average (ema_decay) is a shadow of the training: kept beside it, written as the adapter at the end.
    average = WeightAverage(trainable(policy), config.ema_decay) if config.ema_decay else None
    first_step = 1
    if checkpointing and checkpointing.resume_from:
        ckpt = checkpointing.resume_from
        restore(ckpt, policy, optimizer)
        rng.setstate(python_rng_from_json(ckpt.python_rng))
        torch.set_rng_state(ckpt.torch_rng_of(rank))
        with warnings.catch_warnings():  # torch warns of a scheduler step before any optimizer step: expected here
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(ckpt.step):
                scheduler.step()
        first_step = ckpt.step + 1
        if average is not None:
            if ckpt.average is None:
                raise PromptbakeError(f"the checkpoint at step {ckpt.step} has no weight average to resume with ema_decay")
            average.load_state(ckpt.average, ckpt.step)
    resumed_extra = checkpointing.resume_from.extra if checkpointing and checkpointing.resume_from else {}
    tokens_trained = int(resumed_extra.get("tokens_trained", 0))
    # future_kl_weight's baseline must not depend on the step's own samples: the previous step's mean loss (0 at
    # step 1), kept in checkpoints so that a resumed run trains as an uninterrupted one.
    future_baseline = float(resumed_extra.get("last_step_loss", 0.0))
    # hidden_match_weight: the student's and the teacher's decoder layers, read while each scores the same tokens.
    match_hidden = config.hidden_match_weight > 0
    student_blocks = repeated_blocks(policy) if match_hidden else []
    teacher_blocks = repeated_blocks(teacher.model) if match_hidden else []
    if match_hidden and (len(student_blocks) != len(teacher_blocks)
                         or policy.config.hidden_size != teacher.model.config.hidden_size):
        raise PromptbakeError(f"hidden_match_weight pairs the student's {len(student_blocks)} layers of width "
                              f"{policy.config.hidden_size} with the teacher's, which has {len(teacher_blocks)} of width "
                              f"{teacher.model.config.hidden_size}; it needs a teacher of the student's shape")
    # hidden_match_target: each layer's output, or what it adds to the stream.
    matched = layer_increments if config.hidden_match_target == "increments" else (lambda states_LBTD: states_LBTD)
    engine = engine or HFRolloutEngine(policy, bf16=bf16)
    engine.sync()
    eos_ids = eos_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    student_prompts = {q.id: renderer.student_ids(q.messages) for q in train_queries}
    prompt_ids_1P = (torch.tensor([tokenizer(renderer.system_prompt, add_special_tokens=False)["input_ids"]],
                                  device=accelerator.device) if config.prompt_lm_weight else None)
    if prompt_ids_1P is not None and prompt_ids_1P.shape[1] < 2:
        raise PromptbakeError("prompt_lm_weight trains on the system prompt's text, and this one has fewer than two tokens")
    result = TrainResult()
    log_file = open(log_path, "a") if log_path and accelerator.is_main_process else None
    started = time.perf_counter()
    compiled = contextlib.ExitStack()
    compiling = use_torch_compile(config, bf16, accelerator.device, policy)
    on_cpu = accelerator.device.type == "cpu"
    compiled_key = run_compile_key(policy, bf16, config) if compiling and on_cpu else None
    if compiling:
        compiled.enter_context(torch._dynamo.config.patch(specialize_float=SPECIALIZE_FLOATS))
        compiled.enter_context(torch._functorch.config.patch(activation_memory_budget=config.activation_memory_budget))
    compiled.enter_context(compiled_blocks(policy, compiling))
    decode_compiled = compiled.enter_context(compiled_decoding(engine, compiling))
    compiled.enter_context(compiled_loss(compiling and loss_compiles(config.method, config.kl)))
    if config.gradient_checkpointing:
        compiled.enter_context(recomputed_activations(policy))
    nonfinite_in_a_row, nonfinite_since = 0, first_step
    try:
        for step in range(first_step, config.steps + 1):
            t0 = time.perf_counter()
            fault_point("sampling", step)
            if QUERY_EPOCHS:
                drawn = step_queries(train_queries, config.batch_size, config.seed, step)[rank::world]
            else:  # each step's batch drawn apart from the others' (before 2026-12-07): some queries come back early
                drawn = rng.sample(train_queries, config.batch_size)[rank::world]
            batch = [q for q in drawn for _ in range(config.rollouts)]
            prompts = [student_prompts[q.id] for q in batch]
            # offpolicy / sft, and opcd's first teacher_sample_steps: the teacher's answers, sampled once before training.
            on_teacher_samples = config.method != "opcd" or step <= config.teacher_sample_steps
            if not on_teacher_samples:
                # The student's compiled layers serve its training pass only; the sampler's own compiled step may run.
                with eager_only(compiling and not decode_compiled):
                    rollout = engine.sample(
                        prompts, max_new_tokens=config.max_new_tokens, temperature=config.temperature, eos_ids=eos_ids,
                        pad_id=pad_id,
                    )
            else:
                rollout = rollout_from_lists([fixed_responses[q.id][i % config.rollouts] for i, q in enumerate(batch)], pad_id)
            if config.release_memory:
                release_free_memory()  # the sampler's KV cache and logits are freed; keep the heap from growing
            t1 = time.perf_counter()
            teacher_s, loss_sum, hidden_sum, prompt_sum, norms, applied = 0.0, 0.0, 0.0, 0.0, [], 0
            stop_sum = 0.0
            # Each update's loss is a mean over its part's response tokens of all processes; DDP averages gradients
            # over processes, so each one scales its sum by `world` (1 in a single process).
            response_lens = rollout.response_mask_BT.sum(-1).tolist()
            parts = update_parts(len(batch), config.updates_per_batch)
            part_tokens_K = accelerator.reduce(torch.tensor([sum(response_lens[r] for r in rows) for rows in parts],
                                                            device=accelerator.device), "sum").tolist()
            part_answers_K = accelerator.reduce(torch.tensor([len(rows) for rows in parts], device=accelerator.device),
                                                "sum").tolist()
            step_tokens = sum(part_tokens_K)
            wrapped.train()
            for part_rows, part_tokens, part_answers in zip(parts, part_tokens_K, part_answers_K):
                total_tokens = max(part_tokens, 1) / world
                prefix = None
                if SHARE_STUDENT_PREFIX and world == 1 and not config.hidden_match_query and not config.gradient_checkpointing:
                    # Eager: through the compiled layers its growing cache would recompile them once per layer.
                    with autocast(accelerator.device, bf16), eager_only(compiling):
                        prefix = trainable_prefix(wrapped, [prompts[r] for r in part_rows])
                P = prefix.length if prefix is not None else 0
                groups = [[part_rows[i] for i in group] for group in micro_batches(
                    [len(prompts[r]) - P + response_lens[r] for r in part_rows], config.student_rows(bf16),
                    config.micro_batch_tokens)]  # rows of each
                micros = [rollout.select(rows) for rows in groups]
                widths = [micro.response_ids_BT.shape[1] for micro in micros]
                spans = teacher_spans([len(rows) for rows in groups], widths, len(tokenizer), 2 if bf16 else 4)
                scored: dict[int, TeacherTargets] = {}  # micro-batch index -> its targets, scored with an earlier one
                if prompt_ids_1P is not None:  # once per update, its gradient added to the part's (synced with its last)
                    with accelerator.no_sync(wrapped):
                        prompt_loss = prompt_text_loss(wrapped, prompt_ids_1P, bf16)
                        accelerator.backward(config.prompt_lm_weight * prompt_loss)
                    prompt_sum += float(prompt_loss.detach()) / len(parts)
                    del prompt_loss
                for index, (rows, micro, T) in enumerate(zip(groups, micros, widths)):
                    t_teacher = time.perf_counter()
                    if index not in scored:
                        span = next(span for span in spans if span[0] == index)
                        scored.update(zip(span, score_teacher(
                            teacher, [groups[j] for j in span], [widths[j] for j in span], rollout, batch, prompts,
                            teacher_input=objective.teacher_input, temperature=config.temperature, blocks=teacher_blocks,
                            matched=matched, match_hidden=match_hidden, match_query=config.hidden_match_query,
                            compiling=compiling)))
                    targets = scored.pop(index)
                    teacher_out, teacher_states_LBTD = targets.out, targets.states_LBTD
                    if config.hidden_match_query:
                        suffix, teacher_query_LBQD, query_mask_BQ = targets.suffix, targets.query_LBQD, targets.query_mask_BQ
                    del targets
                    teacher_s += time.perf_counter() - t_teacher
                    last = index == len(groups) - 1
                    # The prefix stays attended until the micro-batch's backward is done.
                    with contextlib.nullcontext() if last else accelerator.no_sync(wrapped), \
                            shared_prefix(wrapped, prefix.attended) if P else contextlib.nullcontext():
                        with autocast(accelerator.device, bf16), \
                                recorded_layer_outputs(student_blocks) as student_layers:
                            row_prompts = [prompts[r][P:] for r in rows]
                            student_logits_BTV = response_logits(wrapped, row_prompts, micro, pad_id, prefix_len=P,
                                                                 prefix_attended=bool(P))
                        device = student_logits_BTV.device
                        ids_BT, mask_BT = micro.response_ids_BT.to(device), micro.response_mask_BT.to(device)
                        loss_BT = distill_loss(
                            config.method, config.kl, student_logits_BTV,
                            teacher_out.to(device) if teacher_out is not None else None,
                            ids_BT, temperature=config.temperature, topk=config.topk,
                            forward_weight=config.forward_kl_weight,
                        )
                        # This micro-batch's share of the part's mean: the gradients add up to the part's mean.
                        weight_BT = token_weights(mask_BT, config.loss_average, part_tokens, part_answers, world)
                        micro_loss = (loss_BT * weight_BT).sum()
                        objective_loss = micro_loss
                        if config.stop_kl_weight:  # where the answer ends, weighed apart from what it says
                            stop_BT = stop_kl(student_logits_BTV, teacher_out.to(device), eos_ids, config.temperature,
                                              config.forward_kl_weight)
                            objective_loss = objective_loss + config.stop_kl_weight * (stop_BT * weight_BT).sum()
                            stop_sum += float((stop_BT.detach() * mask_BT).sum()) / max(step_tokens, 1)
                            del stop_BT
                        if config.future_kl_weight and not on_teacher_samples:  # a term of the student's sampling
                            surrogate_BT = future_divergence_surrogate(student_logits_BTV, ids_BT, loss_BT, mask_BT,
                                                                       future_baseline, config.temperature)
                            objective_loss = micro_loss + config.future_kl_weight * (surrogate_BT * weight_BT).sum()
                        if match_hidden:
                            lengths = [len(p) for p in row_prompts] if packs_rows(device, row_prompts, prefix_len=P) else None
                            student_LBTD = matched(response_states(student_layers, len(student_blocks), T, lengths))
                            scale_LBD = (dimension_scales(teacher_states_LBTD, mask_BT.to(teacher_states_LBTD.device))
                                         if config.hidden_match_scale == "dims" else None)
                            distance_BT = hidden_distance(student_LBTD, teacher_states_LBTD, scale_LBD)
                            micro_distance = (distance_BT * weight_BT).sum()
                            if config.hidden_match_query:  # logged: the response tokens' distance alone, as without it
                                student_query_LBQD, _ = query_states(student_layers, len(student_blocks), T, suffix, lengths)
                                distance_BQ = hidden_distance(matched(student_query_LBQD), teacher_query_LBQD, scale_LBD)
                                objective_loss = objective_loss + config.hidden_match_weight * (
                                    distance_BQ * query_mask_BQ.to(device)).sum() / total_tokens
                            objective_loss = objective_loss + config.hidden_match_weight * micro_distance
                            hidden_sum += float((distance_BT.detach() * mask_BT).sum()) / max(step_tokens, 1)
                        del student_layers
                        accelerator.backward(objective_loss)
                    # Logged as the mean over the step's tokens, whatever the average trained on.
                    loss_sum += float((loss_BT.detach() * mask_BT).sum()) / max(step_tokens, 1)
                    del teacher_out, student_logits_BTV, loss_BT, teacher_states_LBTD
                    if config.hidden_match_query:
                        del teacher_query_LBQD
                    if config.release_memory:
                        release_free_memory()
                if prefix is not None:
                    prefix.backward()  # the micro-batches' gradients at the prefix, through its graph once
                    del prefix
                if fault_requested("nan_grad", step):  # test hook: a backward that returned NaN at a finite loss
                    params[0].grad.fill_(float("nan"))
                norm = float(accelerator.clip_grad_norm_(params, config.grad_clip))  # the same on every process
                norms.append(norm)
                fault_point("optimizer", step)
                if math.isfinite(norm):
                    nonfinite_in_a_row = 0
                elif nonfinite_in_a_row == 0:
                    nonfinite_in_a_row, nonfinite_since = 1, step
                else:
                    nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= MAX_NONFINITE_UPDATES:
                    raise FloatingPointError(
                        f"the gradient was not finite at steps {nonfinite_since}-{step} ({nonfinite_in_a_row} updates "
                        f"in a row, {objective.name} {loss_sum:.4g}); lower the learning rate or try precision fp32")
                if math.isfinite(norm):
                    optimizer.step()
                    applied += 1
                    if config.teacher_mode == "live":
                        teacher.refresh()  # the teacher's weights just changed: its prompt cache is stale
                optimizer.zero_grad(set_to_none=True)
            t2 = t1 + teacher_s
            grad_norm = sum(norms) / len(norms)  # not finite if any update's was
            skipped = applied < len(norms)
            scheduler.step()  # the schedule follows the step count, applied or not
            if average is not None:
                average.update()  # once per step, applied or not: its update count is the step
            if applied:
                engine.sync()  # the next step samples from the updated student
            t3 = time.perf_counter()
            rows_capped = accelerator.reduce(torch.tensor(
                [len(batch), sum(hit_cap(rollout, config.max_new_tokens, eos_ids))], device=accelerator.device), "sum")
            all_rows, capped_rows = (int(x) for x in rows_capped.tolist())
            entry = StepLog(
                step=step,
                kl=float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum")),
                grad_norm=grad_norm,
                lr=scheduler.get_last_lr()[0],
                response_tokens=step_tokens,
                mean_response_len=step_tokens / all_rows,
                seconds=t3 - t0,
                sample_seconds=t1 - t0,
                teacher_seconds=t2 - t1,
                student_seconds=t3 - t2,
                tokens_per_s=step_tokens / max(t3 - t0, 1e-9),
                rows=all_rows,
                capped_rows=capped_rows,
                loss=objective.name,
                skipped=skipped,
                updates=len(norms),
                hidden_distance=float(accelerator.reduce(torch.tensor(hidden_sum, device=accelerator.device), "sum"))
                if match_hidden else None,
                on_teacher_samples=on_teacher_samples,
                prompt_ce=prompt_sum if prompt_ids_1P is not None else None,
                stop_kl=float(accelerator.reduce(torch.tensor(stop_sum, device=accelerator.device), "sum"))
                if config.stop_kl_weight else None,
            )
            if not math.isfinite(entry.kl):
                raise FloatingPointError(f"{objective.name} became {entry.kl} at step {step}; lower the learning rate")
            result.log.append(entry)
            if compiled_key and step == first_step and accelerator.is_main_process:
                remember_compiled(compiled_key)  # this model's graphs are in torch's cache now: short runs may compile
            if log_file:
                log_file.write(entry.to_json() + "\n")
                log_file.flush()
            if on_step:
                on_step(entry)
            tokens_trained += step_tokens  # counted over all processes: every process stops on the same step
            future_baseline = entry.kl
            budget_spent = config.token_budget is not None and tokens_trained >= config.token_budget
            if checkpointing:
                checkpointing.extra["tokens_trained"] = tokens_trained
                checkpointing.extra["last_step_loss"] = future_baseline
                # Any process asked to stop stops them all, after the same step.
                stop = bool(accelerator.reduce(torch.tensor(int(checkpointing.stop_requested()),
                                                            device=accelerator.device), "sum"))
                if stop or step % checkpointing.every == 0 or step == config.steps or budget_spent:
                    torch_rngs = gather_object([torch.get_rng_state()]) if world > 1 else None
                    if accelerator.is_main_process:
                        save_checkpoint(
                            checkpointing.work_dir, step=step, build_key=checkpointing.build_key, model=policy,
                            optimizer=optimizer, python_rng_state=python_rng_to_json(rng.getstate()),
                            log_lines=checkpointing.log_lines_before + len(result.log), extra=checkpointing.extra,
                            torch_rngs=torch_rngs, continue_key=checkpointing.continue_key,
                            average=average.state() if average is not None else None,
                        )
                    accelerator.wait_for_everyone()  # nobody stops before the checkpoint is on disk
                if stop:
                    raise KeyboardInterrupt
            if budget_spent:
                break
    finally:
        compiled.close()
        if log_file:
            log_file.close()
    if average is not None:  # the checkpoints keep the last step's weights; the artifact gets their average
        average.copy_to_params()
        engine.sync()
    result.seconds = time.perf_counter() - started
    result.processes = world
    if world > 1:  # DDP keeps the replicas equal; check it rather than assume it, before anyone writes
        digest = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
        digests = accelerator.gather(digest)
        if not torch.all(digests == digests[0]):
            raise RuntimeError(f"the adapters of the {world} processes differ after training: {digests.tolist()}")
    return result

