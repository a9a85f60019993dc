"""kdplug bench end to end on a tiny case: each case in a fresh process, the Markdown table and the
JSON it writes (the numbers themselves are machine-dependent and not asserted)."""
import json
import subprocess
import sys


def test_bench_writes_its_table(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "kdplug", "bench", "--method", "fkl", "amid", "--n", "16", "--v", "50",
                           "--dtype", "float32", "--impl", "compiled", "eager", "--mode", "fwd+bwd", "fwd",
                           "--repeats", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["method"], r["mode"]) for r in result["rows"]] == [
        ("fkl", "fwd+bwd"), ("fkl", "fwd"), ("amid", "fwd+bwd"), ("amid", "fwd")]
    for row in result["rows"]:
        for impl in ("compiled", "eager"):
            case = row[impl]
            assert "error" not in case, case
            assert len(case["times_s"]) == 2 and case["median_s"] > 0
            assert {"peak_bytes", "steady_peak_bytes"} <= set(case)
        # the compiled core and the naive implementation compute the same loss
        assert abs(row["compiled"]["loss"] - row["eager"]["loss"]) <= 1e-4 * max(1.0, abs(row["eager"]["loss"]))
    table = out.with_suffix(".md").read_text()
    assert "| method | dtype | N | V | mode | kdplug compiled ms | GB/s | mem | steady |" in table
    assert sum(line.startswith("| amid | float32 | 16 | 50 |") for line in table.splitlines()) == 2
