"""Forward KL, KL(p || q): mean-seeking; the classic distillation loss."""
import kdplug
from kdplug import Divergence, Method, Recipe, Term

from ._checks import choice


def build(form: str = "kl") -> Recipe:
    """``form="kl"``: sum p (log p - log q). ``form="ce"``: -sum p log q, the value DistiLLM,
    MiniLLM and TAID's code report (KL plus the teacher's entropy; same gradient)."""
    choice("fkl", "form", form, ("kl", "ce"))
    return Recipe(Term("teacher", "student", Divergence.KL if form == "kl" else Divergence.CE))


@kdplug.hookimpl
def register_methods(register):
    register(Method("fkl", build=build, aliases=("kl", "forward_kl"),
                    summary="forward KL(p||q), mean-seeking",
                    reference="Hinton et al. 2015, arXiv:1503.02531"))
