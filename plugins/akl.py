"""AKL, adaptive KL: forward KL on the teacher's head, reverse KL on its tail, weighted per token
by how much of the student's error each part holds.

    head H = the teacher's most probable entries whose cumulative probability stays <= mu
             (the top-1 entry always belongs to it); tail = the rest
    g_head = sum_{v in H} |p_v - q_v|,  g_tail = sum_{v not in H} |p_v - q_v|
    loss = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p)

The weights carry no gradient. ``variant="kdflow"`` uses KDFlow's head rule instead: sort
ascending, the tail is the entries whose running sum from the smallest stays <= mu.
Ties are broken by vocabulary index (stable sort); when p == q the weights are 1/2 each.
The weights are :class:`kdplug.HeadTailWeights`, per-token term weights as data: the compiled
core computes them in C++ on the CPU, the PyTorch path (and CUDA) in PyTorch.
"""
import kdplug
from kdplug import HeadTailWeights, Method, Recipe, Term

from ._checks import choice, number

ORDER = {"official": "descending", "kdflow": "ascending"}


def build(mu: float = 0.5, variant: str = "official") -> Recipe:
    mu = number("akl", "mu", mu, 0.0, 1.0, lo_open=True, hi_open=True)
    choice("akl", "variant", variant, tuple(ORDER))
    return Recipe((Term("teacher", "student"), Term("student", "teacher")),
                  token_weights=HeadTailWeights(mu, ORDER[variant]))


@kdplug.hookimpl
def register_methods(register):
    register(Method("akl", build=build, aliases=("adaptive_kl",),
                    summary="adaptive KL: head-weighted KL(p||q) + tail-weighted KL(q||p)",
                    reference="Wu et al. 2025 (AKL, COLING), arXiv:2404.02657; wutaiqiang/LLM_KD_AKL"))
