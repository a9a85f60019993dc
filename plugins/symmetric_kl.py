"""Weighted sum of forward and reverse KL (DistiLLM's symmetric_kl)."""
import kdplug
from kdplug import Divergence, Method, Recipe, Term

from ._checks import choice, number


def build(lam: float = 0.9, form: str = "kl") -> Recipe:
    """(1 - lam) KL(p||q) + lam KL(q||p); ``form="ce"`` reports the forward part as -sum p log q,
    as DistiLLM's ``symmetric_kl`` does."""
    lam = number("symmetric_kl", "lam", lam, 0.0, 1.0)
    choice("symmetric_kl", "form", form, ("kl", "ce"))
    return Recipe((Term("teacher", "student", Divergence.KL if form == "kl" else Divergence.CE, weight=1 - lam),
                   Term("student", "teacher", weight=lam)))


@kdplug.hookimpl
def register_methods(register):
    register(Method("symmetric_kl", build=build, aliases=("sym_kl",),
                    summary="(1-lam) KL(p||q) + lam KL(q||p)",
                    reference="jongwooko/distillm distillm/losses.py symmetric_kl"))
