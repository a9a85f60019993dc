"""What several test modules share: the built-in methods, the backends, one intra-op thread."""
import pytest
import torch

import kdplug

# The registered built-in methods (from the registry, so a new one without a reference fails).
_BUILTIN_PLUGINS = {p.name for p in kdplug.list_plugins() if p.module.startswith("kdplug.plugins")}
METHODS = sorted(m.name for m in kdplug.list_methods() if m.plugin in _BUILTIN_PLUGINS)


def compiled_available():
    try:
        kdplug.get("fkl", backend="compiled")
    except RuntimeError:
        return False
    return True


BACKENDS = [pytest.param("torch"),
            pytest.param("compiled", marks=pytest.mark.skipif(not compiled_available(),
                                                              reason="compiled core not built"))]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tests run thousands of tiny ops; intra-op threads only add wake-up latency (and on a
    busy 2-core machine, a lot of it). Import it into a test module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Parameter settings the compiled-core tests (CPU and CUDA) run for every registered method.
VARIANTS = {
    "fkl": [{}, {"form": "ce"}],
    "rkl": [{}],
    "symmetric_kl": [{}, {"lam": 0.3, "form": "ce"}],
    "tvd": [{}],
    "gjsd": [{}, {"beta": 0.1, "normalized": True}, {"beta": 0.0}],
    "skl": [{}, {"alpha": 0.0}, {"form": "ce"}],
    "srkl": [{}, {"detach_mixture": True}, {"alpha": 0.0}],
    "abkd": [{}, {"alpha": 0.0, "beta": 0.7}, {"alpha": 1.0, "beta": 0.0}, {"alpha": 0.0, "beta": 0.0}],
    "akl": [{}, {"variant": "kdflow"}],
    "taid": [{}, {"value": "kl", "t_start": 1.0}],
    "amid": [{}, {"alpha": -1.0, "order": "qr"}, {"alpha": 1.0, "divergence": "kl"},
             {"alpha": -3.0, "divergence": "kl", "order": "rq"}, {"alpha": 0.5, "lam": 0.0, "order": "rp"},
             {"alpha": 0.9, "lam": 1.0, "order": "pr"}],
    "distillm2": [{}, {"alpha_1": 0.0, "alpha_2": 0.3}],
}
CASES = [(name, params) for name in sorted(m.name for m in kdplug.list_methods()) for params in VARIANTS.get(name, [{}])]
CASE_IDS = [f"{name}-{','.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for name, p in CASES]
