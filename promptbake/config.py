"""`BakeConfig`: every knob of a compile, documented once and validated in one place.

The prompt file's `train:` block and the CLI flags are both partial overrides of this model; the merged
result is stored verbatim in the manifest so a bake can be reproduced.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_FORWARD_KL_WEIGHT = 0.5  # where it applies: method opcd with kl full (docs/quality.md)
DEFAULT_HIDDEN_MATCH_WEIGHT = 30.0  # where it applies: opcd against the base model itself with logits (docs/quality.md)


# What a preset sets for every field the prompt file and the command line leave alone. `faithful` is the
# default (the quality study's choice, docs/quality.md); `quick` trades fidelity for minutes (CI, demos).
PRESETS: dict[str, dict] = {
    "faithful": {},
    "quick": {"max_new_tokens": 64, "steps": 16},
}


# Student rows per micro-batch when `micro_batch_size` is unset. bf16: eight (six at the 48-token cap, where
# micro_batch_tokens binds), the student's pass 1.25x against two for 0.37 GiB. fp32: two; six ran a step no faster on
# a 2-core Xeon without bf16 instructions, for 0.57 GiB more (docs/performance.md).
DEFAULT_MICRO_BATCH_ROWS_BF16 = 8
DEFAULT_MICRO_BATCH_ROWS_FP32 = 2

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)  # the one list: config, runtime and eval check against it


class BakeConfig(BaseModel):
    """Hyper-parameters of one OPCD compile. Defaults are sized for a 2-core CPU and a 135M model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: Literal["faithful", "quick"] = Field(
        "faithful",
        description="faithful: the defaults below, chosen by the quality study. quick: shorter rollouts and fewer "
                    "steps for CI and demos (see PRESETS); any field set explicitly still wins.",
    )

    # What is trained and against what.
    method: Literal["opcd", "offpolicy", "sft"] = Field(
        "opcd",
        description=(
            "opcd: the student samples, reverse KL to the prompted teacher on those tokens. offpolicy: the prompted "
            "teacher samples once (cached), forward KL over the teacher's top-k on those fixed responses. sft: "
            "cross-entropy on the teacher's sampled text."
        ),
    )
    teacher_mode: Literal["frozen", "live"] = Field(
        "frozen",
        description="frozen: the initial weights (adapter off) teach. live: the current student with the prompt teaches (self-distillation).",
    )
    teacher: str | None = Field(None, description="Teacher model; default: the base model itself with the adapter disabled.")
    teacher_url: str | None = Field(
        None,
        description="An OpenAI-compatible vLLM server holding the teacher (it must share the student's tokenizer): "
                    "scores the student's samples with prompt log-probs, so it needs kl=sampled at temperature 1. "
                    "For teachers that do not fit beside the student; see docs/scaling.md.")
    kl: Literal["full", "topk", "sampled"] = Field(
        "full",
        description=(
            "Reverse-KL estimator: full vocabulary (exact), the student's top-k tokens (the paper's reference code), "
            "or the sampled token only (teachers that return log-probs of given tokens). topk is a partial sum that "
            "can go negative: with LoRA at lr 5e-4 the student learned to push mass past its top-k and the true KL rose."
        ),
    )
    forward_kl_weight: float | None = Field(
        None, ge=0, le=1,
        description="Weight w of forward KL(teacher || student) in the per-token loss, still on the student's own samples: "
                    "(1 - w) reverse + w forward, full vocabulary (opcd with kl full). Reverse KL alone barely moves a "
                    "token the teacher likes and the student rarely samples (a name, a sign-off); the forward term does. "
                    f"Unset: {DEFAULT_FORWARD_KL_WEIGHT} where it applies (opcd with kl full), else 0. In the quality study "
                    "(support prompt) 0.5 passed the prompt's checks at 0.98x the teacher's rate against 0.82x for reverse "
                    "KL alone, for slightly less of the reverse-KL gap; on pirate and safety neither KL moved.",
    )
    future_kl_weight: float = Field(
        0.0, ge=0,
        description="Weight of the sequence-level term of on-policy training (opcd only; 0: off, the per-token loss "
                    "alone, as the OPCD paper trains): each sampled token is also pushed up or down by how far the "
                    "student then stays from the teacher over the rest of its answer (the mean per-token loss after it, "
                    "less the previous step's mean), the score-function part of the sequence-level gradient that the "
                    "per-token loss leaves out (MiniLLM's long-term term, length-normalised). In the quality study "
                    "(pirate, 40 steps) weight 1 changed neither KL gap, weight 4 lost 0.02 of the forward gap.",
    )
    stop_kl_weight: float = Field(
        0.0, ge=0,
        description="Extra weight on where an answer ends (0: off): at every response token the two-outcome KL between "
                    "the student's and the teacher's probabilities of ending the answer there (the end-of-turn tokens "
                    "against all others), mixed as forward_kl_weight mixes the per-token loss, is added times this "
                    "weight. That KL is already a part of the per-token one, but a small part: a stop hazard of 1/90 per "
                    "token against the teacher's 1/60 costs about 0.001 nats a position while it makes answers half as "
                    "long again. Needs the teacher's logits (kl full or topk, not a served teacher). On medical (seed 1) "
                    "weight 10 brought the bake's stops to the teacher's and lost 0.10 of the held-out reverse-KL gap, "
                    "so it is off by default (docs/quality.md, section 27).",
    )
    hidden_match_weight: float | None = Field(
        None, ge=0,
        description="Weight of a second target beside the per-token KL (0: off): at every response token, each decoder "
                    "layer's output of the student (no prompt) is pulled towards the prompted teacher's at the same token, "
                    "by their cosine distance (1 - cos) averaged over the layers. Needs a teacher with the student's "
                    "layers and its logits (kl full or topk, not a served teacher). Unset: "
                    f"{DEFAULT_HIDDEN_MATCH_WEIGHT:g} where it applies (method opcd, kl full or topk, the base model itself "
                    "as teacher), else 0. In the quality study, paired seed by seed over three seeds at 80 steps, it closed "
                    "0.02-0.10 more of the held-out reverse-KL gap on every shipped prompt at the same step time, "
                    "+0.16 GiB peak (docs/quality.md, sections 14 and 29).",
    )
    hidden_match_query: bool = Field(
        False,
        description="With hidden_match_weight: match the layers at the user turn's tokens too (the query and the chat "
                    "template around it, which the student's prompt and the teacher's both end with). Only the "
                    "teacher's states there have read the prompt, so every query gives targets without sampling; each "
                    "such token counts as much as a response token.",
    )
    hidden_match_scale: Literal["none", "dims"] = Field(
        "none",
        description="With hidden_match_weight: none compares the raw layer outputs; dims divides the student's and the "
                    "teacher's by the teacher's root-mean-square per dimension (over each row's response tokens, "
                    "per layer) first, so the few dimensions that hold most of a residual stream's energy do "
                    "not set the cosine alone. Paired against none at 80 steps it closed +0.018 and +0.012 more of "
                    "the held-out reverse-KL gap on pirate and support and -0.010 and -0.026 on safety and medical, "
                    "so none stays the default (docs/quality.md, section 17).",
    )
    hidden_match_target: Literal["states", "increments"] = Field(
        "states",
        description="With hidden_match_weight: states compares each layer's output (the residual stream); increments "
                    "compares what each layer adds to it (its output less the previous layer's), where the prompt's "
                    "effect at that layer is not a small angle on top of everything the two models share. On pirate at "
                    "40 steps (weight 30) it closed 0.744 of the held-out reverse-KL gap, within noise of states (0.724) "
                    "and of states with dims (0.757), so states stays the default (docs/quality.md, section 22).",
    )
    prompt_lm_weight: float = Field(
        0.0, ge=0,
        description="Weight of a next-token loss on the system prompt's own text (0: off). The prompted teacher copies "
                    "phrases of its prompt into its answers; the student never sees the prompt, so it can continue "
                    "such a phrase only if its weights hold it. With this term the student reads the prompt as plain "
                    "text at every update and predicts each next token (cross-entropy, mean over the prompt's tokens). "
                    "At 0.1 it moved medical's three seeds both ways (no mean gain) and neither gap on pirate or safety; it reads "
                    "the whole prompt per update (support's 1,616 tokens: 0.84x tokens/s), so it is off by default "
                    "(docs/quality.md, section 26).",
    )
    topk: int = Field(256, gt=0, description="k for kl=topk. Log-probs come from the full softmax, not renormalised.")

    # Sampling.
    steps: int = Field(
        80, gt=0, description="Optimizer steps. 80 closed about 0.08 more of the held-out KL gap than 40 on both "
                              "prompts measured, twice the time; 160 closed 0.02-0.04 more than 80; 320 closed 0.016 more than 160 on "
                              "pirate and nothing more on safety "
                              "(README, quality study). "
                              "A rerun with more steps continues from the finished compile's last step.")
    batch_size: int = Field(
        16, gt=0, description="Queries per step. On the default's sampled tokens, 80 steps of 16 closed more of the gap "
                              "than 40 of 32 or 160 of 8 (docs/quality.md, section 10)."
    )
    rollouts: int = Field(1, gt=0, description="Student samples per query.")
    teacher_sample_steps: int = Field(
        0, ge=0,
        description="opcd only: the first N of `steps` train on the prompted teacher's own answers (sampled once before "
                    "training and cached) instead of the student's, with the same loss. Those steps sample nothing, so "
                    "they cost about the teacher's and student's passes alone: a cheap warm start before the student "
                    "samples its own answers.")
    updates_per_batch: int = Field(
        1, gt=0,
        description="Optimizer updates per round of sampling: the batch's rollouts are split into this many parts, each "
                    "scored and trained on as its own update (lr and schedule per step, as before). More updates for the "
                    "same sampling and teacher time; the later parts' samples are then slightly off-policy. In the quality "
                    "study (support, 40 steps, one seed) 2 closed 0.03 more of the held-out KL gap than 1, 4 no more; at 80 "
                    "steps 2 closed no more than 1.")
    micro_batch_size: int | None = Field(
        None, gt=0, description="Most rows per student forward/backward (fewer where micro_batch_tokens binds); bounds "
                                "memory, not the math. Unset: 8 with bf16, 2 without (fp32 activations take twice the "
                                "bytes: at the 48-token cap six fp32 rows ran a step no faster than two, for 0.57 GiB "
                                "more peak RSS; benchmarks/train_step.py, docs/performance.md).")
    micro_batch_tokens: int = Field(
        400, gt=0,
        description="Most tokens per student forward/backward: rows x the longest row's prompt (after the first tokens "
                    "all rows share, run once) and response, at least one row. Bounds memory, not the math. At the "
                    "48-token cap 8 rows of about 60 tokens ran the student's pass 1.44x faster than 2 rows, for 0.54 GiB "
                    "more peak RSS; at the 128-token cap 3 rows instead of 2 bought no clear speed for 0.31 GiB, so 400 "
                    "keeps 2 rows there and gives 6 at 48 tokens with bf16 (benchmarks/train_step.py, docs/performance.md).")
    max_new_tokens: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description=(
            "Longest sampled response (the cap); tokens after EOS are masked. auto: measured before training as the "
            "length_quantile of the prompted teacher's answers (sampled at the training temperature) to "
            "length_probe_queries training queries, "
            "rounded up to a multiple of 16, between 32 and max_new_tokens_limit. Rollouts and held-out answers that "
            "hit the cap are counted and reported; a prompt is never cut."
        ),
    )
    max_new_tokens_limit: int = Field(
        128, gt=0,
        description="Upper bound of the auto cap, and how far the teacher's probe answers are decoded. At equal tokens, "
                    "128 closed more of the held-out gap (over 256-token answers) than 256: twice the optimizer steps. "
                    "Much shorter caps train the start of answers and let later positions drift.")
    length_quantile: float = Field(0.95, gt=0, le=1, description="Quantile of the teacher's answer lengths the auto cap covers.")
    length_probe_queries: int = Field(32, gt=0, description="Training queries the auto cap is measured on.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; both logits are divided by it in the loss.")

    # Optimisation.
    lr: float = Field(
        1e-3, gt=0,
        description="Learning rate (AdamW's; optimizer muon scales its step to match). LoRA wants far more than full fine-tuning's 5e-6; on the quality study's held-out "
                    "file 1e-3 closed more of the KL gap than 5e-4 at equal tokens, and 2e-3 let late answer positions drift.")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw, or muon: torch's Muon, which orthogonalises each LoRA matrix's momentum (Newton-Schulz) "
                    "so that every direction of the update moves at one rate; its step is scaled to AdamW's typical "
                    "update size (Moonshot's rule), so `lr` means about what it means for AdamW. Each matrix must be "
                    "whole on each process, so it is refused under FSDP. At lr 1e-3 it closed 0.098 less of pirate's held-out "
                    "reverse-KL gap than AdamW at 40 steps (docs/quality.md, section 21).",
    )
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay (AdamW or Muon).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0,
        description="LoRA+: the LoRA B matrices learn this many times faster than the A matrices (which keep `lr`). "
                    "B starts at zero, so early training moves through B alone.")
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="Write the adapter as an exponential moving average of the weights over the steps (bias-corrected, "
                    "so about the last 1/(1-ema_decay) steps) instead of the last step's; 0: off. Training is unchanged "
                    "(the average is a shadow copy), so it costs no samples, only a few MB.")
    loss_average: Literal["tokens", "answers"] = Field(
        "tokens",
        description="How an update's per-token losses are averaged. tokens: over all its response tokens, so a long "
                    "answer weighs as much as its length (the held-out KL is this mean). answers: each answer's tokens "
                    "first, then over answers, so every answer weighs the same, as TRL's SDFT trainer does.")
    lr_schedule: Literal["constant", "cosine", "wsd"] = Field(
        "constant", description="After warm-up: constant; cosine decay from lr towards 0 over `steps`; or wsd (warm-up, "
                                "stable, decay): constant, then linear decay to 0 over the last fifth of `steps`.")

    # Adapter.
    lora_r: int = Field(16, gt=0, description="LoRA rank. vLLM serves ranks 1, 8, 16, 32, 64, 128, 256, 320, 512.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), description="Modules that get LoRA.")
    lora_init: Literal["zero", "steer"] = Field(
        "zero", description="zero: PEFT's LoRA (B = 0, the student starts as the base). steer: before the first step, "
                            "o_proj and down_proj of each layer are fitted so the student's residual stream moves toward "
                            "the prompted teacher's on its own samples (promptbake/steer.py); needs the base model as "
                            "teacher and both projections among lora_targets. On pirate at 40 steps it closed 0.094 "
                            "less of the held-out reverse gap than zero (docs/quality.md, section 20).")

    # Data and run.
    token_budget: int | None = Field(
        None, gt=0,
        description="Stop once this many response tokens have been trained on (steps stays the upper bound); "
                    "`compare` gives every method the same budget this way.")
    heldout: int = Field(
        24, ge=0,
        description="Queries kept out of training for the before/after comparison. With a held-out file, set "
                    "explicitly it measures on the file's first N (0: none); by default the whole file.")
    eval_max_new_tokens: int | None = Field(
        None, gt=0, description="Greedy answer length for check pass rates on held-out queries; default: the response cap.")
    seed: int = Field(0, description="Seeds the split, sampling and LoRA init.")
    precision: Precision = Field(
        "auto", description="auto: bf16 autocast where the hardware has fast bf16 (CPUs with AVX512_BF16 or AMX, CUDA), "
                      "else fp32 (AVX-512 alone is not enough)."
    )
    prefix_cache: bool = Field(True, description="Compute the teacher's system-prompt KV cache once and reuse it.")
    rollout: Literal["hf", "vllm"] = Field(
        "hf", description="Who samples the student: Hugging Face in this process, or vLLM (adapter re-registered every step)."
    )
    rollout_url: str | None = Field(
        None,
        description="An OpenAI-compatible vLLM server holding the base model, started with --enable-lora and "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: the student samples there, its adapter reloaded after "
                    "every step. The server must read this machine's files (same machine or shared filesystem).")
    sampler_copy: bool = Field(
        True, description="With bf16, sample from a bf16 copy of the base with the LoRA merged in (refreshed every step)."
    )
    torch_compile: bool | None = Field(
        None, description="torch.compile the student's decoder layers for the training forward and backward (one "
                          "compile serves every layer), the default objective's per-token loss and, on a CPU, the "
                          "sampler's decode step over a static KV cache (through its merged bf16 copy, or in fp32 "
                          "through the policy itself). Costs about 1-2 minutes of compiling in step 1 on a 2-core CPU "
                          "(less when torch's on-disk cache has it). Unset: on where it was measured to pay, a CPU "
                          "(in bf16 or fp32, as `precision` resolves), a C++ compiler and at least 40 steps, or 8 once an "
                          "earlier compile of this model put its graphs in torch's cache (promptbake.compile_cache); "
                          "off elsewhere.")
    gradient_checkpointing: bool = Field(
        False, description="Keep only each decoder layer's input during the student's forward and recompute the rest "
                           "in the backward pass: the student's activations (most of a step's peak memory) shrink to "
                           "a layer's worth, for one more forward pass per micro-batch.")
    activation_memory_budget: float = Field(
        1.0, ge=0, le=1, description="With torch_compile: how much of the compiled decoder layers' activations the "
        "student's forward keeps for the backward pass, from 0 (each layer's input only, like gradient_checkpointing) "
        "to 1 (torch's default partition); torch's partitioner keeps what costs the most FLOPs to recompute and "
        "recomputes the rest in the backward. Lower trades speed for memory: at the 128-token cap in fp32 on a 2-core "
        "CPU, 0.1 lowered peak RSS by 0.28-0.52 GiB in three runs (tokens/s 0.93x and 1.10x in the two timed ones, "
        "within their noise; the layers' pass alone 1.2-1.3x slower), 0 by 0.54 GiB.")
    release_memory: bool = Field(
        True, description="Return freed heap pages to the OS after sampling and after each training micro-batch "
                          "(glibc): keeps peak RSS from creeping up over a compile, for about 7 % of a step.")
    checkpoint_every: int = Field(10, gt=0, description="Save a resumable checkpoint every N steps (and on SIGINT/SIGTERM).")
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: all cores.")

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _int_or_auto(cls, value):
        if isinstance(value, str) and value != "auto":
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"must be a positive integer or 'auto', got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> "BakeConfig":
        if self.lora_r not in VLLM_LORA_RANKS:
            raise ValueError(f"lora_r={self.lora_r} cannot be served by vLLM; use one of {list(VLLM_LORA_RANKS)}")
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one module")
        if self.teacher_mode == "live" and self.teacher:
            raise ValueError("teacher_mode live makes the student its own teacher; it cannot be combined with teacher")
        if self.method == "sft" and self.teacher_mode == "live":
            raise ValueError("method sft trains on the teacher's fixed text; it has no live teacher")
        if self.updates_per_batch > self.batch_size * self.rollouts:
            raise ValueError(f"updates_per_batch={self.updates_per_batch} is more than the {self.batch_size * self.rollouts} "
                             "rollouts of a step (batch_size x rollouts)")
        if self.activation_memory_budget < 1 and self.torch_compile is False:
            raise ValueError("activation_memory_budget applies to compiled layers: set torch_compile true (or unset), or "
                             "use gradient_checkpointing")
        if self.rollout_url and self.rollout == "vllm":
            raise ValueError("rollout vllm samples in this process; rollout_url on a server: give one")
        applies = self.method == "opcd" and self.kl == "full"
        if "forward_kl_weight" not in self.model_fields_set or self.forward_kl_weight is None:
            # Derived every time, so that a later `kl = "sampled"` turns the default off rather than failing.
            object.__setattr__(self, "forward_kl_weight", DEFAULT_FORWARD_KL_WEIGHT if applies else 0.0)
        elif self.forward_kl_weight and not applies:
            raise ValueError(f"forward_kl_weight mixes forward KL into opcd's full-vocabulary loss; it needs method opcd "
                             f"with kl full, not method {self.method} with kl {self.kl}")
        if self.teacher_sample_steps:
            if self.method != "opcd" or self.teacher_mode != "frozen" or self.teacher_url:
                raise ValueError("teacher_sample_steps warms opcd up on a frozen local teacher's answers: it needs method "
                                 f"opcd, teacher_mode frozen and no teacher_url, not method {self.method}, teacher_mode "
                                 f"{self.teacher_mode}" + (" and teacher_url" if self.teacher_url else ""))
            if self.teacher_sample_steps >= self.steps:
                raise ValueError(f"teacher_sample_steps={self.teacher_sample_steps} leaves no step of the {self.steps} "
                                 "for the student's own samples; make it less than steps")
        if self.future_kl_weight and self.method != "opcd":
            raise ValueError(f"future_kl_weight trains on the student's own samples; it needs method opcd, not {self.method}")
        # The terms that read the teacher's full distribution or its layers need a local teacher returning logits.
        teacher_logits = self.method != "sft" and self.kl != "sampled" and not self.teacher_url
        if self.stop_kl_weight and not teacher_logits:
            raise ValueError("stop_kl_weight compares the two models' probabilities of ending the answer: it needs the "
                             f"teacher's logits (kl full or topk, method opcd or offpolicy), not method {self.method} with "
                             f"kl {self.kl}" + (" and teacher_url" if self.teacher_url else ""))
        if "hidden_match_weight" not in self.model_fields_set or self.hidden_match_weight is None:
            # Derived like forward_kl_weight. A named teacher may have another shape, so it is off unless asked for.
            own_layers = self.method == "opcd" and self.kl != "sampled" and not self.teacher and not self.teacher_url
            object.__setattr__(self, "hidden_match_weight", DEFAULT_HIDDEN_MATCH_WEIGHT if own_layers else 0.0)
        elif self.hidden_match_weight and not teacher_logits:
            raise ValueError("hidden_match_weight reads the teacher's layers as it scores: it needs a local teacher that "
                             f"returns logits (kl full or topk, method opcd or offpolicy), not method {self.method} "
                             f"with kl {self.kl}" + (" and teacher_url" if self.teacher_url else ""))
        if self.hidden_match_query and not self.hidden_match_weight:
            raise ValueError("hidden_match_query adds positions to the layers' term: it needs hidden_match_weight > 0")
        for field in ("hidden_match_scale", "hidden_match_target"):  # the term's form, away from its default
            value = getattr(self, field)
            if value != type(self).model_fields[field].default and not self.hidden_match_weight:
                raise ValueError(f"{field} {value} shapes the layers' term: it needs hidden_match_weight > 0")
        if self.optimizer == "muon" and self.loraplus_lr_ratio is not None:
            raise ValueError("loraplus_lr_ratio sets AdamW's learning rates per matrix; it needs optimizer adamw, not muon")
        if self.lora_init == "steer":
            if self.teacher or self.teacher_url or self.teacher_mode == "live":
                raise ValueError("lora_init steer reads how the prompt moves the base model's own layers: it needs the "
                                 "base model as a frozen teacher (no teacher, teacher_url or teacher_mode live)")
            missing = [m for m in ("o_proj", "down_proj") if m not in self.lora_targets]
            if missing:
                raise ValueError(f"lora_init steer fits o_proj and down_proj: add {missing} to lora_targets")
        if self.teacher_url:
            if self.teacher:
                raise ValueError("teacher and teacher_url both name the teacher; give one")
            if self.teacher_mode == "live":
                raise ValueError("teacher_mode live makes the student its own teacher; it cannot be a server (teacher_url)")
            if self.method != "opcd" or self.kl != "sampled":
                raise ValueError("a served teacher (teacher_url) returns log-probs of given tokens: it needs method opcd "
                                 "with kl sampled")
            if self.temperature != 1.0:
                raise ValueError("a served teacher (teacher_url) scores at temperature 1; set temperature 1.0")
        return self

    def student_rows(self, bf16: bool) -> int:
        """`micro_batch_size`, or where it is unset the rows measured to pay in this precision."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        return DEFAULT_MICRO_BATCH_ROWS_BF16 if bf16 else DEFAULT_MICRO_BATCH_ROWS_FP32

    @classmethod
    def from_layers(cls, *layers: dict) -> "BakeConfig":
        """Defaults, then the chosen preset's values, then each layer (front matter, then flags) in order;
        None values are ignored. A preset never overrides a field that a layer sets."""
        explicit: dict = {}
        for layer in layers:
            explicit.update({k: v for k, v in layer.items() if v is not None})
        preset = explicit.get("preset", "faithful")
        return cls.model_validate({**PRESETS.get(preset, {}), **explicit})


def setting_error(err: ValidationError, prefix: str = "") -> str:
    """One line for the first problem of a config, `<prefix><key>: <what is wrong>`, without pydantic's boilerplate."""
    first = err.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""  # the field; deeper parts name pydantic's union branches
    msg = first["msg"].removeprefix("Value error, ")
    if key:
        return f"{prefix}{key}: {msg}"
    return f"{prefix.rstrip('.')}: {msg}" if prefix else msg
