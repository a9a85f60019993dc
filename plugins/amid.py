"""AMiD: distillation through an alpha-mixture assistant distribution.

    a = (1 - alpha) / 2
    r ∝ (lam p^a + (1 - lam) q^a)^(1/a)       (alpha = -1: lam p + (1-lam) q; alpha = 1: p^lam q^(1-lam))
    loss = D(first || second)                  order "pr" = D(p || r), "qr", "rp", "rq"

D is the alpha-beta divergence with (ab_alpha, ab_beta) (``divergence="ab"``, the published
scripts' choice) or KL (``divergence="kl"``). The gradient flows through ``r`` to the student.
``alpha >= 1`` uses the geometric mixture, as the reference code does (``alpha_ge_1="geometric"``);
``alpha_ge_1="power_mean"`` keeps the formula above for alpha > 1 (a power mean tending to min(p, q)).
The reference code hard-codes ab_alpha = 0.2, ab_beta = 0.7; here they are parameters.
"""
import kdplug
from kdplug import Assistant, Divergence, Method, Recipe, Term

from ._checks import choice, number

_OPERAND = {"p": "teacher", "q": "student", "r": "assistant"}


def build(alpha: float = 0.5, lam: float = 0.5, divergence: str = "ab", order: str = "pr",
          ab_alpha: float = 0.2, ab_beta: float = 0.7, alpha_ge_1: str = "geometric") -> Recipe:
    alpha = number("amid", "alpha", alpha)
    lam = number("amid", "lam", lam, 0.0, 1.0)
    choice("amid", "divergence", divergence, ("ab", "kl"))
    choice("amid", "order", order, ("pr", "qr", "rp", "rq"))
    ab_alpha = number("amid", "ab_alpha", ab_alpha, 0.0)
    ab_beta = number("amid", "ab_beta", ab_beta, 0.0)
    choice("amid", "alpha_ge_1", alpha_ge_1, ("geometric", "power_mean"))
    if alpha >= 1.0 and alpha_ge_1 == "geometric":
        alpha = 1.0
    if divergence == "ab":
        term = Term(_OPERAND[order[0]], _OPERAND[order[1]], Divergence.AB, ab_alpha=ab_alpha, ab_beta=ab_beta)
    else:
        term = Term(_OPERAND[order[0]], _OPERAND[order[1]], Divergence.KL)
    return Recipe(term, assistant=Assistant(lam=lam, alpha=alpha))


@kdplug.hookimpl
def register_methods(register):
    register(Method("amid", build=build,
                    summary="divergence to an alpha-mixture assistant of teacher and student",
                    reference="Shin et al. 2025 (AMiD), arXiv:2510.15982; aailab-kaist/AMiD"))
