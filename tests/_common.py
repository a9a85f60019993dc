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
