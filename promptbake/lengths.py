"""Whole answers: size the response cap from the prompted teacher's own answers, and count what hits it.

A cap shorter than the teacher's answers trains only their beginnings: whatever a prompt asks for at the end
(a sign-off line, an `<answer>` tag after the reasoning) is never seen by the student, and a before/after
measurement under the same cut cannot show it. So the default cap is measured (the teacher's answer
lengths at the training temperature, on training queries) and every cut is counted, never silent.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from promptbake.rollout import Rollout

MIN_CAP = 32
CAP_MULTIPLE = 16


@dataclass
class LengthProbe:
    """The prompted teacher's answer lengths on a sample of training queries, and the cap sized from them."""

    cap: int
    quantile: float
    limit: int
    lengths: list[int]
    ended: list[bool]

    def summary(self) -> dict:
        ordered = sorted(self.lengths)
        return {
            "cap": self.cap,
            "source": "auto",
            "quantile": self.quantile,
            "limit": self.limit,
            "probe_answers": len(ordered),
            "teacher_median": ordered[len(ordered) // 2],
            "teacher_quantile_length": quantile_length(self.lengths, self.quantile),
            "teacher_unfinished_at_limit": sum(not e for e in self.ended) / max(len(self.ended), 1),
        }


def quantile_length(lengths: list[int], q: float) -> int:
    """The smallest length that at least a fraction q of the answers fit in (nearest-rank quantile)."""
    ordered = sorted(lengths)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def size_cap(lengths: list[int], quantile: float, limit: int) -> int:
    """Cap covering `quantile` of the answers, rounded up to a multiple of 16, within [32, limit].
    Unfinished answers count as `limit` long, so a teacher that rarely stops gets the limit."""
    need = quantile_length(lengths, quantile)
    return max(min(MIN_CAP, limit), min(limit, CAP_MULTIPLE * math.ceil(need / CAP_MULTIPLE)))


def hit_cap(rollout: Rollout, cap: int, eos_ids: list[int]) -> list[bool]:
    """Rows cut by the cap: `cap` tokens long and not ending with an end-of-turn token."""
    lengths = rollout.response_mask_BT.sum(-1).tolist()
    out = []
    for row, n in enumerate(lengths):
        last = int(rollout.response_ids_BT[row, n - 1]) if n else -1
        out.append(n >= cap and last not in eos_ids)
    return out


def ids_hit_cap(responses: list[list[int]], cap: int, eos_ids: list[int]) -> list[bool]:
    """The same for responses given as token lists (greedy answers)."""
    return [len(r) >= cap and (not r or r[-1] not in eos_ids) for r in responses]


def fraction(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def probe_queries(queries: list, count: int, seed: int) -> list:
    """A seeded sample of training queries for the probe (all of them when there are fewer)."""
    if len(queries) <= count:
        return list(queries)
    return random.Random(seed + 7).sample(queries, count)


@torch.no_grad()
def probe_teacher_lengths(sample_fn, prompts: list[list[int]], *, limit: int, temperature: float, eos_ids: list[int],
                          pad_id: int, seed: int, batch_size: int = 32) -> tuple[list[int], list[bool]]:
    """Sample the teacher's answers (up to `limit` tokens) and return their lengths and whether each ended.

    `sample_fn(prompts, **kwargs)` samples the prompted teacher (the rollout engine with the adapter off, or a
    separate teacher model)."""
    lengths: list[int] = []
    ended: list[bool] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            ro = sample_fn(prompts[i:i + batch_size], max_new_tokens=limit, temperature=temperature, eos_ids=eos_ids,
                           pad_id=pad_id)
            cut = hit_cap(ro, limit, eos_ids)
            lengths += [limit if c else int(n) for c, n in zip(cut, ro.response_mask_BT.sum(-1).tolist())]
            ended += [not c for c in cut]
    return lengths, ended
