"""TAID's schedule (research ab-taid-amid §3.3) against a hand-written recurrence
(reference.TaidRecurrence), the published trajectory of §6.4, update_every="forward",
state_dict round trips, and t reaching the loss."""
from __future__ import annotations

import copy

import pytest
import torch

import kdplug
import reference as ref

LOSSES = ref.synthetic_losses(300)  # 0.5 + 2 exp(-n/80) + 0.05 sin(n/3)


def _trajectory(fn, losses, pass_loss=True):
    """t used at each step (read before the step's update), then step(loss)."""
    ts = []
    for loss in losses:
        t = fn.t
        assert isinstance(t, float)
        ts.append(t)
        fn.step(loss) if pass_loss else fn.step()
    return ts


def _rec_trajectory(rec, losses):
    ts = []
    for n, loss in enumerate(losses):
        ts.append(rec.t)
        rec.update(loss, global_step=n)
    return ts


CONFIGS = [
    dict(),
    dict(t_start=0.2),
    dict(step_size=5e-2, momentum=0.9),
    dict(adaptive=False),
    dict(step_size=5e-3, momentum=0.99, t_end=0.9),
]


@pytest.mark.parametrize("total_steps", [300, None])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_trajectory_matches_recurrence(cfg, total_steps):
    if total_steps is None and cfg.get("adaptive") is False:
        pytest.skip("adaptive=False needs total_steps")
    fn = kdplug.get("taid", total_steps=total_steps, **cfg)
    rec_cfg = {k: v for k, v in cfg.items() if k in ("t_start", "t_end", "step_size", "momentum", "adaptive")}
    rec = ref.TaidRecurrence(total_steps=total_steps, **rec_cfg)
    got = _trajectory(fn, LOSSES)
    expect = _rec_trajectory(rec, LOSSES)
    assert max(abs(a - b) for a, b in zip(got, expect)) < 1e-12
    assert abs(fn.t - rec.t) < 1e-12
    assert all(b >= a for a, b in zip(got, got[1:])), "t must never decrease"
    assert max(got) <= cfg.get("t_end", 1.0)


def test_linear_schedule_without_loss():
    fn = kdplug.get("taid", adaptive=False, total_steps=40, t_start=0.1, t_end=0.9)
    ts = _trajectory(fn, [None] * 45, pass_loss=False)
    for n, t in enumerate(ts):
        expect = 0.1 if n == 0 else min(0.9, 0.1 + 0.8 * (n - 1) / 40)
        assert abs(t - expect) < 1e-12, (n, t, expect)


# research §6.4: t used at step n (defaults, t_start 0.4, 300 steps) and with (5e-2, 0.9)
PUBLISHED = {
    "defaults": (dict(), {0: 0.4000, 1: 0.4000, 2: 0.4020, 50: 0.4980, 100: 0.5980, 150: 0.6980,
                          200: 0.7980, 250: 0.8980, 299: 0.9960}),
    "large_step": (dict(step_size=5e-2, momentum=0.9), {2: 0.4150, 50: 0.8273, 100: 0.9515, 150: 0.9864,
                                                       299: 0.9997}),
}


@pytest.mark.parametrize("which", sorted(PUBLISHED))
def test_published_trajectory(which):
    cfg, table = PUBLISHED[which]
    fn = kdplug.get("taid", total_steps=300, **cfg)
    got = _trajectory(fn, LOSSES)
    rec = _rec_trajectory(ref.TaidRecurrence(total_steps=300, **cfg), LOSSES)
    for n, value in table.items():
        assert abs(got[n] - value) < 1.5e-4, f"step {n}: t = {got[n]:.5f}, published {value}"
        assert abs(rec[n] - value) < 1.5e-4, f"(hand-written recurrence) step {n}: {rec[n]:.5f} vs {value}"
    # and the published t_lin row: t sits exactly one step behind the linear floor
    if which == "defaults":
        for n in (50, 100, 299):
            assert abs(got[n] - (0.4 + 0.6 * (n - 1) / 300)) < 1e-12


def test_first_step_only_records_the_loss():
    fn = kdplug.get("taid", step_size=0.5, momentum=0.0)
    fn.step(10.0)
    assert fn.t == 0.4
    fn.step(5.0)  # rel = 0.5, m = 0.5, delta = 0.5 sigmoid(0.5) (1 - 0.4)
    expect = 0.4 + 0.5 * (1 / (1 + torch.exp(torch.tensor(-0.5, dtype=torch.float64)).item())) * 0.6
    assert abs(fn.t - expect) < 1e-12


def test_a_non_finite_loss_changes_nothing():
    """A NaN or infinite loss (a mixed-precision step the gradient scaler skips) leaves t, the
    momentum and the previous loss as they were; the recurrence goes on from the last finite one."""
    a = kdplug.get("taid", step_size=0.5, momentum=0.5)
    b = kdplug.get("taid", step_size=0.5, momentum=0.5)
    for i, loss in enumerate(LOSSES[:12]):
        a.step(loss)
        b.step(loss)
        if i in (3, 7):
            b.step(float("nan"))
            b.step(torch.tensor(float("inf")))
    assert b.t == a.t and a.t > 0.4  # (NaN == NaN is False)
    with pytest.raises(ValueError, match="scalar loss"):
        a.step(torch.tensor([1.0, 2.0]))


