"""LAMB against a step computed by hand, the warm-up + polynomial-decay schedule, parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from fastbert.config import BertConfig
from fastbert.modeling import BertForPreTraining
from train.optim import Lamb, build_optimizer, build_scheduler, param_groups, warmup_poly_factor

LR, B1, B2, EPS, WD = 0.1, 0.9, 0.99, 1e-6, 0.1


def lamb_by_hand(w, grads, decay: bool, adapt: bool):
    """The LAMB update written out element by element with Python floats."""
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    w = list(w)
    for t, g in enumerate(grads, start=1):
        if g is None:  # no gradient at this step: nothing changes, but the group's count t still advances
            continue
        m = [B1 * mi + (1 - B1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [B2 * vi + (1 - B2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        u = [(mi / (1 - B1**t)) / (math.sqrt(vi / (1 - B2**t)) + EPS) for mi, vi in zip(m, v, strict=True)]
        if decay:
            u = [ui + WD * wi for ui, wi in zip(u, w, strict=True)]
        ratio = 1.0
        if adapt:
            w_norm = math.sqrt(sum(x * x for x in w))
            u_norm = math.sqrt(sum(x * x for x in u))
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        w = [wi - LR * ratio * ui for wi, ui in zip(w, u, strict=True)]
    return w


@pytest.mark.parametrize("always_adapt", [False, True])
def test_lamb_matches_hand_computation(always_adapt):
    w0, b0, z0 = [1.0, -2.0, 2.0], [0.3, -0.1], [0.0, 0.0]
    gw = [[0.5, 0.1, -0.2], [-0.3, 0.4, 0.05], [0.2, 0.2, 0.2]]
    gb = [[0.01, -0.02], [0.5, 0.0], [-0.1, 0.3]]
    gz = [[0.1, -0.1], [0.2, 0.1], [0.0, 0.3]]
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(z0, dtype=torch.float64, requires_grad=True)  # zero weight: trust ratio falls back to 1
    opt = Lamb([{"params": [w, z], "weight_decay": WD}, {"params": [b], "weight_decay": 0.0}],
               lr=LR, betas=(B1, B2), eps=EPS, always_adapt=always_adapt)
    for step in range(3):
        w.grad = torch.tensor(gw[step], dtype=torch.float64)
        b.grad = torch.tensor(gb[step], dtype=torch.float64)
        z.grad = torch.tensor(gz[step], dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(w, torch.tensor(lamb_by_hand(w0, gw, True, True), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    # No weight decay: a plain Adam step (NVIDIA's rule) unless always_adapt (the paper's).
    torch.testing.assert_close(b, torch.tensor(lamb_by_hand(b0, gb, False, always_adapt), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    # z starts at 0, so step 1 uses ratio 1; afterwards ‖z‖ > 0 and the ratio applies.
    torch.testing.assert_close(z, torch.tensor(lamb_by_hand(z0, gz, True, True), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert not torch.equal(w.detach(), torch.tensor(lamb_by_hand(w0, gw, True, False), dtype=torch.float64))


def test_lamb_step_count_is_per_group_when_a_parameter_skips_a_step():
    # s has no gradient at steps 2 and 3 (an unused embedding row, a frozen branch): apex's FusedLAMB keeps one
    # counter per group, so s's third update uses t = 4 in the bias correction, not its own count of 2.
    w0, s0 = [1.0, -2.0, 2.0], [0.5, 0.25]
    gw = [[0.5, 0.1, -0.2], [-0.3, 0.4, 0.05], [0.2, 0.2, 0.2], [0.1, -0.4, 0.3]]
    gs = [[0.1, -0.1], None, None, [0.3, 0.2]]
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    opt = Lamb([{"params": [s, w], "weight_decay": WD}], lr=LR, betas=(B1, B2), eps=EPS)  # s first on purpose
    seen = []
    for step in range(4):
        w.grad = torch.tensor(gw[step], dtype=torch.float64)
        s.grad = None if gs[step] is None else torch.tensor(gs[step], dtype=torch.float64)
        before = s.detach().clone()
        opt.step()
        seen.append(torch.equal(before, s.detach()))
    assert seen == [False, True, True, False]  # untouched while it has no gradient
    assert opt.param_groups[0]["step"] == 4
    torch.testing.assert_close(w, torch.tensor(lamb_by_hand(w0, gw, True, True), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, torch.tensor(lamb_by_hand(s0, gs, True, True), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    # The count of its own updates (the old rule) gives a different result.
    own = lamb_by_hand(s0, [gs[0], gs[3]], True, True)
    assert not torch.allclose(s.detach(), torch.tensor(own, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # The counter is saved with the optimizer and restored.
    again = Lamb([{"params": [s, w], "weight_decay": WD}], lr=LR, betas=(B1, B2), eps=EPS)
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["step"] == 4


def test_lamb_first_step_value():
    # Step 1: m̂ = g, v̂ = g², so u = g / (|g| + ε) + λ·w; checked against numbers written out by hand.
    w = torch.tensor([3.0, 4.0], requires_grad=True)  # ‖w‖ = 5
    w.grad = torch.tensor([2.0, -1.0])
    Lamb([w], lr=0.5, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.5).step()
    u = [1.0 + 1.5, -1.0 + 2.0]  # [2.5, 1.0], ‖u‖ = √7.25
    r = 5.0 / math.sqrt(7.25)
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.5 * r * u[0], 4.0 - 0.5 * r * u[1]]))


def test_lamb_rejects_bad_arguments():
    p = [torch.zeros(2, requires_grad=True)]
    for kw, match in ((dict(lr=0.0), "lr"), (dict(betas=(1.0, 0.9)), "betas"), (dict(eps=0.0), "eps"),
                      (dict(weight_decay=-1.0), "weight_decay")):
        with pytest.raises(ValueError, match=match):
            Lamb(p, **kw)


def test_schedule_values():
    f = [warmup_poly_factor(s, 4, 10, 1.0) for s in range(12)]
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0, 0.0]
    assert f == pytest.approx(expected)
    assert [warmup_poly_factor(s, 0, 4, 0.5) for s in range(4)] == pytest.approx([1, 0.75**0.5, 0.5**0.5, 0.5])
    # Through LambdaLR, the lr of update k is lr · factor(k).
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=10, power=1.0)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2 * x for x in expected[:10]])
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, 11, 10)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, 0, 0)


def test_param_groups_and_builders():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16).with_fusions(False)
    model = BertForPreTraining(cfg)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("LayerNorm" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    assert all(p.dim() == 2 for p in decay["params"])
    n_all = len(list(model.parameters()))
    assert len(decay["params"]) + len(no_decay["params"]) == n_all  # tied decoder weight counted once
    assert isinstance(build_optimizer(model, "lamb", 1e-3, 0.01), Lamb)
    assert isinstance(build_optimizer(model, "adamw", 1e-3, 0.01), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(model, "sgd", 1e-3, 0.01)
