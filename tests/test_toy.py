"""kdplug toy: the talk's pictures (one Gaussian fitted to a bimodal target under every method)."""
import json

import pytest

pytest.importorskip("matplotlib")

from kdplug import cli  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("toy")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = cli.main(["toy", "--out", str(out), "--json"])
    assert status == 0
    return out, json.loads(buffer.getvalue())


def test_files_written(toy):
    out, result = toy
    names = {"toy_fkl_rkl.png", "toy_methods.png", "toy_abkd_grid.png", "toy_amid_alpha.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 400_000
    assert sorted(result["files"]) == sorted(str(out / n) for n in names)


def test_fkl_mean_seeking_rkl_mode_seeking(toy):
    _, result = toy
    fits = {f["method"]: f for f in result["methods"]}
    fkl, rkl = fits["fkl"], fits["rkl"]
    assert fkl["std"] ** 2 > 4 * rkl["std"] ** 2                   # FKL's variance exceeds RKL's
    # FKL matches the target's moments (the optimum of KL(p||q) over Gaussians is moment matching)
    assert fkl["mean"] == pytest.approx(result["target"]["mean"], abs=0.05)
    assert fkl["std"] == pytest.approx(result["target"]["std"], abs=0.05)
    # RKL sits on one mode with about that mode's width
    mode = min(result["target"]["modes"], key=lambda m: abs(m["mean"] - rkl["mean"]))
    assert rkl["mean"] == pytest.approx(mode["mean"], abs=0.1)
    assert rkl["std"] == pytest.approx(mode["std"], abs=0.1)
    # each fit minimised its own direction best
    assert fkl["kl_target_student"] < rkl["kl_target_student"]
    assert rkl["kl_student_target"] < fkl["kl_student_target"]


def test_every_method_and_sweep_fitted(toy):
    import kdplug
    _, result = toy
    assert [f["method"] for f in result["methods"]] == [m.name for m in kdplug.list_methods()]
    assert len(result["abkd_grid"]) == 16 and len(result["amid_alpha"]) == 6
    grid = {(f["params"]["alpha"], f["params"]["beta"]): f for f in result["abkd_grid"]}
    fits = {f["method"]: f for f in result["methods"]}
    # ABKD's (1, 0) corner is forward KL and (0, 1) is reverse KL
    assert grid[(1.0, 0.0)]["std"] == pytest.approx(fits["fkl"]["std"], abs=1e-3)
    assert grid[(0.0, 1.0)]["std"] == pytest.approx(fits["rkl"]["std"], abs=1e-3)
    for f in result["methods"] + result["abkd_grid"] + result["amid_alpha"]:
        assert all(map(lambda v: v == v, (f["mean"], f["std"], f["loss"]))), f  # no NaN


def test_bad_arguments_name_the_flag(capsys):
    assert cli.main(["toy", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
