"""kdplug distill end to end: --quick in a subprocess (trains and caches the teacher), the same
under torchrun with 2 processes (DDP on gloo, reusing the cache), real-use flags, usage errors."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

for _name in ("transformers", "accelerate", "tokenizers", "matplotlib", "tqdm"):
    pytest.importorskip(_name)

from kdplug import cli  # noqa: E402

METHODS = ["ce", "fkl", "rkl", "amid", "taid"]


def _run(cmd, cwd, timeout=300):
    env = dict(os.environ)
    env.pop("KDPLUG_CACHE_DIR", None)
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def _table_rows(stdout):
    return [line for line in stdout.splitlines() if line.startswith("| ")]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    cache, out = root / "cache", root / "single"
    proc = _run([sys.executable, "-m", "kdplug", "distill", "--quick", "--cache-dir", str(cache), "--out", str(out),
                 "--param", "amid.alpha=0.3"], cwd=root)
    return root, cache, out, proc


@pytest.fixture(scope="module")
def quick_ddp(quick):
    root, cache, _, _ = quick
    out = root / "ddp"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "-m", "kdplug", "distill", "--quick", "--cache-dir", str(cache), "--out", str(out),
                 "--param", "amid.alpha=0.3", "--no-progress"], cwd=root)
    return out, proc


def test_quick_end_to_end(quick):
    _, cache, out, proc = quick
    rows = _table_rows(proc.stdout)
    assert rows[0].startswith("| method") and "KL(T‖S)" in rows[0] and "tokens/s" in rows[0]
    labels = [r.split("|")[1].strip() for r in rows[1:]]
    assert labels == ["teacher", "ce (hard labels)", "fkl", "rkl", "amid", "taid"]
    assert "training the default teacher once" in proc.stderr and "teacher:" in proc.stderr  # progress bars
    results = json.loads((out / "results.json").read_text())
    assert [m["method"] for m in results["methods"]] == METHODS
    assert results["teacher"]["cached"] is False and results["world_size"] == 1
    assert next(m for m in results["methods"] if m["method"] == "amid")["params"]["alpha"] == 0.3
    for m in results["methods"]:
        assert 0 < m["kl_teacher_student"] < 10 and m["perplexity"] > 1 and 0 <= m["top1_agreement"] <= 1
        assert m["tokens_per_s"] > 0 and m["train_s"] > 0
        assert m["own_divergence"]["end"] < m["own_divergence"]["start"], m["method"]
        assert len(m["curves"]["step"]) == len(m["curves"]["kl_teacher_student"]) > 2
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    entries = list(cache.glob("teacher-*/meta.json"))
    assert len(entries) == 1 and (entries[0].parent / "tokenizer.json").is_file()


def test_second_run_uses_the_cache_and_ddp_prints_one_table(quick, quick_ddp):
    _, _, single_out, _ = quick
    out, proc = quick_ddp
    assert "cached teacher" in proc.stderr and "training the default teacher" not in proc.stderr
    rows = _table_rows(proc.stdout)
    assert sum(r.startswith("| fkl ") for r in rows) == 1          # printed by rank 0 only
    assert len(rows) == 1 + 1 + len(METHODS)  # header, teacher, one row per method
    assert "2 process(es)" in proc.stdout
    single = json.loads((single_out / "results.json").read_text())
    ddp = json.loads((out / "results.json").read_text())
    assert ddp["world_size"] == 2 and ddp["teacher"]["cached"] is True
    # Same global batches, losses normalised by the global token count: the DDP students end where
    # the single-process ones do (up to float reduction order).
    for a, b in zip(single["methods"], ddp["methods"]):
        assert a["method"] == b["method"]
        assert b["kl_teacher_student"] == pytest.approx(a["kl_teacher_student"], rel=2e-3), a["method"]
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=2e-3), a["method"]


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv,needles", [
    (["--method", "nope"], ["argument --method", "unknown method 'nope'", "fkl", "taid", "all"]),
    (["--method", "amid", "--param", "amid.alhpa=0.3"], ["argument --param", "alhpa", "alpha"]),
    (["--param", "alpha=0.3"], ["argument --param", "METHOD.NAME=VALUE"]),
    (["--method", "rkl", "--param", "fkl.form=ce"], ["argument --param", "not among the --method"]),
    (["--method", "amid", "--param", "amid.lam=2"], ["argument --param", "lam"]),
    (["--kd-ratio", "1.5"], ["argument --kd-ratio", "[0, 1]"]),
    (["--steps", "0"], ["argument --steps", "positive integer"]),
    (["--device", "tpu"], ["argument --device", "cpu", "cuda"]),
])
def test_usage_errors_name_the_flag_and_the_choices(argv, needles):
    status, _, err = _main(["distill", *argv])
    assert status == 2
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A local teacher directory (weights + tokenizer), a config-only student, a JSONL file."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("hf")
    records = [{"prompt": f"Q{i}: what is {i} plus {i}? ", "completion": f"A: {i} plus {i} is {2 * i}."}
               for i in range(60)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r["prompt"] + r["completion"] for r in records],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    vocab = len(hf_tok)
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    teacher.save_pretrained(root / "teacher")
    hf_tok.save_pretrained(root / "teacher")
    GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2).save_pretrained(root / "student")
    GPT2Config(vocab_size=vocab + 8, n_positions=64, n_embd=16, n_layer=1, n_head=2).save_pretrained(root / "bad")
    return root


def test_real_use_flags(hf_dirs):
    root = hf_dirs
    status, out, err = _main(["distill", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
                              "--data", str(root / "data.jsonl"), "--method", "fkl", "distillm2", "--steps", "3",
                              "--batch-size", "4", "--seq-len", "24", "--lr", "1e-3", "--seed", "1",
                              "--student-warmup", "2", "--out", str(root / "out"), "--json", "--no-progress",
                              "--no-baseline"])
    assert status == 0, err
    results = json.loads(out)
    assert [m["method"] for m in results["methods"]] == ["fkl", "distillm2"]
    assert results["corpus"]["layout"] == "records" and results["corpus"]["records"] == 60
    assert results["teacher"]["source"] == str(root / "teacher") and results["teacher"]["cached"] is None
    assert results["student"]["init"] == "config (random init)" and results["student"]["warmup_steps"] == 2
    assert results["config"]["seq_len"] == 24 and results["config"]["seed"] == 1
    assert (root / "out" / "results.json").is_file() and (root / "out" / "curves.png").is_file()


def test_vocabulary_mismatch_is_rejected_with_both_sizes(hf_dirs):
    root = hf_dirs
    status, _, err = _main(["distill", "--teacher", str(root / "teacher"), "--student", str(root / "bad"),
                            "--data", str(root / "data.jsonl"), "--steps", "1", "--batch-size", "4",
                            "--seq-len", "24", "--out", str(root / "out2"), "--no-progress"])
    assert status == 1
    assert "vocabulary" in err and "--student" in err
    import re
    sizes = [int(n) for n in re.findall(r"\d+", err.split("vocabulary")[1])[:2]]
    assert sizes[0] - sizes[1] == 8 or sizes[1] - sizes[0] == 8, err
