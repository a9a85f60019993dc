"""Generalized Jensen-Shannon divergence (GKD), in TRL's convention.

    m = beta p + (1 - beta) q
    JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)      0 < beta < 1
    JSD(0) = KL(p || q),  JSD(1) = KL(q || p)                 (by definition)

The interior formula tends to 0 at both ends (about beta KL(p||q) near 0), so the endpoints
are a jump. ``normalized=True`` divides the interior by beta (1 - beta), which makes the loss
continuous at both ends.

The same divergence under other names (beta here = the value in the right column):

==============================================  ====================================
code                                            parameter -> beta
==============================================  ====================================
huggingface/trl ``generalized_jsd_loss``          ``beta`` -> beta
jongwooko/distillm ``js_distance(lam)``           1 - lam (its default lam=0.9: beta 0.1)
jongwooko/distillm-2 loss_type "gkd"              0.9 (hard-coded)
wutaiqiang/KDFlow ``compute_js_div(jsd_beta)``    1 - jsd_beta
SakanaAI/TAID ``JS(teacher_weight)``              teacher_weight
linkedin/Liger-Kernel ``LigerJSD(beta)``          beta
==============================================  ====================================
"""
import kdplug
from kdplug import Assistant, Method, Recipe, Term

from ._checks import flag, number


def build(beta: float = 0.5, normalized: bool = False) -> Recipe:
    beta = number("gjsd", "beta", beta, 0.0, 1.0)
    normalized = flag("gjsd", "normalized", normalized)
    if beta == 0.0:
        return Recipe(Term("teacher", "student"))
    if beta == 1.0:
        return Recipe(Term("student", "teacher"))
    scale = 1.0 / (beta * (1.0 - beta)) if normalized else 1.0
    return Recipe((Term("teacher", "assistant", weight=beta * scale),
                   Term("student", "assistant", weight=(1.0 - beta) * scale)),
                  assistant=Assistant(lam=beta, alpha=-1.0))


@kdplug.hookimpl
def register_methods(register):
    register(Method("gjsd", build=build, aliases=("jsd", "js", "gkd"),
                    summary="generalized JSD: beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q",
                    reference="Agarwal et al. 2024 (GKD), arXiv:2306.13649; TRL generalized_jsd_loss"))
