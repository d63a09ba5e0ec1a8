"""The runtime: tokenizer, base model (with baked adapters or a fresh trainable LoRA), device, precision and
context length, built one way for compile, verify, eval, chat and the benchmarks.

Every command used to assemble these itself and the copies drifted (one ignored the precision a bake recorded,
one never left the CPU). Here is the one place that loads weights, places them and picks the precision.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from promptbake.chat import ChatRenderer
from promptbake.config import PRECISIONS, BakeConfig
from promptbake.errors import PromptbakeError
from promptbake.models import check_same_tokenizer, load_adapter, load_model, load_tokenizer, resolve_model
from promptbake.rollout import HFRolloutEngine
from promptbake.teacher import PromptedTeacher


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512_BF16 or AMX).

    AVX-512 alone is not enough: torch reports the same capability ("AVX512") for an AMD EPYC with AVX512_BF16 and
    for an Intel Xeon without it, and on that Xeon a bf16 multiply of a training micro-batch ran at 0.31x fp32's speed
    (benchmarks/precision.py). A torch without the checks falls back to its capability level."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(check is None for check in checks):
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    return any(check() for check in checks if check is not None)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast only where it is fast: CUDA with bf16, or CPUs with bf16 instructions (`cpu_has_native_bf16`).

    An unknown value is an error rather than a silent fp32: a typo must not change what a run measures."""
    if precision not in PRECISIONS:
        raise PromptbakeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def default_device() -> torch.device:
    """This process's accelerator: under `accelerate launch` each rank owns LOCAL_RANK's GPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


# The frozen output layer gets a bf16 weight of its own (untied from the fp32 input embeddings); False keeps it
# tied and cast by autocast at every forward, as before (benchmarks/train_step.py, "fp32 output layer").
BF16_OUTPUT_LAYER = True


def store_frozen_linears_in_bf16(model) -> int:
    """Keep the frozen base weights of the LoRA-wrapped projections, and the frozen output layer, in bf16; returns
    the parameters cast.

    Under bf16 autocast every matmul casts its weight to bf16 anyway, so the numbers do not change; what
    changes is that these weights take half the memory and no bf16 copy is made (and kept for backward)
    at every forward: for the output layer that copy was 54 MiB and 25 ms per forward at 49k x 576. An output
    layer tied to the input embeddings is untied: the lookup keeps reading the fp32 table, so the residual stream
    starts from the same fp32 values. LoRA weights stay fp32 masters. Single process only: FSDP wants one dtype
    per shard."""
    cast = 0
    for module in model.modules():
        layer = getattr(module, "base_layer", None)
        if isinstance(layer, torch.nn.Linear) and not layer.weight.requires_grad:
            layer.weight.data = layer.weight.data.to(torch.bfloat16)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(torch.bfloat16)
            cast += layer.weight.numel()
    output = model.get_output_embeddings()
    if BF16_OUTPUT_LAYER and isinstance(output, torch.nn.Linear) and output.bias is None \
            and not output.weight.requires_grad and output.weight.dtype == torch.float32:
        output.weight = torch.nn.Parameter(output.weight.detach().to(torch.bfloat16), requires_grad=False)
        cast += output.weight.numel()
    return cast


@dataclass
class Runtime:
    """What every command runs on. `model` is the base with its adapters (a PeftModel), or the plain base."""

    model_dir: Path
    tokenizer: Any
    model: Any
    device: torch.device
    bf16: bool
    max_context: int
    adapter_names: list[str] = field(default_factory=list)
    trust_pickle: bool = False

    def renderer(self, system_prompt: str, on_warning: Callable[[str], None] | None = None) -> ChatRenderer:
        """Chat renderer for this tokenizer; template warnings (no system role, say) go to `on_warning`."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            renderer = ChatRenderer.for_tokenizer(self.tokenizer, system_prompt, self.max_context)
        for w in caught:
            (on_warning or (lambda msg: warnings.warn(msg, stacklevel=2)))(str(w.message))
        return renderer

    def engine(self, *, merged_copy: bool = True) -> HFRolloutEngine:
        """The in-process sampler of `model` (a bf16 copy with the adapter merged in where bf16 pays)."""
        return HFRolloutEngine(self.model, bf16=self.bf16, merged_copy=merged_copy)

    def teacher(self, renderer: ChatRenderer, teacher: str | None = None, *, prefix_cache: bool = True,
                url: str | None = None):
        """The prompted teacher: a vLLM server (`url`), a separate model sharing the tokenizer, or `model` itself
        with its adapter off."""
        if url is not None:
            from promptbake.served_teacher import ServedTeacher

            return ServedTeacher(url, renderer, self.tokenizer)
        if teacher is None:
            return PromptedTeacher(self.model, renderer, self.tokenizer.pad_token_id, is_student=True, bf16=self.bf16,
                                   prefix_cache=prefix_cache)
        teacher_dir = resolve_model(teacher, self.trust_pickle)
        check_same_tokenizer(self.tokenizer, load_tokenizer(teacher_dir), teacher)
        teacher_model = load_model(teacher_dir, self.trust_pickle).to(self.device)
        return PromptedTeacher(teacher_model, renderer, self.tokenizer.pad_token_id, is_student=False, bf16=self.bf16,
                               prefix_cache=prefix_cache)


def load_runtime(
    model_dir: Path,
    *,
    adapters: Sequence[tuple[str, Path]] = (),
    train: BakeConfig | None = None,
    precision: str = "auto",
    trust_pickle: bool = False,
) -> Runtime:
    """Tokenizer and base from `model_dir`, then either the baked `adapters` (name, folder) loaded for inference,
    or with `train` a fresh trainable LoRA; placed on this process's device, precision resolved for it.

    A trainable student in a single process keeps its frozen LoRA-wrapped weights in bf16 when bf16 is used."""
    if adapters and train is not None:
        raise ValueError("load_runtime: either baked adapters or a fresh LoRA to train, not both")
    tokenizer = load_tokenizer(model_dir)
    base = load_model(model_dir, trust_pickle)
    max_context = int(getattr(base.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    device = default_device()
    bf16 = use_bf16(precision, device)
    names = [name for name, _ in adapters]
    if train is not None:
        model = make_student(base, train)
    elif adapters:
        model = load_adapter(base, Path(adapters[0][1]), names[0])
        for name, path in adapters[1:]:
            load_adapter(None, Path(path), name, into=model)
        model.eval()
    else:
        model = base
    model.to(device)
    if train is not None and bf16 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        store_frozen_linears_in_bf16(model)
    return Runtime(model_dir, tokenizer, model, device, bf16, max_context, names, trust_pickle)
