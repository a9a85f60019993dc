import pytest

from kdplug._registry import REGISTRY


@pytest.fixture
def fresh_registry():
    """An empty plugin registry that loads on first use; the normal one is restored afterwards.

    Use it in tests that fake entry points or environment variables, so that other tests see
    the registry of the real installation.
    """
    REGISTRY.reset()
    yield REGISTRY
    REGISTRY.reset()
