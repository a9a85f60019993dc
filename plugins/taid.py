"""TAID: distill towards an interpolation that moves from the student to the teacher.

    r_t = softmax(((1 - t) stopgrad(s) + t * teacher_logits) / T)      (no gradient through r_t)
    loss = -sum r_t log q   (value="ce", the reference code's value, which its schedule reads)
         or sum r_t (log r_t - log q)   (value="kl"; same gradient)

``t`` starts at ``t_start`` and grows towards ``t_end``: after each optimizer step,
``loss_fn.step(loss)`` applies the reference recurrence

    rel = (prev_loss - loss) / (prev_loss + 1e-15)
    m   = momentum * m + (1 - momentum) * rel
    t   = min(t_end, max(t_lin, t + step_size * sigmoid(m) * (1 - t)))
    t_lin = t_start + (t_end - t_start) * step / total_steps     (t_start when total_steps is None)

(the first call only records the loss; a NaN or infinite loss, a step the gradient scaler of mixed
precision skips, changes nothing). ``adaptive=False`` follows ``t_lin`` alone and needs
``total_steps``; the loss may then be omitted. The loss is averaged across ranks when
torch.distributed is initialized. ``update_every="forward"`` reproduces SakanaAI/TAID, which
updates on every forward call (micro-batches and validation too, per rank) with the step count
that ``loss_fn.step()`` advances. ``t`` is ``loss_fn.t`` and is saved in ``state_dict()``.
"""
import torch

import kdplug
from kdplug import Assistant, Divergence, Method, Recipe, Schedule, Term

from ._checks import choice, flag, number


def _validate(t_start, t_end, step_size, momentum, adaptive, total_steps, value, update_every):
    t_start = number("taid", "t_start", t_start, 0.0, 1.0)
    t_end = number("taid", "t_end", t_end, 0.0, 1.0)
    if t_end < t_start:
        raise ValueError(f"taid: t_end must be >= t_start, got t_start={t_start}, t_end={t_end}")
    number("taid", "step_size", step_size, 0.0)
    number("taid", "momentum", momentum, 0.0, 1.0)
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps < 1):
        raise ValueError(f"taid: total_steps must be a positive int or None, got {total_steps!r}")
    flag("taid", "adaptive", adaptive)
    if not adaptive and total_steps is None:
        raise ValueError("taid: adaptive=False follows the linear schedule and needs total_steps")
    choice("taid", "value", value, ("ce", "kl"))
    choice("taid", "update_every", update_every, ("step", "forward"))


def build(t_start: float = 0.4, t_end: float = 1.0, step_size: float = 5e-4, momentum: float = 0.99,
          adaptive: bool = True, total_steps: int | None = None, value: str = "ce",
          update_every: str = "step") -> Recipe:
    _validate(t_start, t_end, step_size, momentum, adaptive, total_steps, value, update_every)
    return Recipe(Term("assistant", "student", Divergence.CE if value == "ce" else Divergence.KL),
                  assistant=Assistant(lam="t", alpha=1.0, detach=True))


class TAIDSchedule(Schedule):
    def __init__(self, t_start=0.4, t_end=1.0, step_size=5e-4, momentum=0.99, adaptive=True,
                 total_steps=None, value="ce", update_every="step"):
        super().__init__()
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.step_size, self.beta = float(step_size), float(momentum)
        self.adaptive, self.total_steps = bool(adaptive), total_steps
        self.per_forward = update_every == "forward"
        self.register_buffer("t", torch.tensor(self.t_start, dtype=torch.float64))
        self.register_buffer("prev_loss", torch.tensor(float("inf"), dtype=torch.float64))
        self.register_buffer("momentum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    def value(self):
        return {"t": self.t}

    def _t_lin(self):
        if self.total_steps is None:
            return torch.full_like(self.t, self.t_start)
        return self.t_start + (self.t_end - self.t_start) * self.steps.to(self.t.dtype) / self.total_steps

    @torch.no_grad()
    def _update(self, loss):
        t_lin = self._t_lin()
        if not self.adaptive:
            self.t.copy_(t_lin.clamp(max=self.t_end))
            return
        if loss is None:
            raise ValueError("taid: adaptive=True needs the step's loss: loss_fn.step(loss)")
        loss = torch.as_tensor(loss, dtype=torch.float64, device=self.t.device).detach()
        if loss.numel() != 1:
            raise ValueError(f"taid: step(loss) takes the step's scalar loss, got shape {tuple(loss.shape)}")
        loss = loss.reshape(())
        first = torch.isinf(self.prev_loss)
        # NB: a NaN or infinite loss (a mixed-precision step that the gradient scaler skips) changes
        # nothing: taken into the recurrence, a NaN would make t NaN for the rest of training
        skip = ~torch.isfinite(loss)
        rel = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        momentum = self.beta * self.momentum + (1 - self.beta) * rel
        delta = self.step_size * torch.sigmoid(momentum) * (1 - self.t)
        t = torch.clamp(torch.maximum(t_lin, self.t + delta), max=self.t_end)
        self.t.copy_(torch.where(first | skip, self.t, t))
        self.momentum.copy_(torch.where(first | skip, self.momentum, momentum))
        self.prev_loss.copy_(torch.where(skip, self.prev_loss, loss))

    def on_forward(self, loss):
        if self.per_forward:
            self._update(loss)

    @torch.no_grad()
    def step(self, loss=None):
        if not self.per_forward:
            if loss is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
                loss = torch.as_tensor(loss, dtype=torch.float64, device=self.t.device).clone()
                torch.distributed.all_reduce(loss)
                loss = loss / torch.distributed.get_world_size()
            self._update(loss)
        self.steps += 1


@kdplug.hookimpl
def register_methods(register):
    register(Method("taid", build=build, schedule=TAIDSchedule,
                    summary="KL/CE to an adaptive student->teacher interpolation (t scheduled)",
                    reference="Shing et al. 2025 (TAID, ICLR), arXiv:2501.16937; SakanaAI/TAID"))
