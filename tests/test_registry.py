"""The plugin registry: discovery through entry points, loading policy, errors that say what to fix.

Entry points are faked without installing anything by monkeypatching
``importlib.metadata.entry_points`` (pluggy's own tests fake distributions the same way); one
test installs the real example package from ``examples/kdplug-jeffreys``.
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pluggy
import pytest
import torch

import kdplug
from kdplug import Assistant, Method, Recipe, Term
from kdplug._registry import DEFAULT_PLUGINS, MethodInfo, PluginInfo

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {path.rsplit(".", 1)[1] for path in DEFAULT_PLUGINS}  # plugin modules
BUILTIN_METHODS = {"fkl", "rkl", "symmetric_kl", "tvd", "gjsd", "skl", "srkl", "abkd", "akl", "taid",
                   "amid", "distillm2"}


class FakeDistribution:
    def __init__(self, name, version):
        self.name, self.version = name, version


class FakeEntryPoint:
    """Enough of ``importlib.metadata.EntryPoint`` for kdplug: ``load()`` returns ``target``
    (a module) or raises it (an exception)."""

    group = "kdplug"

    def __init__(self, name, target, dist="kdplug-fake", version="1.0"):
        self.name, self._target = name, target
        self.value = getattr(target, "__name__", f"{dist.replace('-', '_')}_{name}")
        self.dist = FakeDistribution(dist, version)

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def plugin_module(name, *methods, hook_name="register_methods", fail=None):
    """A plugin module whose hook registers ``methods`` (then raises ``fail``, if given)."""
    module = types.ModuleType(name)

    @kdplug.hookimpl
    def hook(register):
        for method in methods:
            register(method)
        if fail is not None:
            raise fail

    setattr(module, hook_name, hook)
    return module


def fkl_like(scale: float = 1.0) -> Recipe:
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    return Recipe(Term("teacher", "student", weight=scale))


@pytest.fixture
def plugins(monkeypatch, fresh_registry):
    """``plugins(*entry_points)``: the installed entry points plus these fake ones."""
    real = importlib.metadata.entry_points

    def install(*fakes):
        def entry_points(**kwargs):
            found = list(real(**kwargs))
            return found + list(fakes) if kwargs.get("group") == "kdplug" else found

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    return install


def run_python(code, env=None, **kwargs):
    environ = {**os.environ, **(env or {})}
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key)
    return subprocess.run([kwargs.pop("python", sys.executable), "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=environ, timeout=120, **kwargs)


# --- discovery --------------------------------------------------------------------------------

def test_builtins_are_registered_through_kdplug_entry_points():
    """Built-in methods arrive through the kdplug distribution's entry points, like any plugin."""
    declared = {ep.name: ep for ep in importlib.metadata.entry_points(group="kdplug")
                if ep.dist is not None and ep.dist.name == "kdplug"}
    assert set(declared) == BUILTINS
    found = {p.name: p for p in kdplug.list_plugins() if p.distribution == "kdplug"}
    assert set(found) == BUILTINS
    for name, info in found.items():
        assert info.module == declared[name].value == f"kdplug.plugins.{name}"
        assert info.version == importlib.metadata.version("kdplug")
        assert info.error is None and info.methods
    for method in kdplug.list_methods():
        if method.plugin in BUILTINS:
            assert method.distribution == "kdplug"


def test_import_kdplug_does_not_import_plugins():
    """Plugins load on the first lookup, not on ``import kdplug``."""
    result = run_python("""
        import sys
        import kdplug
        loaded = [m for m in sys.modules if m.startswith("kdplug.plugins") or m == "kdplug_jeffreys"]
        assert not loaded, loaded
        kdplug.list_methods()
        assert "kdplug.plugins.fkl" in sys.modules
    """)
    assert result.returncode == 0, result.stderr


def test_load_plugins_env_in_subprocess():
    """``KDPLUG_LOAD_PLUGINS=''`` loads no third-party plugin, but the built-ins always load."""
    result = run_python("""
        import kdplug
        print(sorted({p.distribution for p in kdplug.list_plugins()}))
        print(sorted({m.distribution for m in kdplug.list_methods()}))
        print(" ".join(sorted(m.name for m in kdplug.list_methods())))
    """, env={"KDPLUG_LOAD_PLUGINS": ""})
    assert result.returncode == 0, result.stderr
    plugin_dists, method_dists, names = result.stdout.splitlines()
    assert plugin_dists == method_dists == "['kdplug']"
    assert set(names.split()) >= BUILTIN_METHODS


