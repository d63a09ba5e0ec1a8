"""An exponential moving average of the trained weights, written as the adapter in place of the last step's.

At a constant learning rate the last iterate carries the noise of the last few updates: each step's 16
rollouts are a small sample of the student's answers. Averaging the iterates of the last ~1/(1-decay) steps
removes part of that noise at no cost in sampling or teacher scoring (one fp32 copy of the LoRA weights, a
few MB). The average is bias-corrected like Adam's moments, so it is the weighted mean of steps 1..t only and
never pulls towards the zero-initialised adapter: after step t

    sum_BW = decay * sum_BW + (1 - decay) * weights_t,      average = sum_BW / (1 - decay**t)

Training itself never reads the average: the loop, its samples and its checkpoints' weights are those of a run
without it, so a compile can continue from any checkpoint and the average is rebuilt exactly from the saved sum.
"""

from __future__ import annotations

import torch


class WeightAverage:
    """The moving average of `params` (the trainable tensors, by name), updated once per training step."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), not {decay}")
        self.params = params
        self.decay = decay
        self.sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.sums[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def average(self) -> dict[str, torch.Tensor]:
        """The bias-corrected average of every update so far (the weights themselves before the first)."""
        if self.updates == 0:
            return {name: p.detach().float().clone() for name, p in self.params.items()}
        correction = 1.0 - self.decay ** self.updates
        return {name: s / correction for name, s in self.sums.items()}

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Replace the weights by their average (the end of training: what the artifact holds)."""
        for name, value in self.average().items():
            self.params[name].copy_(value.to(self.params[name].dtype))

    def state(self) -> dict[str, torch.Tensor]:
        """The running sums, for a checkpoint; `updates` is the checkpoint's step."""
        return {name: s.detach().cpu().contiguous() for name, s in self.sums.items()}

    def load_state(self, sums: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.sums) - set(sums)
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for name, s in self.sums.items():
            s.copy_(sums[name])
        self.updates = updates
