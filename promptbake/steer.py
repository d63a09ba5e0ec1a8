"""Starting the LoRA where the prompt moves the residual stream (config lora_init: steer).

A fresh LoRA starts at zero, so the student is the base model and OPCD's first steps go to finding how the
system prompt shifts each layer. When the teacher is the same base model with the prompt in context, that shift
can be read off directly: at the same response tokens, each layer's state with the prompt minus without it.
`fit_steering_lora` fits, layer by layer from the first, the two projections that write into the residual
stream (`o_proj`, then `down_proj`) so that the student's state after each moves toward the teacher's:

- the target is what is still missing after the layers fitted before (each fit sees the student as the earlier
  fits left it, so later layers do not correct twice what earlier ones already moved);
- the fit is a ridge regression of that difference on the projection's input, cut to the adapter's rank
  (reduced-rank regression), with every residual dimension divided by the teacher's root-mean-square there, so
  the few dimensions that hold most of a Llama residual stream's energy do not decide alone;
- it is scaled by `shrink` (< 1: the layers are fitted one at a time on a linear model of what the next ones
  will do, so a full step overshoots).

Other projections keep PEFT's initialisation (B = 0). The result is an ordinary LoRA: served, merged and
trained like any other. The data is the base student's own samples on some training queries, which are also
what OPCD's first step trains on.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from promptbake.rollout import (adapter_enabled, adapter_set, autocast, eos_token_ids, packed_response_columns,
                                rollout_from_lists)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has read what the fit needs."""


def _decoder(model):
    """The decoder stack (embeddings, layers, final norm) inside a PEFT-wrapped causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


@torch.no_grad()
def module_inputs(decoder, seqs: list[list[int]], prompt_lengths: list[int], response_lengths: list[int], pad_id: int,
                  modules: dict[str, torch.nn.Module], *, stop_at: torch.nn.Module | None = None, bf16: bool = False,
                  rows_per_pass: int = 8) -> dict[str, torch.Tensor]:
    """The input of each of `modules` at the positions that predict response tokens (name -> states_ND, fp32, the
    rows of every pass concatenated). `stop_at`: end each forward when it reaches this module (what comes after is
    not needed)."""
    device = next(decoder.parameters()).device
    out: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    for start in range(0, len(seqs), rows_per_pass):
        part = range(start, min(start + rows_per_pass, len(seqs)))
        padded = rollout_from_lists([seqs[i] for i in part], pad_id)  # right-padded: each row's positions are its own
        ids_BL, mask_BL = padded.response_ids_BT, padded.response_mask_BT
        lengths = [response_lengths[i] for i in part]
        columns_BT = packed_response_columns([prompt_lengths[i] for i in part], max(lengths), torch.device("cpu"))
        valid_BT = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        rows_N = torch.arange(len(lengths))[:, None].expand_as(columns_BT)[valid_BT]
        cols_N = columns_BT[valid_BT]
        handles = []
        for name, module in modules.items():
            def keep(mod, args, kwargs, name=name):
                x = args[0] if args else kwargs["hidden_states"]
                out[name].append(x[rows_N.to(x.device), cols_N.to(x.device)].float())
            handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
        if stop_at is not None:  # registered last: it runs after the hooks above have read their inputs
            def stop(mod, args):
                raise _Stop
            handles.append(stop_at.register_forward_pre_hook(stop))
        try:
            with autocast(device, bf16), contextlib.suppress(_Stop):
                decoder(input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    return {name: torch.cat(parts) for name, parts in out.items()}


def sample_fit_data(engine, renderer, tokenizer, queries: list, *, max_new_tokens: int, temperature: float,
                    seed: int) -> dict:
    """The base student's own answers to `queries` (the adapter off, seeded), as the keyword arguments
    `fit_steering_lora` reads: each side's prompt + the same answer."""
    student = [renderer.student_ids(q.messages) for q in queries]
    teacher = [renderer.teacher_ids(q.messages) for q in queries]
    with adapter_set(engine, False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollout = engine.sample(student, max_new_tokens=max_new_tokens, temperature=temperature,
                                eos_ids=eos_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    answers = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.response_ids_BT, rollout.response_mask_BT)]
    return dict(student_seqs=[s + a for s, a in zip(student, answers)],
                teacher_seqs=[t + a for t, a in zip(teacher, answers)],
                student_prompt_lengths=[len(s) for s in student], teacher_prompt_lengths=[len(t) for t in teacher],
                response_lengths=[len(a) for a in answers])