@pytest.mark.parametrize("setting, loaded", [
    (None, {"one", "two"}),
    ("", set()),
    ("kdplug-one", {"one"}),
    (" KDPlug_One , kdplug.two ", {"one", "two"}),  # names compare as pip compares them
])
def test_load_plugins_env_filters_distributions(plugins, monkeypatch, setting, loaded):
    """``KDPLUG_LOAD_PLUGINS`` names the third-party distributions to load."""
    if setting is None:
        monkeypatch.delenv("KDPLUG_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("KDPLUG_LOAD_PLUGINS", setting)
    plugins(FakeEntryPoint("one", plugin_module("kdplug_one", Method("one", build=fkl_like)), "kdplug-one"),
            FakeEntryPoint("two", plugin_module("kdplug_two", Method("two", build=fkl_like)), "kdplug-two"))
    methods = kdplug.list_methods()
    assert {m.name for m in methods if m.distribution != "kdplug"} == loaded
    assert {m.name for m in methods} >= BUILTIN_METHODS
    assert {p.name for p in kdplug.list_plugins()} == BUILTINS | loaded


def test_third_party_plugin_is_listed_with_its_distribution(plugins):
    plugins(FakeEntryPoint("mine", plugin_module("kdplug_mine", Method("mine", build=fkl_like)),
                           "kdplug-mine", "2.3"))
    (info,) = [p for p in kdplug.list_plugins() if p.name == "mine"]
    assert info == PluginInfo("mine", "kdplug_mine", "kdplug-mine", "2.3", ("mine",), None)
    assert kdplug.list_plugins()[-1] == info  # built-ins first
    (method,) = [m for m in kdplug.list_methods() if m.name == "mine"]
    assert (method.plugin, method.distribution, method.parameters) == ("mine", "kdplug-mine", {"scale": 1.0})


def test_misspelled_hook_fails_loudly(plugins):
    """``check_pending``: a hookimpl whose name matches no hook raises, naming the hook."""
    plugins(FakeEntryPoint("typo", plugin_module("kdplug_typo", Method("typo", build=fkl_like),
                                                 hook_name="register_method")))
    for _ in range(2):  # and keeps raising the same error, not a half-loaded registry's
        with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_method'"):
            kdplug.list_methods()


def test_hook_with_unknown_argument_is_reported(plugins):
    module = types.ModuleType("kdplug_badargs")

    @kdplug.hookimpl
    def register_methods(register, model_aliases):
        register(Method("badargs", build=fkl_like))

    module.register_methods = register_methods
    plugins(FakeEntryPoint("badargs", module, "kdplug-badargs"))
    with pytest.warns(RuntimeWarning, match="'badargs'.*could not be registered"):
        names = {m.name for m in kdplug.list_methods()}
    assert "badargs" not in names and "fkl" in names
    (info,) = [p for p in kdplug.list_plugins() if p.name == "badargs"]
    assert "model_aliases" in info.error


# --- broken plugins do not take the others down ----------------------------------------------------

def test_plugin_that_fails_to_import_is_reported_by_name(plugins):
    plugins(FakeEntryPoint("broken", ModuleNotFoundError("No module named 'torch_foo'"), "kdplug-broken", "0.2"),
            FakeEntryPoint("good", plugin_module("kdplug_good", Method("good", build=fkl_like)), "kdplug-good"))
    with pytest.warns(RuntimeWarning, match=r"plugin 'broken' \(distribution 'kdplug-broken'\) failed to import"):
        methods = kdplug.list_methods()
    assert {m.name for m in methods if m.distribution != "kdplug"} == {"good"}
    assert {m.name for m in methods} >= BUILTIN_METHODS
    (info,) = [p for p in kdplug.list_plugins() if p.name == "broken"]
    assert (info.distribution, info.version, info.methods) == ("kdplug-broken", "0.2", ())
    assert info.error == "failed to import: ModuleNotFoundError: No module named 'torch_foo'"
    kdplug.get("good")


def test_plugin_whose_hook_raises_is_reported_and_rolled_back(plugins):
    module = plugin_module("kdplug_half", Method("half_done", build=fkl_like), fail=RuntimeError("boom"))
    plugins(FakeEntryPoint("half", module, "kdplug-half"),
            FakeEntryPoint("good", plugin_module("kdplug_good", Method("good", build=fkl_like)), "kdplug-good"))
    with pytest.warns(RuntimeWarning, match="'half'.*raised in register_methods: RuntimeError: boom"):
        names = {m.name for m in kdplug.list_methods()}
    assert "half_done" not in names and "good" in names
    (info,) = [p for p in kdplug.list_plugins() if p.name == "half"]
    assert info.methods == () and "boom" in info.error
    with pytest.raises(ValueError, match="unknown method 'half_done'"):
        kdplug.get("half_done")


def test_entry_point_name_taken_by_another_distribution(plugins):
    """A third-party entry point named like a built-in is reported; the built-in still loads."""
    plugins(FakeEntryPoint("fkl", plugin_module("kdplug_evil", Method("evil", build=fkl_like)), "kdplug-evil"))
    with pytest.warns(RuntimeWarning, match="plugin name 'fkl' is already used by 'kdplug.plugins.fkl'"):
        infos = kdplug.list_plugins()
    assert [p.distribution for p in infos if p.name == "fkl"] == ["kdplug", "kdplug-evil"]
    assert kdplug.get("fkl").method.build.__module__ == "kdplug.plugins.fkl"


# --- duplicate names -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, taken_by", [
    (Method("fkl", build=fkl_like), "fkl"),                           # a built-in's name
    (Method("mine", build=fkl_like, aliases=("kl",)), "fkl"),          # a built-in's alias
    (Method("first", build=fkl_like), "first_plugin"),                  # another plugin's name
    (Method("other", build=fkl_like, aliases=("First",)), "first_plugin"),
])
def test_duplicate_name_names_both_plugins(plugins, method, taken_by):
    """``register`` raises ValueError naming both plugins; the later plugin is left out."""
    errors = []

    @kdplug.hookimpl
    def register_methods(register):
        try:
            register(method)
        except ValueError as exc:
            errors.append(str(exc))
            raise

    late = types.ModuleType("kdplug_late")
    late.register_methods = register_methods
    plugins(FakeEntryPoint("first_plugin", plugin_module("kdplug_first", Method("first", build=fkl_like)), "a-first"),
            FakeEntryPoint("late_plugin", late, "b-late"))
    with pytest.warns(RuntimeWarning, match="'late_plugin'"):
        kdplug.list_methods()
    (error,) = errors
    assert f"plugin {taken_by!r}" in error and "plugin 'late_plugin'" in error
    assert "KDPLUG_LOAD_PLUGINS" in error
    (info,) = [p for p in kdplug.list_plugins() if p.name == "late_plugin"]
    assert info.methods == () and "late_plugin" in info.error
    assert kdplug.get(method.aliases[0] if method.aliases else method.name).method is not method