def test_adaptive_step_needs_the_loss():
    fn = kdplug.get("taid")
    with pytest.raises((ValueError, TypeError), match="loss"):
        fn.step()


def test_step_accepts_tensors():
    a = kdplug.get("taid", total_steps=100, step_size=5e-2)
    b = kdplug.get("taid", total_steps=100, step_size=5e-2)
    for loss in LOSSES[:30]:
        x = torch.tensor(loss, requires_grad=True) * 1.0  # a graph-attached scalar
        a.step(x)
        b.step(float(x.detach()))
    assert a.t == b.t


def test_update_every_forward():
    """The recurrence runs inside every forward call with the reduced loss value (and the number
    of step() calls as the global step); step() only advances that counter."""
    cfg = dict(step_size=5e-2, momentum=0.9, total_steps=20, t_start=0.3)
    fn = kdplug.get("taid", update_every="forward", **cfg)
    rec = ref.TaidRecurrence(**{k: v for k, v in cfg.items() if k != "total_steps"}, total_steps=20)
    g = torch.Generator().manual_seed(3)
    global_step = 0
    for step in range(12):
        for micro in range(3):
            s = torch.randn(2, 4, 9, generator=g, dtype=torch.float64) * (2 + 0.1 * step)
            t = torch.randn(2, 4, 9, generator=g, dtype=torch.float64) * 2
            t_before = fn.t
            assert abs(t_before - rec.t) < 1e-12
            loss = fn(s, t)
            # the loss was computed with the t before the update
            expect_loss = ref.per_token("taid", s, t, taid_t=t_before).mean()
            torch.testing.assert_close(loss, expect_loss, rtol=1e-12, atol=1e-12)
            rec.update(loss.item(), global_step=global_step)
            assert abs(fn.t - rec.t) < 1e-12, f"step {step} micro {micro}: {fn.t} vs {rec.t}"
        before = fn.t
        fn.step(123.0)  # only advances the counter
        assert fn.t == before
        global_step += 1
    assert fn.t > 0.3


def test_update_every_step_forward_does_not_move_t():
    fn = kdplug.get("taid", step_size=0.5)
    s, t = ref.make_logits((3, 7), "finite", seed=4)
    for _ in range(5):
        fn(s, t)
    assert fn.t == 0.4


@pytest.mark.parametrize("update_every", ["step", "forward"])
def test_state_dict_round_trip(update_every):
    cfg = dict(step_size=5e-2, momentum=0.9, total_steps=200, update_every=update_every)
    a = kdplug.get("taid", **cfg)
    s, t = ref.make_logits((2, 3, 7), "finite", seed=5)

    def advance(fn, losses):
        out = []
        for loss in losses:
            if update_every == "forward":
                fn(s * (1 + loss), t)
                fn.step()
            else:
                fn.step(loss)
            out.append(fn.t)
        return out

    advance(a, LOSSES[:37])
    sd = copy.deepcopy(a.state_dict())
    b = kdplug.get("taid", **cfg)
    assert b.t != a.t
    b.load_state_dict(sd)
    assert b.t == a.t
    # the whole state (t, previous loss, momentum, step counter) came along
    assert advance(a, LOSSES[37:80]) == advance(b, LOSSES[37:80])


@pytest.mark.parametrize("value", ["ce", "kl"])
def test_t_reaches_the_math(value):
    fn = kdplug.get("taid", adaptive=False, total_steps=10, t_start=0.2, t_end=0.9, value=value,
                    reduction="none", temperature=1.5)
    s, t = ref.make_logits((3, 4, 11), "shared_inf", seed=6)
    mask = ref.random_mask((3, 4), 6)
    results = []
    for k in range(4):
        tt = fn.t
        x = s.clone().requires_grad_(True)
        out = fn(x, t, mask=mask)
        (g,) = torch.autograd.grad(out.sum(), x)
        y = s.clone().requires_grad_(True)
        r = ref.per_token("taid", y, t, temperature=1.5, mask=mask, value=value, taid_t=tt)
        (gr,) = torch.autograd.grad(r.sum(), y)
        torch.testing.assert_close(out, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12)
        results.append((tt, out.detach()))
        for _ in range(3):
            fn.step()
    ts = [x[0] for x in results]
    assert len(set(ts)) == 4, ts
    assert not torch.allclose(results[0][1], results[-1][1])


def test_t_is_in_state_dict_and_float():
    fn = kdplug.get("taid", t_start=0.25)
    assert isinstance(fn.t, float) and fn.t == 0.25
    sd = fn.state_dict()
    assert any(k.endswith("t") for k in sd), list(sd)
