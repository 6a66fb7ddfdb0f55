"""What the optimizer tests (test_lamb.py, test_lars.py, test_lion_schedule_free.py) share: float64
parameters of a few shapes, a noisy quadratic gradient and a loop that steps an optimizer on it."""

from __future__ import annotations

from typing import Callable

import torch

DT = torch.float64
SHAPES = [(4, 3), (5,), (2, 3, 2)]


def make_params(seed: int = 0, zero_first: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=DT).requires_grad_() for s in SHAPES]
    if zero_first:
        with torch.no_grad():
            params[0].zero_()
    return params


class NoisyQuadratic:
    """Gradients that depend on the parameters (quadratic pull to 0.5) plus noise seeded by
    `noise_seed + step`; each test file picks its own `noise_seed`."""

    def __init__(self, noise_seed: int):
        self.noise_seed = noise_seed

    def grads_at(self, params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.noise_seed + step)
        return [2.0 * (p.detach() - 0.5) + 0.3 * torch.randn(p.shape, generator=gen, dtype=DT)
                for p in params]

    def run(self, opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int,
            first: int = 0) -> None:
        """Steps `first` .. `first + steps - 1`: set each parameter's gradient, then `opt.step()`."""
        for k in range(first, first + steps):
            for p, g in zip(params, self.grads_at(params, k)):
                p.grad = g.to(p.dtype)  # float32 parameters get the float64 gradient, rounded
            opt.step()


def assert_mixed_dtypes_agree(make_opt: Callable[[list[torch.Tensor], bool], torch.optim.Optimizer]) -> None:
    """bf16 / fp32 / fp16 tensors in one group go into separate foreach buckets: `make_opt(params,
    foreach)` with foreach on and off keeps every dtype, stays finite, and both paths agree."""
    results = []
    for foreach in (True, False):
        torch.manual_seed(0)
        ps = [torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True), torch.randn(5, requires_grad=True),
              torch.zeros(3, dtype=torch.float16, requires_grad=True)]
        opt = make_opt(ps, foreach)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        assert [p.dtype for p in ps] == [torch.bfloat16, torch.float32, torch.float16]
        results.append([p.detach().float() for p in ps])
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, both taken in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class OneThread:
    """Context manager: torch on one thread (the condition of the CPU fast paths), restored after."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
