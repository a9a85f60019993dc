"""DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p)."""
import kdplug
from kdplug import Assistant, Method, Recipe, Term

from ._checks import flag, number


def build(alpha: float = 0.1, detach_mixture: bool = False) -> Recipe:
    """``alpha`` is the student's weight in the mixture (alpha = 0 is reverse KL).
    ``detach_mixture=True`` stops the gradient through the mixture, as DistiLLM-2 does."""
    alpha = number("srkl", "alpha", alpha, 0.0, 1.0)
    detach = flag("srkl", "detach_mixture", detach_mixture)
    return Recipe(Term("student", "assistant"), assistant=Assistant(lam=1.0 - alpha, alpha=-1.0, detach=detach))


@kdplug.hookimpl
def register_methods(register):
    register(Method("srkl", build=build, aliases=("skew_rkl",),
                    summary="skew reverse KL(q || a q + (1-a) p)",
                    reference="Ko et al. 2024 (DistiLLM), arXiv:2402.03898"))
