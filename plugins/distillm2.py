"""DistiLLM-2's contrastive loss: skew KL on teacher responses, skew reverse KL on student ones.

    teacher-generated sequence i:  a_i = mean_t KL(p || alpha_1 p + (1 - alpha_1) q)
    student-generated sequence i:  b_i = mean_t KL(q || alpha_2 sg(q) + (1 - alpha_2) p)
    loss = (1/B) sum_i [(2 - beta) a_i + beta b_i]

Call it with ``student_generated=`` (a bool per sequence). The default reduction is
``"sequence"`` (per-sequence token means, then the mean over sequences), as in the reference.
"""
import kdplug
from kdplug import Assistant, Method, Recipe, Split, Term

from ._checks import number


def build(alpha_1: float = 0.1, alpha_2: float = 0.1, beta: float = 1.0) -> Split:
    alpha_1 = number("distillm2", "alpha_1", alpha_1, 0.0, 1.0)
    alpha_2 = number("distillm2", "alpha_2", alpha_2, 0.0, 1.0)
    beta = number("distillm2", "beta", beta, 0.0, 2.0)
    teacher_side = Recipe(Term("teacher", "assistant", weight=2.0 - beta),
                          assistant=Assistant(lam=alpha_1, alpha=-1.0))
    student_side = Recipe(Term("student", "assistant", weight=beta),
                          assistant=Assistant(lam=1.0 - alpha_2, alpha=-1.0, detach=True))
    return Split("student_generated", if_false=teacher_side, if_true=student_side, reduction="sequence")


@kdplug.hookimpl
def register_methods(register):
    register(Method("distillm2", build=build, aliases=("distillm_v2",),
                    summary="contrastive SKL (teacher responses) + SRKL (student responses)",
                    reference="Ko et al. 2025 (DistiLLM-2, ICML), arXiv:2503.07067"))