def test_duplicate_between_builtins_raises(plugins):
    """Within kdplug itself a clash is a bug: loading raises instead of warning."""
    plugins(FakeEntryPoint("zz_dup", plugin_module("kdplug.plugins.zz_dup", Method("rkl", build=fkl_like)),
                           "kdplug", importlib.metadata.version("kdplug")))
    for _ in range(2):  # and keeps raising the same error, not a half-loaded registry's
        with pytest.raises(ValueError, match="'rkl' is registered by both plugin 'rkl' and plugin 'zz_dup'"):
            kdplug.list_methods()


# --- lookup and parameters -------------------------------------------------------------------------

def test_unknown_method_lists_names_and_closest_match():
    with pytest.raises(ValueError, match="unknown method 'fk'") as exc:
        kdplug.get("fk")
    message = str(exc.value)
    assert "Did you mean 'fkl'?" in message
    assert all(m.name in message for m in kdplug.list_methods())


def test_unknown_method_without_close_match():
    with pytest.raises(ValueError, match="unknown method 'zzzzzz'. Available: abkd") as exc:
        kdplug.get("zzzzzz")
    assert "Did you mean" not in str(exc.value)


@pytest.mark.parametrize("alias, name", [
    ("kl", "fkl"), ("forward_kl", "fkl"), ("Forward-KL", "fkl"), ("jsd", "gjsd"), ("tv", "tvd"),
    (" rkl ", "rkl"),
])
def test_aliases_resolve(alias, name):
    assert kdplug.get(alias).method.name == name


def test_unknown_parameter_lists_accepted_ones():
    with pytest.raises(TypeError, match="unknown parameter.*alhpa") as exc:
        kdplug.get("abkd", alhpa=0.3)
    assert "alpha=0.2" in str(exc.value) and "beta=0.7" in str(exc.value)
    with pytest.raises(TypeError, match="rkl accepts: none"):
        kdplug.get("rkl", alpha=0.3)


