"""The command line: ``kdplug`` (console script), ``python -m kdplug`` and ``kdplug.cli.main``."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import kdplug
from kdplug import _extension, cli
from kdplug._registry import MethodInfo, PluginInfo

BUILTIN_METHODS = {"fkl", "rkl", "symmetric_kl", "tvd", "gjsd", "skl", "srkl", "abkd", "akl", "taid",
                   "amid", "distillm2"}
METHOD_KEYS = {"name", "aliases", "parameters", "summary", "reference", "plugin", "distribution", "compiled"}
PLUGIN_KEYS = {"name", "module", "distribution", "version", "methods", "error"}


def kdplug_cli(*args, env=None):
    """Run the installed console script (``python -m kdplug`` if it is not on PATH)."""
    script = shutil.which("kdplug")
    command = [script] if script else [sys.executable, "-m", "kdplug"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# --- through a subprocess ----------------------------------------------------------------------

def test_console_script_is_installed():
    assert shutil.which("kdplug"), "the kdplug console script is not on PATH (pip install -e .)"


def test_list():
    result = kdplug_cli("list")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Methods (")
    assert "\nPlugins (" in out
    assert "    parameters: alpha=0.2, beta=0.7, limit_scale='continuous'" in out
    assert "    aliases:    kl, forward_kl" in out
    for name in BUILTIN_METHODS:
        assert f"\n{name}  " in out
        assert f"kdplug.plugins.{name}" in out
    assert max(map(len, out.splitlines())) <= 100


def test_list_json():
    result = kdplug_cli("list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"methods", "plugins"}
    assert all(set(m) == METHOD_KEYS for m in data["methods"])
    assert all(set(p) == PLUGIN_KEYS for p in data["plugins"])
    methods = {m["name"]: m for m in data["methods"]}
    assert set(methods) >= BUILTIN_METHODS
    assert methods["fkl"] == {
        "name": "fkl", "aliases": ["kl", "forward_kl"], "parameters": {"form": "kl"},
        "summary": methods["fkl"]["summary"], "reference": methods["fkl"]["reference"],
        "plugin": "fkl", "distribution": "kdplug", "compiled": True}
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["gjsd"] == {"name": "gjsd", "module": "kdplug.plugins.gjsd", "distribution": "kdplug",
                               "version": kdplug.__version__, "methods": ["gjsd"], "error": None}


def test_python_m_kdplug_matches_console_script():
    module = subprocess.run([sys.executable, "-m", "kdplug", "list"], capture_output=True, text=True,
                            timeout=120)
    assert module.returncode == 0, module.stderr
    assert module.stdout == kdplug_cli("list").stdout


def test_info_json():
    result = kdplug_cli("info", "--json", env={"KDPLUG_LOAD_PLUGINS": "kdplug-jeffreys"})
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kdplug"]["version"] == kdplug.__version__
    assert info["torch"]["version"] == __import__("torch").__version__
    core = info["compiled_core"]
    assert core["available"] is _extension.has_ops()
    assert core["reason"] == _extension.why_not()
    assert (core["build_info"] != {}) is core["available"]
    assert isinstance(info["cuda"]["available"], bool)
    assert info["KDPLUG_LOAD_PLUGINS"] == "kdplug-jeffreys"


def test_help_lists_every_command():
    result = kdplug_cli("--help")
    assert result.returncode == 0
    for name in cli.COMMANDS:
        assert f"    {name} " in result.stdout


@pytest.mark.parametrize("args, message", [
    (["lst"], "invalid choice: 'lst' (choose from 'list', 'info'"),
    (["list", "--jsn"], "unrecognized arguments: --jsn"),
    ([], "usage: kdplug"),
])
def test_usage_errors_exit_2(args, message):
    result = kdplug_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


# --- through kdplug.cli.main ---------------------------------------------------------------------

def test_main_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Methods (" in out and "Plugins (" in out and "symmetric_kl" in out


def test_main_list_json(capsys):
    assert cli.main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["methods"]] == [m.name for m in kdplug.list_methods()]
    assert [p["name"] for p in data["plugins"]] == [p.name for p in kdplug.list_plugins()]


def test_main_info(capsys, monkeypatch):
    monkeypatch.delenv("KDPLUG_LOAD_PLUGINS", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kdplug ") and kdplug.__version__ in out
    assert "compiled core" in out and re.search(r"KDPLUG_LOAD_PLUGINS +unset", out)
    assert max(map(len, out.splitlines())) <= 100
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["KDPLUG_LOAD_PLUGINS"] is None


def test_main_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    assert "list" in capsys.readouterr().out
    assert cli.main(["list", "--help"]) == 0
    assert "--json" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kdplug {kdplug.__version__}"


@pytest.mark.parametrize("args", [["nope"], [], ["info", "--bogus"]])
def test_main_usage_errors(capsys, args):
    assert cli.main(args) == 2
    assert "usage: kdplug" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["bench", "--n", "0"], "argument --n: expected a positive integer, got '0'"),
    (["bench", "--v", "32000", "-5"], "argument --v: expected a positive integer, got '-5'"),
    (["bench", "--repeats", "0"], "argument --repeats: expected a positive integer"),
])
def test_main_bench_sizes_must_be_positive(capsys, args, message):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_main_reports_a_missing_data_file_without_traceback(capsys, tmp_path):
    assert cli.main(["distill", "--data", str(tmp_path / "missing.txt"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "kdplug distill: error: FileNotFoundError: --data: no such file" in err and "Traceback" not in err


def test_main_reports_registry_errors_without_traceback(capsys, monkeypatch):
    def broken():
        raise ValueError("kdplug: the method name 'x' is registered by both plugin 'a' and plugin 'b'")

    monkeypatch.setattr(kdplug, "list_methods", broken)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kdplug list: error: ValueError: kdplug: the method name 'x'")
    assert "Traceback" not in err


def test_list_shows_torch_only_methods_and_failed_plugins(capsys, monkeypatch):
    """The human listing marks methods without a Recipe, shows plugin errors, fits 100 columns."""
    methods = [MethodInfo("wide", ("w1", "w2"), {f"parameter_{i}": 0.125 * i for i in range(12)},
                          "a method with many parameters", "Someone et al. 2030, arXiv:3001.00001",
                          "wide_plugin", "kdplug-wide", False)]
    plugins = [PluginInfo("wide_plugin", "kdplug_wide", "kdplug-wide", "1.2.3", ("wide",)),
               PluginInfo("broken", "kdplug_broken_with_a_long_module_name", "kdplug-broken", "0.1", (),
                          "failed to import: ModuleNotFoundError: No module named 'a_dependency_that_"
                          "is_not_installed_here_and_whose_name_goes_on_and_on'")]
    monkeypatch.setattr(kdplug, "list_methods", lambda: methods)
    monkeypatch.setattr(kdplug, "list_plugins", lambda: plugins)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100
    assert "wide  a method with many parameters  [PyTorch only]" in out
    assert "    plugin:     wide_plugin (kdplug-wide 1.2.3)" in out
    assert "FAILED" in out and "    error: failed to import: ModuleNotFoundError" in out
    assert "parameter_11=1.375" in out
