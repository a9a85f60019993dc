"""Total variation distance."""
import kdplug
from kdplug import Divergence, Method, Recipe, Term


def build() -> Recipe:
    """sum |p - q| / 2."""
    return Recipe(Term("teacher", "student", Divergence.TVD))


@kdplug.hookimpl
def register_methods(register):
    register(Method("tvd", build=build, aliases=("tv",),
                    summary="total variation sum|p-q|/2",
                    reference="Wen et al. 2023 (f-divergence KD), arXiv:2307.15190; DistiLLM tv_distance"))
