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
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

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


def response_states(outputs: list[torch.Tensor], layers: int, T: int, prompt_lengths: list[int] | None = None) -> torch.Tensor:
    """The states of the last forward's `layers` layers at the positions that predict the T response tokens
    (states_LBTD), as `response_logits` keeps the logits. Left-padded layout (`prompt_lengths` None): every row ends
    with its response, so the T positions before the last. Packed layout (each row's prompt and response from
    column 0; `rollout.packs_rows`): row r's T positions from its prompt's last token, `prompt_lengths[r] - 1`.
    (An earlier forward in the same window, such as the teacher computing its prompt cache on first use, is left out.)"""
    if len(outputs) < layers:
        raise RuntimeError(f"{len(outputs)} layer outputs were recorded, fewer than the model's {layers} layers")
    if prompt_lengths is None:
        return torch.stack([hidden_BLD[:, -(T + 1):-1, :] for hidden_BLD in outputs[-layers:]])
    device = outputs[-1].device
    rows_B1 = torch.arange(len(prompt_lengths), device=device)[:, None]
    columns_BT = packed_response_columns(prompt_lengths, T, device)
    return torch.stack([hidden_BLD[rows_B1, columns_BT] for hidden_BLD in outputs[-layers:]])


def hidden_distance(student_LBTD: torch.Tensor, teacher_LBTD: torch.Tensor) -> torch.Tensor:
    """Per-token distance of two residual streams (distance_BT): 1 - cosine similarity per layer, averaged over the
    layers, in fp32. Gradients flow through the student only."""
    if student_LBTD.shape != teacher_LBTD.shape:
        raise ValueError(f"student and teacher states differ in shape: {tuple(student_LBTD.shape)} against "
                         f"{tuple(teacher_LBTD.shape)} (layers, rows, positions, width)")
    cos_LBT = torch.nn.functional.cosine_similarity(student_LBTD.float(), teacher_LBTD.detach().float(), dim=-1, eps=1e-6)
    return (1 - cos_LBT).mean(0)
