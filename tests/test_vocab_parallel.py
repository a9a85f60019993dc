"""Vocabulary-parallel logits (``process_group=``): with 2 and 3 gloo ranks, each holding a shard
(columns) of both logits, the loss, the gradient and the sampled-id log-ratio equal the unsharded
ones, for every registered method and parameter setting, on both backends."""
import pytest
import torch
import torch.distributed as dist

import kdplug
from _common import CASES, compiled_available, spawn_gloo_ranks
from reference import make_logits

SHAPE = (2, 3, 20)
# Uneven shards; with 3 ranks the last shard is the "mixed_inf" padding columns (-inf on both
# sides except the protected entries), so some rows are all -inf within a shard.
BOUNDS = {2: [0, 7, 20], 3: [0, 9, 15, 20]}
BACKEND_NAMES = ["torch"] + (["compiled"] if compiled_available() else [])
RUNS = [(name, params, backend) for backend in BACKEND_NAMES
        for name, params in CASES + [("amid", {"inplace_backward": True}), ("taid", {"inplace_backward": True})]]


def _inputs():
    s, t = make_logits(SHAPE, "mixed_inf", seed=21)
    mask = torch.ones(SHAPE[:2], dtype=torch.bool)
    mask[1, 2] = False
    flags = torch.tensor([True, False])
    ids = torch.randint(0, SHAPE[-1], SHAPE[:2], generator=torch.Generator().manual_seed(3))
    return s, t, mask, flags, ids


def _call(name, params, backend, s, t, mask, flags, ids, **options):
    loss_fn = kdplug.get(name, backend=backend, **options, **params)
    extra = {"student_generated": flags} if name == "distillm2" else {}
    return loss_fn(s, t, mask=mask, log_ratio_at=ids, **extra)


def _worker(rank, world, runs, s, t, mask, flags, ids, out_loss, out_grad, out_ratio, errors):
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    for i, (name, params, backend) in enumerate(runs):
        x = s[..., lo:hi].clone().requires_grad_()
        loss, ratio = _call(name, params, backend, x, t[..., lo:hi].contiguous(), mask, flags, ids,
                            process_group=dist.group.WORLD)
        loss.backward()
        out_loss[i, rank] = loss.detach()
        out_ratio[i, rank] = ratio
        out_grad[i, ..., lo:hi] = x.grad
    # A row that is all -inf over the whole vocabulary (not only within a shard) is an error.
    bad = s.clone()
    bad[0, 1] = float("-inf")
    for j, backend in enumerate(BACKEND_NAMES):
        try:
            kdplug.get("fkl", backend=backend, process_group=dist.group.WORLD)(
                bad[..., lo:hi].contiguous(), t[..., lo:hi].contiguous())
        except RuntimeError as exc:
            errors[j, rank] = "student_logits has a row that is not masked but is all -inf" in str(exc)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def sharded(request):
    world = request.param
    s, t, mask, flags, ids = _inputs()
    out_loss = torch.zeros(len(RUNS), world, dtype=torch.float64).share_memory_()
    out_ratio = torch.zeros((len(RUNS), world) + SHAPE[:2], dtype=torch.float64).share_memory_()
    out_grad = torch.zeros((len(RUNS),) + SHAPE, dtype=torch.float64).share_memory_()
    errors = torch.zeros(len(BACKEND_NAMES), world, dtype=torch.bool).share_memory_()
    spawn_gloo_ranks(_worker, world, RUNS, s, t, mask, flags, ids, out_loss, out_grad, out_ratio, errors)
    return world, out_loss, out_grad, out_ratio, errors


@pytest.mark.parametrize("i", range(len(RUNS)),
                         ids=[f"{b}-{n}-{','.join(f'{k}={v}' for k, v in p.items()) or 'default'}"
                              for n, p, b in RUNS])
def test_sharded_equals_unsharded(sharded, i):
    world, out_loss, out_grad, out_ratio, _ = sharded
    name, params, backend = RUNS[i]
    s, t, mask, flags, ids = _inputs()
    x = s.clone().requires_grad_()
    loss, ratio = _call(name, params, backend, x, t, mask, flags, ids)
    loss.backward()
    for rank in range(world):  # every rank holds the whole loss and log-ratio
        torch.testing.assert_close(out_loss[i, rank], loss.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out_ratio[i, rank], ratio, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_grad[i], x.grad, rtol=1e-9, atol=1e-12)


def test_a_row_all_inf_across_the_shards_is_an_error(sharded):
    assert bool(sharded[4].all())


def test_process_group_rejects_what_cannot_be_sharded():
    with pytest.raises(ValueError, match="vocab_align"):
        kdplug.get("fkl", process_group=object(), vocab_align="pad")
    s, t = make_logits((2, 5))
    topk = kdplug.TopK(torch.tensor([[0], [1]]), torch.zeros(2, 1), kind="logprobs")
    with pytest.raises(ValueError, match="TopK"):
        kdplug.get("fkl", process_group=object())(s, topk)


def _dtensor_worker(rank, world, s, t, mask, out_loss, out_grad):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    for i, (name, backend) in enumerate(DTENSOR_RUNS):
        x = distribute_tensor(s.clone(), mesh, [Shard(2)]).requires_grad_()
        teacher = distribute_tensor(t.clone(), mesh, [Shard(2)])
        loss = kdplug.get(name, backend=backend)(x, teacher, mask=mask)
        loss.backward()
        out_loss[i, rank] = loss.detach()
        grad = x.grad.full_tensor()
        if rank == 0:
            out_grad[i] = grad


DTENSOR_RUNS = [("amid", b) for b in BACKEND_NAMES] + [("akl", "torch"), ("taid", BACKEND_NAMES[-1])]


def test_dtensor_logits_sharded_on_the_vocabulary():
    """DTensors with placement Shard(-1) on a 1-D mesh: the loss and the (DTensor) gradient are the
    unsharded ones."""
    world = 3
    s, t, mask, _, _ = _inputs()
    out_loss = torch.zeros(len(DTENSOR_RUNS), world, dtype=torch.float64).share_memory_()
    out_grad = torch.zeros((len(DTENSOR_RUNS),) + SHAPE, dtype=torch.float64).share_memory_()
    spawn_gloo_ranks(_dtensor_worker, world, s, t, mask, out_loss, out_grad)
    for i, (name, backend) in enumerate(DTENSOR_RUNS):
        x = s.clone().requires_grad_()
        loss = kdplug.get(name, backend=backend)(x, t, mask=mask)
        loss.backward()
        torch.testing.assert_close(out_loss[i], loss.detach().expand(world), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out_grad[i], x.grad, rtol=1e-9, atol=1e-12)
