"""SavedTensorMeter on functions whose saved tensors are known exactly.

fp32 (3, 4) tensors are 48 bytes. What autograd saves, per op:
    a * b   (both require grad)  saves a and b (each is the other's gradient factor)
    a * 2.0 (scalar)             saves nothing
    sin(a)                       saves a (d sin = cos(a))
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigbatch.memory.activation import SavedTensorMeter, measure_saved_bytes, record_saved

BYTES = 3 * 4 * 4  # one (3, 4) fp32 tensor


def _x_and_module() -> tuple[torch.Tensor, nn.Module]:
    module = nn.Module()
    module.w = nn.Parameter(torch.randn(3, 4))
    return torch.randn(3, 4, requires_grad=True), module


def test_sin_of_product_counts_x_and_the_product_not_the_parameter():
    x, module = _x_and_module()
    with SavedTensorMeter(module) as meter:
        y = (x * module.w).sin()  # mul saves x and w (w: a parameter, excluded); sin saves x*w
    assert (meter.count, meter.bytes) == (2, 2 * BYTES)
    y.sum().backward()  # the saved tensors still unpack correctly
    torch.testing.assert_close(x.grad, module.w.detach() * (x * module.w).detach().cos())


def test_a_plain_weight_counts_unless_excluded_a_parameter_never():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    with SavedTensorMeter() as meter:
        (x * w).sin()
    assert (meter.count, meter.bytes) == (3, 3 * BYTES)  # x, w, x*w
    with SavedTensorMeter([w]) as meter:
        (x * w).sin()
    assert (meter.count, meter.bytes) == (2, 2 * BYTES)
    linear = nn.Linear(4, 5, bias=False)
    with SavedTensorMeter() as meter:  # nothing excluded, yet the saved W.t() is a parameter's view
        linear(x)
    assert (meter.count, meter.bytes) == (1, BYTES)


def test_a_tensor_saved_twice_counts_once():
    x = torch.randn(3, 4, requires_grad=True)
    with SavedTensorMeter() as meter:
        x * x  # saves x as self and as other
    assert (meter.count, meter.bytes) == (1, BYTES)


def test_views_of_one_storage_count_once_and_whole():
    qk = torch.randn(3, 8, requires_grad=True)  # 96 bytes; q and k are views into it
    with SavedTensorMeter() as meter:
        q, k = qk[:, :4], qk[:, 4:]
        (q * k).sum()
    assert (meter.count, meter.bytes) == (1, 3 * 8 * 4)


@pytest.mark.parametrize("numel", [12, 2**16, 2**18])  # whether the allocator reuses depends on size
def test_a_freed_storage_is_not_confused_with_a_new_one_at_the_same_address(numel):
    x = torch.randn(numel, requires_grad=True)
    with SavedTensorMeter() as meter:
        a = (x * 2.0).sin()  # saves x*2
        del a                # graph and x*2 freed; the allocator may reuse the address ...
        (x * 3.0).sin()      # ... for x*3, a different storage: the meter must count it too
    assert (meter.count, meter.bytes) == (2, 2 * 4 * numel)


def test_checkpoint_counts_the_region_input_only():
    x, module = _x_and_module()
    with SavedTensorMeter(module) as meter:
        checkpoint(lambda t: (t * module.w).sin(), x, use_reentrant=False)
    assert (meter.count, meter.bytes) == (1, BYTES)  # x; the product is recomputed in backward


def test_record_saved_counts_in_every_active_meter_once():
    kept = torch.randn(3, 4)
    record_saved(kept)  # no meter active: nothing happens
    with SavedTensorMeter() as outer:
        with SavedTensorMeter() as inner:
            record_saved((kept, [kept[1:]], None))
            x = torch.randn(3, 4, requires_grad=True)
            x.sin()
    assert (inner.count, inner.bytes) == (2, 2 * BYTES)
    assert (outer.count, outer.bytes) == (2, 2 * BYTES)  # the inner hook counts for the outer too


def test_dtypes_count_their_own_size():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with SavedTensorMeter() as meter:
        x.sin()
    assert meter.bytes == 3 * 4 * 8


def test_measure_saved_bytes_leaves_buffers_and_rng_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    buffers = [b.clone() for b in model.buffers()]
    x = torch.randn(5, 4)
    rng = torch.get_rng_state()
    nbytes = measure_saved_bytes(model, x, loss_fn=lambda out: out.sum())
    # Linear saves x (80 B); BatchNorm saves its input (160 B) and batch mean and invstd (32 B each);
    # running mean/var are buffers, excluded; dropout saves its mask as a float tensor on CPU (160 B).
    assert nbytes == 5 * 4 * 4 + 5 * 8 * 4 + 2 * 8 * 4 + 5 * 8 * 4
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
