"""ABKD: the alpha-beta divergence between teacher and student.

    D_AB(p || q) = -1/(alpha beta) sum [p^alpha q^beta - alpha/(alpha+beta) p^(alpha+beta)
                                        - beta/(alpha+beta) q^(alpha+beta)]

with its continuous limits at alpha = 0, beta = 0 and alpha = beta = 0. (1, 0) is forward KL,
(0, 1) reverse KL, (1/2, 1/2) four times the squared Hellinger distance. alpha tunes how the
error is transformed (hardness), beta how classes are weighted by the student's confidence.
"""
import kdplug
from kdplug import Divergence, Method, Recipe, Term

from ._checks import choice, number


def build(alpha: float = 0.2, beta: float = 0.7, limit_scale: str = "continuous") -> Recipe:
    """``limit_scale="abkd_repo"`` reproduces ghwang-s/abkd, whose alpha = 0 and beta = 0
    branches are the continuous ones multiplied by beta and alpha respectively."""
    alpha = number("abkd", "alpha", alpha, 0.0)
    beta = number("abkd", "beta", beta, 0.0)
    choice("abkd", "limit_scale", limit_scale, ("continuous", "abkd_repo"))
    weight = 1.0
    if limit_scale == "abkd_repo":
        if alpha == 0.0 and beta != 0.0:
            weight = beta
        elif beta == 0.0 and alpha != 0.0:
            weight = alpha
    return Recipe(Term("teacher", "student", Divergence.AB, weight=weight, ab_alpha=alpha, ab_beta=beta))


@kdplug.hookimpl
def register_methods(register):
    register(Method("abkd", build=build, aliases=("ab", "alpha_beta"),
                    summary="alpha-beta divergence D_AB(p||q)",
                    reference="Wang et al. 2025 (ABKD), arXiv:2505.04560"))
