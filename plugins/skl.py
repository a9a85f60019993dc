"""DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q)."""
import kdplug
from kdplug import Assistant, Divergence, Method, Recipe, Term

from ._checks import choice, number


def build(alpha: float = 0.1, form: str = "kl") -> Recipe:
    """``alpha`` is the teacher's weight in the mixture (alpha = 0 is forward KL).
    ``form="ce"`` reports -sum p log m, the value of DistiLLM's ``skewed_forward_kl``."""
    alpha = number("skl", "alpha", alpha, 0.0, 1.0)
    choice("skl", "form", form, ("kl", "ce"))
    return Recipe(Term("teacher", "assistant", Divergence.KL if form == "kl" else Divergence.CE),
                  assistant=Assistant(lam=alpha, alpha=-1.0))


@kdplug.hookimpl
def register_methods(register):
    register(Method("skl", build=build, aliases=("sfkl", "skew_kl", "skew_fkl"),
                    summary="skew KL(p || a p + (1-a) q)",
                    reference="Ko et al. 2024 (DistiLLM), arXiv:2402.03898"))
