"""The one hook a kdplug plugin implements."""
import pluggy

hookspec = pluggy.HookspecMarker("kdplug")
hookimpl = pluggy.HookimplMarker("kdplug")


@hookspec
def register_methods(register):
    """Register one or more distillation methods.

    :param register: ``register(method: kdplug.Method) -> None``. Raises ``ValueError`` when
        the method's name or one of its aliases is already taken, naming both plugins.
    :returns: nothing; methods are collected through ``register``.

    Called once per process, on the first :func:`kdplug.get` or :func:`kdplug.list_methods`.
    """
