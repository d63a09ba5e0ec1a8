"""Matching the prompted teacher's residual stream as well as its next-token distribution (config hidden_match_weight).

The per-token KL tells the student where the teacher's next-token distribution is, one vocabulary-sized number per
position, and leaves it to find how to get there. When the teacher is the same base model with the prompt in
context, every decoder layer's output at the same response token is a target too: how far the prompt moved the
model's internal state, layer by layer. The loss here is the cosine distance of the two residual streams (1 - cos),
per layer, averaged over layers: scale-free (a Llama residual stream grows by orders of magnitude from the first
layer to the last) and zero where the student's state points where the teacher's does.

Layer outputs are read with forward hooks on the decoder layers while the ordinary logits pass runs, in whichever
layout `rollout.response_logits` chose for it: left-padded (each row's response tokens last; the teacher always) or
packed (each row from column 0; the student's training pass on accelerators, where the left-padded one gave NaN
gradients).

`hidden_match_query` adds the user turn's tokens: the student's prompt and the teacher's end with the same tokens (the
query and the chat template around it); only the teacher's states there have read the prompt, so they are targets that
need no sampling. `query_states` reads both sides at those positions.

`hidden_match_scale: dims` divides both sides by the teacher's per-dimension scale first (`dimension_scales`), so the
few dimensions that carry most of a residual stream's energy do not set the cosine alone (opt-in: it helped on two
prompts of four at 80 steps).

`hidden_match_target: increments` compares what each layer adds to the stream (`layer_increments`) instead of the
stream itself: a layer's output is the sum of every earlier layer's contribution, so its cosine is set mostly by what
the two models already share, and the prompt's effect at one layer is a small angle on top of it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from promptbake.chat import common_prefix_length
from promptbake.rollout import packed_response_columns


@contextlib.contextmanager
def recorded_layer_outputs(blocks: list[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """While active, every forward of `blocks` appends its output hidden states (hidden_BLD) to the yielded list,
    in call order: one model forward gives one tensor per layer. No blocks: nothing is hooked, the list stays empty."""
    outputs: list[torch.Tensor] = []

    def keep(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def last_forward_layers(outputs: list[torch.Tensor], layers: int) -> list[torch.Tensor]:
    """The last forward's `layers` recorded layer outputs (hidden_BLD each): earlier forwards in the same window,
    such as the teacher computing its prompt cache on first use, come before them."""
    if len(outputs) < layers:
        raise RuntimeError(f"{len(outputs)} layer outputs were recorded, fewer than the model's {layers} layers")
    return outputs[-layers:]


def response_states(outputs: list[torch.Tensor], layers: int, T: int, prompt_lengths: list[int] | None = None) -> torch.Tensor:
    """The states of the last forward's `layers` layers at the positions that predict the T response tokens
    (states_LBTD), as `response_logits` keeps the logits. Left-padded layout (`prompt_lengths` None): every row ends
    with its response, so the T positions before the last. Packed layout (each row's prompt and response from
    column 0; `rollout.packs_rows`): row r's T positions from its prompt's last token, `prompt_lengths[r] - 1`.
    (An earlier forward in the same window, such as the teacher computing its prompt cache on first use, is left out.)"""
    last_forward = last_forward_layers(outputs, layers)
    if prompt_lengths is None:
        return torch.stack([hidden_BLD[:, -(T + 1):-1, :] for hidden_BLD in last_forward])
    device = outputs[-1].device
    rows_B1 = torch.arange(len(prompt_lengths), device=device)[:, None]
    columns_BT = packed_response_columns(prompt_lengths, T, device)
    return torch.stack([hidden_BLD[rows_B1, columns_BT] for hidden_BLD in last_forward])


def dimension_scales(teacher_LBTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Each layer's root-mean-square per dimension of the teacher's states over a row's valid positions (scale_LBD,
    fp32). Per row, so that how rows are grouped into micro-batches (or processes) never changes the loss.

    A Llama residual stream keeps much of its energy in a handful of dimensions (in SmolLM2-135M the largest 5 of
    576 hold 43-67 % from layer 5 on; benchmarks/residual_energy.py), with or without the prompt, so a plain cosine
    is set mostly by them and weighs the prompt's effect elsewhere little (2-5x less than per dimension). Dividing
    both sides by these scales weighs every dimension alike."""
    weights_1BT1 = mask_BT.to(torch.float32)[None, :, :, None]
    count_1B1 = weights_1BT1.sum(dim=2).clamp(min=1)
    square_LBD = (teacher_LBTD.detach().float().pow(2) * weights_1BT1).sum(dim=2) / count_1B1
    return square_LBD.sqrt().clamp(min=1e-6)


