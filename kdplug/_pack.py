"""Turn a Recipe into the three pieces both evaluators take (layout in ``_torch_impl``)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .spec import Divergence, Operand, Recipe

OPERAND_CODE = {Operand.TEACHER: 0, Operand.STUDENT: 1, Operand.ASSISTANT: 2}
DIVERGENCE_CODE = {Divergence.KL: 0, Divergence.CE: 1, Divergence.AB: 2, Divergence.TVD: 3}
POLICY_CODE = {"exact": 0, "exclude": 1}


def structure_and_consts(recipe: Recipe, inf_policy: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The static part: fixed for the life of a loss module (a compiled graph specializes on it)."""
    assistant = recipe.assistant
    structure = [POLICY_CODE[inf_policy], int(assistant is not None),
                 int(assistant is not None and assistant.detach), len(recipe.terms)]
    # alpha = 1 is the geometric mixture, alpha > 1 a power mean (AMiD's plugin maps alpha >= 1
    # to 1 unless asked for the power mean).
    alpha = 1.0 if assistant is None else assistant.alpha
    consts = [alpha]
    for term in recipe.terms:
        structure += [OPERAND_CODE[term.lhs], OPERAND_CODE[term.rhs], DIVERGENCE_CODE[term.divergence]]
        consts += [term.ab_alpha, term.ab_beta]
    return tuple(structure), tuple(consts)


def params_tensor(recipe: Recipe, temperature: float, values: Mapping[str, torch.Tensor],
                  device: torch.device) -> torch.Tensor:
    """The dynamic part, ``[T, lam, weight * n_terms]`` as float64 on ``device``."""
    def resolve(number):
        if isinstance(number, str):
            try:
                return values[number]
            except KeyError:
                raise KeyError(f"kdplug: the recipe refers to the schedule value {number!r}, which "
                               f"the method's schedule does not publish (it has {sorted(values)})") from None
        return number

    numbers = [temperature, 0.5 if recipe.assistant is None else resolve(recipe.assistant.lam)]
    numbers += [resolve(term.weight) for term in recipe.terms]
    if not any(torch.is_tensor(n) for n in numbers):
        return torch.tensor(numbers, dtype=torch.float64, device=device)
    return torch.stack([torch.as_tensor(n, dtype=torch.float64, device=device).reshape(()) for n in numbers])
