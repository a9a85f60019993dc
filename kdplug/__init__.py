"""kdplug: knowledge-distillation losses for language models, as plugins over one fused core.

>>> import kdplug
>>> loss_fn = kdplug.get("amid", alpha=0.3)
>>> loss = loss_fn(student_logits, teacher_logits, labels=labels)   # doctest: +SKIP
"""
from ._counts import num_items
from ._registry import list_methods, list_plugins
from ._topk import TopK
from .hookspecs import hookimpl
from .loss import KDLoss, get
from .spec import Assistant, Divergence, HeadTailWeights, Method, Operand, Recipe, Schedule, Split, Term

__version__ = "0.1.0"

__all__ = [
    "Assistant",
    "Divergence",
    "HeadTailWeights",
    "KDLoss",
    "Method",
    "Operand",
    "Recipe",
    "Schedule",
    "Split",
    "Term",
    "TopK",
    "__version__",
    "get",
    "hookimpl",
    "list_methods",
    "list_plugins",
    "num_items",
]
