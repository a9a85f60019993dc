"""kdplug.integrations.hf.DistillationTrainer on tiny randomly initialised GPT-2s (no download)."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

import kdplug  # noqa: E402
from kdplug.integrations.hf import DistillationTrainer  # noqa: E402

V, LENGTH = 48, 12


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def gpt2(layers, width, seed, vocab=V, init=0.02):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=LENGTH, n_embd=width, n_layer=layers, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        initializer_range=init)
    return GPT2LMHeadModel(config)


def dataset(n, seed=0, ragged=True):
    """Sequences with different numbers of target tokens, so per-micro-batch means differ from the
    big batch's mean (the case naive gradient accumulation gets wrong)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, V, (LENGTH,), generator=g)
        labels = ids.clone()
        if ragged:
            labels[LENGTH - 1 - 3 * (i % 3):] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels})
    return rows


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                max_steps=1, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def held_out_kd(trainer, rows):
    """The trainer's own KD objective on fixed rows (eval mode, batch mean)."""
    model = trainer.model.eval()
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    model.train()
    return float(loss)


@pytest.mark.parametrize("method", ["fkl", "taid"])
def test_loss_decreases(tmp_path, method):
    teacher, student = gpt2(2, 32, seed=1, init=0.2), gpt2(1, 16, seed=2)  # a peaked teacher
    rows = dataset(16)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, method=method, kd_ratio=1.0,
                                  args=args(tmp_path, max_steps=25, learning_rate=2e-2), train_dataset=rows)
    before = held_out_kd(trainer, rows[:8])
    trainer.train()
    after = held_out_kd(trainer, rows[:8])
    assert after < before - 0.1, (before, after)
    logged = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logged) == 25 and sum(logged[-5:]) < sum(logged[:5])


def test_taid_t_advances_once_per_optimizer_step(tmp_path):
    teacher, student = gpt2(2, 32, seed=1), gpt2(1, 16, seed=2)
    loss_fn = kdplug.get("taid", step_size=0.05)
    forwards = []
    loss_fn.register_forward_hook(lambda *a: forwards.append(1))
    steps = []
    original_step = loss_fn.step

    loss_fn.step = lambda loss=None: (steps.append(float(loss)), original_step(loss))[-1]  # instance attribute
    trainer = DistillationTrainer(model=student, teacher_model=teacher, method=loss_fn, kd_ratio=0.5,
                                  args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                            max_steps=4), train_dataset=dataset(8))
    trainer.train()
    assert len(forwards) == 8                      # 4 optimizer steps x 2 micro-batches
    assert len(steps) == 4                         # ...but the schedule moved once per optimizer step
    assert int(loss_fn.schedule.steps) == 4
    ts = [entry["taid_t"] for entry in trainer.state.log_history if "taid_t" in entry]
    assert len(ts) == 4
    assert ts[0] == pytest.approx(0.4)             # the first step only records the loss (reference recurrence)
    assert all(b > a for a, b in zip(ts[1:], ts[2:])) and ts[-1] > 0.4
    assert loss_fn.t == pytest.approx(ts[-1])


@pytest.mark.parametrize("method,kd_ratio", [("fkl", 0.5), ("taid", 1.0), ("distillm2", 0.7)])
def test_gradient_accumulation_matches_big_batch(tmp_path, method, kd_ratio):
    teacher = gpt2(2, 32, seed=1)
    start = gpt2(1, 16, seed=2)
    rows = dataset(4)
    counts = [int((r["labels"][1:] != -100).sum()) for r in rows]
    assert len(set(counts)) > 1  # ragged: the micro-batch means differ from the batch mean

    def update(batch, accumulation):
        student = copy.deepcopy(start)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, method=method, kd_ratio=kd_ratio,
            args=args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                      max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                      weight_decay=0.0, max_grad_norm=0.0),
            train_dataset=rows)
        trainer.train()
        return {k: (v.detach() - start.state_dict()[k]) for k, v in student.state_dict().items()}

    big, accumulated = update(4, 1), update(2, 2)
    largest = max(float(d.abs().max()) for d in big.values())
    assert largest > 1e-3  # the step did move the weights
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=2e-6, rtol=1e-5, msg=name)


def test_vocab_mismatch_names_both_sizes(tmp_path):
    teacher, student = gpt2(1, 16, seed=1, vocab=50), gpt2(1, 16, seed=2, vocab=48)
    with pytest.raises(ValueError, match=r"50.*48"):
        DistillationTrainer(model=student, teacher_model=teacher, method="fkl", args=args(tmp_path),
                            train_dataset=dataset(4))


def test_method_arguments(tmp_path):
    teacher, student = gpt2(1, 16, seed=1), gpt2(1, 16, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, method="amid",
                                  method_params={"alpha": 0.3}, temperature=2.0, args=args(tmp_path),
                                  train_dataset=dataset(4))
    assert trainer.kd_loss.params["alpha"] == 0.3 and trainer.kd_loss.temperature == 2.0
    assert not trainer.teacher.training
    with pytest.raises(TypeError, match="alpha"):
        DistillationTrainer(model=student, teacher_model=teacher, method="amid", method_params={"alhpa": 0.3},
                            args=args(tmp_path), train_dataset=dataset(4))
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=student, teacher_model=teacher, method=kdplug.get("fkl", temperature=2.0),
                            temperature=1.0, args=args(tmp_path), train_dataset=dataset(4))
    with pytest.raises(ValueError, match="kd_ratio"):
        DistillationTrainer(model=student, teacher_model=teacher, kd_ratio=1.5, args=args(tmp_path),
                            train_dataset=dataset(4))


def test_taid_state_saved_and_restored(tmp_path):
    teacher, student = gpt2(2, 32, seed=1), gpt2(1, 16, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, method="taid",
                                  method_params={"step_size": 0.05}, args=args(tmp_path, max_steps=3,
                                  save_strategy="steps", save_steps=3), train_dataset=dataset(8))
    trainer.train()
    t = trainer.kd_loss.t
    assert (tmp_path / "out" / "checkpoint-3" / "kdplug_loss.pt").is_file()
    assert t > 0.4
    resumed = DistillationTrainer(model=gpt2(1, 16, seed=2), teacher_model=teacher, method="taid",
                                  method_params={"step_size": 0.05}, args=args(tmp_path, max_steps=4),
                                  train_dataset=dataset(8))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    # one more step from the restored state (a fresh schedule would still be at t_start = 0.4)
    assert int(resumed.kd_loss.schedule.steps) == 4
    assert resumed.kd_loss.t > t


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teacher_on_another_device(tmp_path):
    teacher, student = gpt2(2, 32, seed=1), gpt2(1, 16, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher.cuda(), teacher_device="keep",
                                  method="fkl", args=args(tmp_path, max_steps=2), train_dataset=dataset(8))
    trainer.train()
    assert next(trainer.teacher.parameters()).is_cuda
    assert next(trainer.model.parameters()).device.type == "cpu"
