"""Jeffreys divergence for kdplug: a third-party method described as data, so it runs on the
compiled core as well as on the PyTorch path."""
import kdplug
from kdplug import Method, Recipe, Term


def jeffreys(w: float = 0.5) -> Recipe:
    """w * KL(p || q) + (1 - w) * KL(q || p); w = 0.5 is half the symmetric KL."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"jeffreys: w must be in [0, 1], got {w!r}")
    return Recipe(terms=(
        Term("teacher", "student", weight=w),
        Term("student", "teacher", weight=1.0 - w),
    ))


@kdplug.hookimpl
def register_methods(register):
    register(Method("jeffreys", build=jeffreys,
                    summary="Jeffreys divergence w*KL(p||q) + (1-w)*KL(q||p)",
                    reference="Jeffreys 1946, doi:10.1098/rspa.1946.0056"))
