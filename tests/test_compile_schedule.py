"""A changing schedule value (TAID's t) reaches the math as a tensor: one graph, no recompiles."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import kdplug

BACKENDS = ["torch"] + (["compiled"] if kdplug._extension.has_ops() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_taid_steps_compile_once_and_match_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 33)
    x = torch.randn(6, 8)
    teacher = torch.randn(6, 33) * 2
    compiled_fn = kdplug.get("taid", backend=backend, step_size=0.05, momentum=0.5, total_steps=10)
    eager_fn = kdplug.get("taid", backend=backend, step_size=0.05, momentum=0.5, total_steps=10)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def compiled_step(x, teacher):
        return compiled_fn(layer(x), teacher)

    ts = []
    for _ in range(10):
        loss = compiled_step(x, teacher)
        (grad,) = torch.autograd.grad(loss, layer.weight)
        expected = eager_fn(layer(x), teacher)
        (expected_grad,) = torch.autograd.grad(expected, layer.weight)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
        compiled_fn.step(loss.detach())
        eager_fn.step(expected.detach())
        ts.append(compiled_fn.t)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} graphs for 10 steps"
    assert len(set(ts)) == 10 and ts == sorted(ts), f"t did not advance every step: {ts}"