def reduced_rank_fit(X_ND: torch.Tensor, R_NO: torch.Tensor, scale_O: torch.Tensor, rank: int,
                     ridge: float) -> tuple[torch.Tensor, float]:
    """W_OD of rank at most `rank` that makes X W^T close to R, each output dimension divided by `scale` (ridge
    penalty `ridge` x the mean diagonal of X^T X); and the share of the scaled R it explains on these rows.

    Reduced-rank regression: the ridge solution, projected onto the `rank` output directions its fitted values use
    most, which is the best rank-r fit in that metric."""
    X = X_ND.double()
    Rs = R_NO.double() / scale_O.double()
    G_DD = X.T @ X
    G_DD += ridge * G_DD.diagonal().mean() * torch.eye(G_DD.shape[0], dtype=G_DD.dtype, device=G_DD.device)
    Wt_DO = torch.linalg.solve(G_DD, X.T @ Rs)
    _, _, Vh = torch.linalg.svd(X @ Wt_DO, full_matrices=False)
    V_Or = Vh[:rank].T
    Wt_DO = Wt_DO @ V_Or @ V_Or.T
    explained = 1.0 - float(((Rs - X @ Wt_DO) ** 2).sum() / (Rs ** 2).sum().clamp(min=1e-30))
    return (Wt_DO * scale_O.double()[None, :]).T.float(), explained


def set_lora_delta(module, W_OD: torch.Tensor, adapter: str = "default") -> None:
    """Make a PEFT LoRA Linear's delta (B A x scaling) equal W (rank at most r), its size split evenly between A
    and B."""
    rank = module.lora_A[adapter].weight.shape[0]
    U, S, Vh = torch.linalg.svd(W_OD.double(), full_matrices=False)
    root_r = (S[:rank] / module.scaling[adapter]).sqrt()
    A = module.lora_A[adapter].weight
    B = module.lora_B[adapter].weight
    A.data.copy_((root_r[:, None] * Vh[:rank]).to(A.dtype))
    B.data.copy_((U[:, :rank] * root_r[None, :]).to(B.dtype))


def fit_steering_lora(model, *, student_seqs: list[list[int]], teacher_seqs: list[list[int]],
                      student_prompt_lengths: list[int], teacher_prompt_lengths: list[int],
                      response_lengths: list[int], pad_id: int, bf16: bool, shrink: float, ridge: float = 0.01,
                      log: Callable[[str], None] | None = None) -> list[dict]:
    """Set every layer's o_proj and down_proj LoRA as the module docstring says, in place; `model` is the PEFT
    student whose teacher is the same base with the adapter off, and the sequences are prompt + the same response
    on each side. Returns each layer's scaled gap before its fit and the share each fit explains."""
    decoder = _decoder(model)
    layers = list(decoder.layers)
    after_attention = {f"mid{l}": layer.post_attention_layernorm for l, layer in enumerate(layers)}
    after_layer = {f"out{l}": (layers[l + 1] if l + 1 < len(layers) else decoder.norm) for l in range(len(layers))}
    with adapter_enabled(model, False):
        target = module_inputs(decoder, teacher_seqs, teacher_prompt_lengths, response_lengths, pad_id,
                               {**after_attention, **after_layer}, bf16=bf16)
    stats = []
    for l, layer in enumerate(layers):
        row: dict = {"layer": l}
        for name, proj, point in (("o_proj", layer.self_attn.o_proj, after_attention[f"mid{l}"]),
                                  ("down_proj", layer.mlp.down_proj, after_layer[f"out{l}"])):
            got = module_inputs(decoder, student_seqs, student_prompt_lengths, response_lengths, pad_id,
                                {"x": proj, "h": point}, stop_at=point, bf16=bf16)
            goal_ND = target[("mid" if name == "o_proj" else "out") + str(l)]
            scale_D = goal_ND.pow(2).mean(0).sqrt().clamp(min=1e-6)
            W_OD, explained = reduced_rank_fit(got["x"], goal_ND - got["h"], scale_D, proj.lora_A["default"].weight.shape[0], ridge)
            set_lora_delta(proj, shrink * W_OD)
            row[name] = {"scaled_gap": float(((goal_ND - got["h"]) / scale_D).pow(2).mean()), "explained": explained}
        stats.append(row)
        if log:
            log(f"layer {l}: o_proj gap {row['o_proj']['scaled_gap']:.4f} ({row['o_proj']['explained']:.0%} fitted), "
                f"down_proj gap {row['down_proj']['scaled_gap']:.4f} ({row['down_proj']['explained']:.0%} fitted)")
    return stats