@pytest.mark.parametrize("name, params, parameter", [
    ("abkd", {"alpha": -1.0}, "alpha"),
    ("gjsd", {"beta": 1.5}, "beta"),
    ("skl", {"alpha": 2.0}, "alpha"),
    ("fkl", {"form": "nope"}, "form"),
    ("srkl", {"detach_mixture": "False"}, "detach_mixture"),  # a truthy string is not True
    ("gjsd", {"normalized": 1}, "normalized"),
    ("taid", {"adaptive": "no"}, "adaptive"),
])
def test_out_of_range_parameter_names_it(name, params, parameter):
    with pytest.raises(ValueError, match=parameter):
        kdplug.get(name, **params)


@pytest.mark.parametrize("make, error, message", [
    (lambda: Term("teacher", "student", weight=-1.0), ValueError, "Term.weight: expected >= 0"),
    (lambda: Term("teacher", "student", weight=float("nan")), ValueError, "Term.weight: expected a finite"),
    (lambda: Term("teacher", "studnet"), ValueError, "operands must be one of"),
    (lambda: Term("student", "student"), ValueError, "both 'student'"),
    (lambda: Term("teacher", "student", "js"), ValueError, "Term.divergence"),
    (lambda: Term("teacher", "student", "ab", ab_alpha=-0.5), ValueError, "Term.ab_alpha: expected >= 0"),
    (lambda: Assistant(lam=1.5), ValueError, r"Assistant.lam: expected a value in \[0, 1\]"),
    (lambda: Assistant(alpha=float("inf")), ValueError, "Assistant.alpha: expected a finite"),
    (lambda: Assistant(detach="False"), TypeError, "Assistant.detach: expected True or False"),
    (lambda: Recipe(()), TypeError, "Recipe.terms"),
    (lambda: Recipe(Term("teacher", "assistant")), ValueError, "no assistant is given"),
    (lambda: Recipe(Term("student", "teacher", "ce")), ValueError, "Divergence.CE needs a left operand"),
])
def test_recipe_parts_are_checked(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("option", ["t2_scale", "inplace_backward"])
def test_boolean_options_must_be_bools(option):
    with pytest.raises(TypeError, match=f"{option} must be a bool"):
        kdplug.get("fkl", **{option: "no"})


def test_list_methods_records():
    methods = kdplug.list_methods()
    assert [m.name for m in methods] == sorted(m.name for m in methods)
    assert {m.name for m in methods} >= BUILTIN_METHODS
    assert [f.name for f in MethodInfo.__dataclass_fields__.values()] == [
        "name", "aliases", "parameters", "summary", "reference", "plugin", "distribution", "compiled"]
    (fkl,) = [m for m in methods if m.name == "fkl"]
    assert fkl.aliases == ("kl", "forward_kl")
    assert fkl.parameters == {"form": "kl"}
    assert (fkl.plugin, fkl.distribution, fkl.compiled) == ("fkl", "kdplug", True)
    assert "arXiv:1503.02531" in fkl.reference
    for method in methods:
        assert method.summary and method.reference, method.name
    (abkd,) = [m for m in methods if m.name == "abkd"]
    assert abkd.parameters == {"alpha": 0.2, "beta": 0.7, "limit_scale": "continuous"}


# --- Method validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Fkl", "two words", "", "1st", "has-dash"])
def test_method_name_must_be_lower_case_identifier(name):
    with pytest.raises(ValueError, match="Method.name"):
        Method(name, build=fkl_like)


def test_method_needs_build_or_torch_loss():
    with pytest.raises(ValueError, match="give build=, torch_loss= or both"):
        Method("nothing")


@pytest.mark.parametrize("build", [
    lambda *args: None,
    lambda **kwargs: None,
    lambda alpha, /: None,
])
def test_method_parameters_must_be_plain_keywords(build):
    with pytest.raises(TypeError, match="parameters must be plain keywords"):
        Method("odd", build=build)


def test_torch_loss_must_take_two_log_probabilities():
    with pytest.raises(TypeError, match=r"torch_loss must take \(log_p_teacher, log_q_student"):
        Method("odd", torch_loss=lambda log_p: log_p.sum(-1))


def test_register_rejects_non_methods(plugins):
    module = types.ModuleType("kdplug_notamethod")

    @kdplug.hookimpl
    def register_methods(register):
        register("fkl")

    module.register_methods = register_methods
    plugins(FakeEntryPoint("notamethod", module, "kdplug-notamethod"))
    with pytest.warns(RuntimeWarning, match="register\\(\\) expects a kdplug.Method, got str"):
        kdplug.list_methods()


# --- a torch_loss-only method, end to end -------------------------------------------------------------

def hellinger(log_p_teacher, log_q_student, scale: float = 1.0):
    """scale * squared Hellinger distance, per row."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return scale * 0.5 * ((log_p_teacher / 2).exp() - (log_q_student / 2).exp()).pow(2).sum(-1)


def test_torch_loss_method_end_to_end(plugins):
    plugins(FakeEntryPoint("hellinger", plugin_module(
        "kdplug_hellinger", Method("hellinger", torch_loss=hellinger, aliases=("hel",), summary="Hellinger")),
        "kdplug-hellinger"))
    (info,) = [m for m in kdplug.list_methods() if m.name == "hellinger"]
    assert info.parameters == {"scale": 1.0} and info.compiled is False
    with pytest.raises(ValueError, match="scale"):
        kdplug.get("hellinger", scale=-1.0)(torch.zeros(2, 3), torch.zeros(2, 3))

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen) * 3
    mask = torch.rand(2, 5, generator=gen) > 0.3
    loss = kdplug.get("hel", scale=2.0, temperature=1.5, backend="torch")(student, teacher, mask=mask)
    (grad,) = torch.autograd.grad(loss, student)

    direct_student = student.detach().clone().requires_grad_(True)
    log_q = torch.log_softmax(direct_student / 1.5, dim=-1)
    log_p = torch.log_softmax(teacher / 1.5, dim=-1)
    per_token = 2.0 * 0.5 * ((log_p / 2).exp() - (log_q / 2).exp()).pow(2).sum(-1)
    expected = per_token[mask].sum() / mask.sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, direct_student.grad, rtol=1e-10, atol=1e-12)
    assert grad[~mask].abs().max() == 0


# --- the example package, really installed ----------------------------------------------------------

def test_example_plugin_installs_loads_and_uninstalls(tmp_path):
    """pip-installs examples/kdplug-jeffreys, uses it through kdplug.get and the CLI, uninstalls it.

    It goes into a virtual environment layered over this one (``--system-site-packages``), so
    it sees the same torch and kdplug while other test processes running at the same time never
    see the extra method, and a killed run leaves nothing behind in the real environment.
    """
    source = tmp_path / "kdplug-jeffreys"  # build in a copy: no build/ or *.egg-info in the repo
    shutil.copytree(ROOT / "examples" / "kdplug-jeffreys", source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    pip = [sys.executable, "-m", "pip", "--python", python]

    def check(result):
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    check(subprocess.run([*pip, "install", "--no-build-isolation", "--no-deps", "--no-cache-dir",
                          str(source)], capture_output=True, text=True, timeout=300))
    try:
        check(run_python("""
            import torch, kdplug
            gen = torch.Generator().manual_seed(0)
            s = torch.randn(4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
            t = torch.randn(4, 9, dtype=torch.float64, generator=gen) * 2
            loss = kdplug.get("jeffreys", w=0.3, backend="torch")(s, t)
            (grad,) = torch.autograd.grad(loss, s)
            log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
            kl_pq = (log_p.exp() * (log_p - log_q)).sum(-1)
            kl_qp = (log_q.exp() * (log_q - log_p)).sum(-1)
            expected = (0.3 * kl_pq + 0.7 * kl_qp).mean()
            (expected_grad,) = torch.autograd.grad(expected, s)
            torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
            try:
                kdplug.get("jeffreys", w=1.5)
            except ValueError as exc:
                assert "w must be in [0, 1]" in str(exc), exc
            else:
                raise AssertionError("w=1.5 was accepted")
        """, python=python))
        listing = json.loads(check(run_python(
            "from kdplug.cli import main; raise SystemExit(main(['list', '--json']))", python=python)))
        (plugin,) = [p for p in listing["plugins"] if p["name"] == "jeffreys"]
        assert plugin == {"name": "jeffreys", "module": "kdplug_jeffreys", "distribution": "kdplug-jeffreys",
                          "version": "0.1.0", "methods": ["jeffreys"], "error": None}
        (method,) = [m for m in listing["methods"] if m["name"] == "jeffreys"]
        assert method["parameters"] == {"w": 0.5} and method["compiled"] is True
        assert method["distribution"] == "kdplug-jeffreys"
        hidden = check(run_python("import kdplug; print([m.name for m in kdplug.list_methods()])",
                                  env={"KDPLUG_LOAD_PLUGINS": ""}, python=python))
        assert "jeffreys" not in hidden and "fkl" in hidden
    finally:
        check(subprocess.run([*pip, "uninstall", "-y", "kdplug-jeffreys"], capture_output=True, text=True,
                             timeout=120))
    gone = run_python("import kdplug; print([m.name for m in kdplug.list_methods()])", python=python)
    assert gone.returncode == 0 and "jeffreys" not in gone.stdout and "fkl" in gone.stdout
