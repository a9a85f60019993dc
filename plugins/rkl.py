"""Reverse KL, KL(q || p): mode-seeking (MiniLLM's single-step term)."""
import kdplug
from kdplug import Method, Recipe, Term


def build() -> Recipe:
    """sum q (log q - log p)."""
    return Recipe(Term("student", "teacher"))


@kdplug.hookimpl
def register_methods(register):
    register(Method("rkl", build=build, aliases=("reverse_kl",),
                    summary="reverse KL(q||p), mode-seeking",
                    reference="Gu et al. 2024 (MiniLLM), arXiv:2306.08543"))
