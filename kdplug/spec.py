"""The plugin-facing types: a method is data (a :class:`Recipe`) plus a little metadata.

A :class:`Recipe` describes one per-token loss as

    loss = sum_i weight_i * D_i(lhs_i || rhs_i)

over the three distributions of a token, the teacher ``p = softmax(t / T)``, the student
``q = softmax(s / T)`` and an optional assistant ``r`` built from both (:class:`Assistant`).
Each :class:`Term` names its two operands and a divergence from a small closed family
(:class:`Divergence`). The compiled core and the PyTorch path both evaluate any recipe, so a
method described this way gets the fused kernel without writing one.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch

__all__ = [
    "Assistant",
    "Divergence",
    "HeadTailWeights",
    "Method",
    "Operand",
    "Recipe",
    "Schedule",
    "Split",
    "Term",
]

# A number in a recipe is a Python float, a 0-dim tensor (a value that changes between calls
# without recompiling anything), or the name of a value published by the method's schedule.
Number = Union[float, torch.Tensor, str]


class Operand(str, enum.Enum):
    """One side of a divergence ``D(lhs || rhs)``."""

    TEACHER = "teacher"      # p = softmax(teacher_logits / T)
    STUDENT = "student"      # q = softmax(student_logits / T)
    ASSISTANT = "assistant"  # r, see Assistant


class Divergence(str, enum.Enum):
    """The per-element divergences the core evaluates (formulas in ``csrc/kdplug_math.h``)."""

    KL = "kl"    # sum P (log P - log Q)
    CE = "ce"    # -sum P log Q (KL plus the entropy of P; DistiLLM's "forward KL" value)
    AB = "ab"    # alpha-beta divergence with (ab_alpha, ab_beta), continuous at its limits
    TVD = "tvd"  # sum |P - Q| / 2


def _check_number(owner: str, name: str, value: Any) -> Number:
    if isinstance(value, str):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{owner}.{name}: expected a float or a 1-element float tensor, "
                            f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{name}: expected a finite number, got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Term:
    """``weight * divergence(lhs || rhs)``, summed over the vocabulary.

    Args:
        lhs, rhs: the operands (:class:`Operand` or its string value).
        divergence: :class:`Divergence` (or its string value).
        weight: a non-negative number (or a schedule value's name).
        ab_alpha, ab_beta: the parameters of ``Divergence.AB`` (both >= 0).
    """

    lhs: Operand
    rhs: Operand
    divergence: Divergence = Divergence.KL
    weight: Number = 1.0
    ab_alpha: float = 1.0
    ab_beta: float = 0.0

    def __post_init__(self):
        try:
            object.__setattr__(self, "lhs", Operand(self.lhs))
            object.__setattr__(self, "rhs", Operand(self.rhs))
        except ValueError:
            raise ValueError(f"Term: operands must be one of {[o.value for o in Operand]}, "
                             f"got lhs={self.lhs!r}, rhs={self.rhs!r}") from None
        try:
            object.__setattr__(self, "divergence", Divergence(self.divergence))
        except ValueError:
            raise ValueError(f"Term.divergence: expected one of {[d.value for d in Divergence]}, "
                             f"got {self.divergence!r}") from None
        if self.lhs == self.rhs:
            raise ValueError(f"Term: lhs and rhs are both {self.lhs.value!r}; the divergence "
                             "of a distribution from itself is identically 0")
        weight = _check_number("Term", "weight", self.weight)
        if isinstance(weight, float) and weight < 0:
            raise ValueError(f"Term.weight: expected >= 0, got {weight}")
        object.__setattr__(self, "weight", weight)
        for name in ("ab_alpha", "ab_beta"):
            value = _check_number("Term", name, getattr(self, name))
            if not isinstance(value, float):
                raise TypeError(f"Term.{name}: expected a float")
            if value < 0:
                raise ValueError(f"Term.{name}: expected >= 0, got {value}")
            object.__setattr__(self, name, value)


@dataclasses.dataclass(frozen=True)
class Assistant:
    """An assistant distribution ``r`` between the teacher ``p`` and the student ``q``.

    The alpha-mixture of AMiD (arXiv:2510.15982), with ``a = (1 - alpha) / 2``:

        r ∝ (lam * p**a + (1 - lam) * q**a) ** (1 / a)

    ``alpha = -1`` is the arithmetic mixture ``lam p + (1 - lam) q`` (DistiLLM's skew KL,
    the generalized JSD), ``alpha = 1`` the geometric one ``p**lam q**(1 - lam)`` (TAID's
    logit interpolation), ``alpha > 1`` a power mean that tends to ``min(p, q)``.

    Args:
        lam: weight of the teacher, in [0, 1] (a schedule value's name for TAID's ``t``).
        alpha: the mixture exponent (any finite number).
        detach: treat ``r`` as a constant when differentiating (TAID, DistiLLM-2's SRKL).
    """

    lam: Number = 0.5
    alpha: float = -1.0
    detach: bool = False

    def __post_init__(self):
        lam = _check_number("Assistant", "lam", self.lam)
        if isinstance(lam, float) and not 0.0 <= lam <= 1.0:
            raise ValueError(f"Assistant.lam: expected a value in [0, 1], got {lam}")
        object.__setattr__(self, "lam", lam)
        alpha = _check_number("Assistant", "alpha", self.alpha)
        if not isinstance(alpha, float):
            raise TypeError("Assistant.alpha: expected a float")
        object.__setattr__(self, "alpha", alpha)
        if not isinstance(self.detach, bool):  # (a truthy "False" would detach)
            raise TypeError(f"Assistant.detach: expected True or False, got {self.detach!r}")


# The layout of the per-token term weights function's result: [..., len(terms)].
TokenWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class HeadTailWeights:
    """Token weights as data: AKL's (w_head, w_tail) for a recipe's two terms, which the compiled
    core computes itself on the CPU (``csrc/cpu/head_tail_rows.cpp``); called, it is the PyTorch
    version (``kdplug._head_tail``, which has the rule).

    The head splits each token's vocabulary by the teacher's probabilities p; with the gaps
    ``g = sum |p - q|`` over the head and over the tail, ``w = (g_head, g_tail) / (g_head + g_tail)``
    (1/2 each when p == q).

    Args:
        mu: the head's probability budget, in (0, 1).
        order: ``"descending"`` (AKL: the head is the most probable entries whose cumulative
            probability stays <= mu, at least one) or ``"ascending"`` (KDFlow: the tail is the
            least probable entries whose cumulative probability stays <= mu).
    """

    mu: float = 0.5
    order: str = "descending"

    def __post_init__(self):
        mu = _check_number("HeadTailWeights", "mu", self.mu)
        if not isinstance(mu, float) or not 0.0 < mu < 1.0:
            raise ValueError(f"HeadTailWeights.mu: expected a float in (0, 1), got {self.mu!r}")
        object.__setattr__(self, "mu", mu)
        if self.order not in ("descending", "ascending"):
            raise ValueError(f"HeadTailWeights.order: expected 'descending' or 'ascending', got {self.order!r}")

    def __call__(self, log_p_teacher: torch.Tensor, log_q_student: torch.Tensor) -> torch.Tensor:
        from ._head_tail import head_tail_weights

        return head_tail_weights(log_p_teacher, log_q_student, mu=self.mu, order=self.order)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A method as data: what the compiled core and the PyTorch path evaluate.

    Args:
        terms: one or more :class:`Term`; the per-token loss is their weighted sum.
        assistant: the :class:`Assistant` that ``Operand.ASSISTANT`` refers to.
        token_weights: optional ``f(log_p_teacher, log_q_student) -> [n, len(terms)]``
            computed in PyTorch on detached log-probabilities ``[n, V]`` (already divided by the
            temperature); multiplies each term's weight per token (AKL's head/tail split). It is
            called on blocks of rows (n <= N, a few MiB each), so a token's weights must depend on
            its own row only. :class:`HeadTailWeights` (for two terms) is such a function that the
            compiled core also evaluates in C++.
    """

    terms: tuple[Term, ...]
    assistant: Assistant | None = None
    token_weights: TokenWeights | None = None

    def __post_init__(self):
        terms = tuple(self.terms) if not isinstance(self.terms, Term) else (self.terms,)
        if not terms or not all(isinstance(t, Term) for t in terms):
            raise TypeError("Recipe.terms: expected one or more kdplug.Term")
        object.__setattr__(self, "terms", terms)
        uses_assistant = any(Operand.ASSISTANT in (t.lhs, t.rhs) for t in terms)
        if uses_assistant and self.assistant is None:
            raise ValueError("Recipe: a term uses Operand.ASSISTANT but no assistant is given")
        if isinstance(self.token_weights, HeadTailWeights) and len(terms) != 2:
            raise ValueError(f"Recipe: HeadTailWeights weights two terms (head, tail), the recipe has {len(terms)}")
        if self.assistant is not None and not isinstance(self.assistant, Assistant):
            raise TypeError("Recipe.assistant: expected a kdplug.Assistant")
        for term in terms:
            if term.divergence is Divergence.CE and (
                term.lhs is Operand.STUDENT
                or (term.lhs is Operand.ASSISTANT and not self.assistant.detach)
            ):
                # CE = KL + H(lhs); its gradient equals KL's only while H(lhs) is constant.
                raise ValueError("Recipe: Divergence.CE needs a left operand that does not depend "
                                 "on the student (the teacher, or a detached assistant)")

    def names(self) -> set[str]:
        """Schedule value names this recipe refers to."""
        numbers = [t.weight for t in self.terms]
        if self.assistant is not None:
            numbers.append(self.assistant.lam)
        return {n for n in numbers if isinstance(n, str)}


@dataclasses.dataclass(frozen=True)
class Split:
    """Two recipes for two kinds of sequences, chosen per sequence at call time.

    ``loss_fn(..., **{by: flags})`` with a boolean per sequence (the first dimension of the
    logits) evaluates ``if_true`` on the flagged sequences and ``if_false`` on the others.
    DistiLLM-2 uses it for teacher- vs student-generated responses.
    """

    by: str
    if_false: Recipe
    if_true: Recipe
    reduction: str | None = None  # the method's default reduction, if it has one

    def __post_init__(self):
        if not self.by.isidentifier():
            raise ValueError(f"Split.by: expected a keyword name, got {self.by!r}")
        for name in ("if_false", "if_true"):
            if not isinstance(getattr(self, name), Recipe):
                raise TypeError(f"Split.{name}: expected a kdplug.Recipe")


class Schedule(torch.nn.Module):
    """State that changes during training (TAID's interpolation ``t``).

    Subclasses keep their state in buffers (saved in the loss module's ``state_dict`` and
    moved by ``.to()``), publish the current values with :meth:`value`, and advance with
    :meth:`step`, which :class:`~kdplug.KDLoss` calls from ``loss_fn.step(loss)`` once per
    optimizer step. :meth:`on_forward` sees every forward's detached loss (a no-op unless a
    schedule reproduces an upstream that updates per forward). Values reach the math as
    tensors, so a changing value never recompiles a graph.
    """

    def value(self) -> Mapping[str, torch.Tensor]:
        """The current values, by the names recipes use for them."""
        raise NotImplementedError

    def step(self, loss: torch.Tensor | None = None) -> None:
        """Advance after an optimizer step, given that step's detached loss."""
        raise NotImplementedError

    def on_forward(self, loss: torch.Tensor) -> None:
        """Called with every forward's detached, reduced loss."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A named distillation method, as a plugin registers it.

    The keyword parameters of ``build`` (or, without ``build``, of ``torch_loss`` after its two
    leading log-probability arguments) are the method's parameters: ``kdplug.get(name, **params)``
    binds them.

    Args:
        name: the registry name (lower case, a Python identifier).
        build: ``build(**params) -> Recipe | Split``; raises ``ValueError`` naming a parameter
            that is out of range. Called once per ``kdplug.get``.
        torch_loss: ``torch_loss(log_p_teacher, log_q_student, **params) -> [N]`` per-token
            loss for math the core cannot express; autograd gives the gradient. With ``build``
            as well, it is the method's reference implementation.
        schedule: ``schedule(**params) -> Schedule`` for stateful methods.
        aliases: other names accepted by ``kdplug.get``.
        reference: where the method comes from (paper, arXiv id, code).
        summary: one line for ``kdplug list``.
    """

    name: str
    build: Callable[..., Recipe | Split] | None = None
    torch_loss: Callable[..., torch.Tensor] | None = None
    schedule: Callable[..., Schedule] | None = None
    aliases: tuple[str, ...] = ()
    reference: str = ""
    summary: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"Method.name: expected a lower-case identifier, got {self.name!r}")
        if self.build is None and self.torch_loss is None:
            raise ValueError(f"Method {self.name!r}: give build=, torch_loss= or both")
        object.__setattr__(self, "aliases", tuple(self.aliases))
        self.parameters()  # validates the signature early

    def parameters(self) -> dict[str, Any]:
        """The method's parameters and their defaults (``inspect.Parameter.empty`` if none)."""
        if self.build is not None:
            params = list(inspect.signature(self.build).parameters.values())
        else:
            params = list(inspect.signature(self.torch_loss).parameters.values())
            if len(params) < 2 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                                      for p in params[:2]):
                raise TypeError(f"Method {self.name!r}: torch_loss must take "
                                "(log_p_teacher, log_q_student, **params)")
            params = params[2:]
        out = {}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise TypeError(f"Method {self.name!r}: parameters must be plain keywords, "
                                f"got {p}")
            out[p.name] = p.default
        return out
