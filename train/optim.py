"""Optimizers and learning-rate schedule for pretraining: LAMB (written here — torch has none), AdamW, and
linear warm-up followed by polynomial decay.

LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), with NVIDIA's BERT semantics:

    m ← β1·m + (1−β1)·g            v ← β2·v + (1−β2)·g²
    m̂ = m / (1−β1^t)              v̂ = v / (1−β2^t)                  (bias correction)
    u = m̂ / (√v̂ + ε) + λ·w                                          (decoupled weight decay λ)
    r = ‖w‖ / ‖u‖   (1 when either norm is 0)                        (layer-wise trust ratio)
    w ← w − lr · r · u

As NVIDIA's FusedLAMB (and its BERT recipe), the trust ratio is applied only to parameter groups with weight
decay — biases and LayerNorm weights (decay 0) take a plain Adam step — unless `always_adapt=True` (the
paper's form, "NVLAMB"). Gradient clipping by the global norm is done by the training loop before `step()`.

The step count t is one counter per parameter group, advanced by every `step()` call (apex's FusedLAMB keeps
`group["step"]` the same way): a parameter that has no gradient at some step keeps its moments and weights
unchanged, and its next update uses the group's t in the bias correction, not a count of its own updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class Lamb(torch.optim.Optimizer):
    """LAMB; see the module docstring for the update. Works on any device; state is fp32 like the params."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        always_adapt: bool = False,
    ):
        if not lr > 0.0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, always_adapt=always_adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if "step" not in group:  # a state saved before the counter moved to the group: its params' count
                group["step"] = max((int(self.state[p].get("step", 0)) for p in group["params"]), default=0)
            group["step"] += 1
            t = group["step"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise ValueError("Lamb does not support sparse gradients")
            beta1, beta2 = group["betas"]
            grads, exp_avgs, exp_avg_sqs = [], [], []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state.pop("step", None)  # the count lives in the group
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            # Moments, batched over the group with foreach kernels (a handful of launches, no host syncs).
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m ← β1·m + (1−β1)·g
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)  # v ← β2·v + (1−β2)·g²
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))  # √v̂
            torch._foreach_add_(denom, group["eps"])
            updates = torch._foreach_div(exp_avgs, denom)
            torch._foreach_div_(updates, 1 - beta1 ** t)  # m̂ / (√v̂ + ε)
            if group["weight_decay"] != 0.0:
                torch._foreach_add_(updates, params, alpha=group["weight_decay"])  # + λ·w
            if group["weight_decay"] != 0.0 or group["always_adapt"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(updates))
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                scale = (ratio * -group["lr"]).unbind()  # −lr · r per parameter, still on the device
                torch._foreach_mul_(updates, [s.to(u.dtype) for s, u in zip(scale, updates, strict=True)])
                torch._foreach_add_(params, updates)
            else:
                torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of linear layers / embeddings decay; biases and LayerNorm parameters do not (as in
    BERT). Tied parameters appear once."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() already skips the tied duplicate
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> torch.optim.Optimizer:
    """'lamb' (this file) or 'adamw' (torch's, fused on CUDA)."""
    groups = param_groups(model, weight_decay)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        on_cuda = next(model.parameters()).is_cuda
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=on_cuda)
    raise ValueError(f"optimizer must be 'lamb' or 'adamw', got {name!r}")


def warmup_poly_factor(step: int, warmup_steps: int, total_steps: int, power: float = 1.0) -> float:
    """Multiplier of the peak lr for optimizer update number `step` (0-based).

    Warm-up: (step + 1) / warmup_steps, reaching 1 at the last warm-up step; then
    (1 − (step − warmup) / (total − warmup)) ** power, which decays towards 0 at `total_steps`
    (power 1 = linear decay; NVIDIA's LAMB recipe uses 0.5). Past total_steps: 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    return (1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps)) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, power: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `warmup_poly_factor`; call `scheduler.step()` after each `optimizer.step()`."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_poly_factor(s, warmup_steps, total_steps, power)
    )