def layer_increments(states_LBTD: torch.Tensor) -> torch.Tensor:
    """What each decoder layer adds to the residual stream (increments_LBTD): the first layer's output as it is
    (the token's embedding, the same for student and teacher, plus the first layer's contribution), then each
    layer's output less the one before it. Differences of the recorded outputs, so nothing else is hooked and the
    compiled layers are untouched; computed in fp32."""
    states = states_LBTD.float()
    return torch.cat([states[:1], states[1:] - states[:-1]])


def hidden_distance(student_LBTD: torch.Tensor, teacher_LBTD: torch.Tensor,
                    scale_LBD: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token distance of two residual streams (distance_BT): 1 - cosine similarity per layer, averaged over the
    layers, in fp32. With `scale_LBD` (`dimension_scales`) both states are divided by it per dimension first
    (config hidden_match_scale: dims). Gradients flow through the student only."""
    if student_LBTD.shape != teacher_LBTD.shape:
        raise ValueError(f"student and teacher states differ in shape: {tuple(student_LBTD.shape)} against "
                         f"{tuple(teacher_LBTD.shape)} (layers, rows, positions, width)")
    student, teacher = student_LBTD.float(), teacher_LBTD.detach().float()
    if scale_LBD is not None:
        scale_LB1D = scale_LBD.detach().to(student.device)[:, :, None, :]
        student, teacher = student / scale_LB1D, teacher / scale_LB1D
    cos_LBT = torch.nn.functional.cosine_similarity(student, teacher, dim=-1, eps=1e-6)
    return (1 - cos_LBT).mean(0)


def common_suffix_length(a: list[int], b: list[int]) -> int:
    """How many tokens two prompts share at their ends (the user turn the student and the teacher both read)."""
    return common_prefix_length([a[::-1], b[::-1]])


def query_states(outputs: list[torch.Tensor], layers: int, T: int, suffix_lengths: list[int],
                 prompt_lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The states of the last forward's `layers` layers at each row's last `suffix_lengths[r]` prompt tokens but the
    very last (that one predicts the first response token, so `response_states` has it): states_LBQD and mask_BQ,
    right-aligned (row r's positions in the last suffix_lengths[r] - 1 of the Q columns). Layouts as in
    `response_states`: left-padded (`prompt_lengths` None; every prompt ends T columns before the end) or packed."""
    last_forward = last_forward_layers(outputs, layers)
    device = outputs[-1].device
    counts_B = torch.tensor([max(n - 1, 0) for n in suffix_lengths], device=device)
    Q = int(counts_B.max()) if len(suffix_lengths) else 0
    if prompt_lengths is None:
        last_B = torch.full_like(counts_B, outputs[-1].shape[1] - T - 1)
    else:
        last_B = torch.tensor(prompt_lengths, device=device) - 1
    q_Q = torch.arange(Q, device=device)
    columns_BQ = (last_B[:, None] - Q + q_Q).clamp(min=0)
    mask_BQ = q_Q[None, :] >= (Q - counts_B)[:, None]
    rows_B1 = torch.arange(len(suffix_lengths), device=device)[:, None]
    states_LBQD = torch.stack([hidden_BLD[rows_B1, columns_BQ] for hidden_BLD in last_forward])
    return states_LBQD, mask_BQ
