"""int8/int4 pseudo-gradient quantization: the error bound, the byte count, the average, error feedback."""

from __future__ import annotations

import pytest
import torch

from bigbatch.comm import Communicator, run_local
from bigbatch.compression.factory import build_compressor
from bigbatch.compression.quantize import (LEVELS, Quantized, dequantize, group_count, pack_int4,
                                           quantize, quantized_bytes, unpack_int4)

SHAPES = [(8, 16), (10,), (3, 5, 7), ()]  # 128, 10, 105 and 1 elements


def tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * 10 ** torch.randint(-3, 3, (), generator=gen).item()
            for shape in SHAPES]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [64, 5, 0])
def test_round_trip_error_is_at_most_half_a_step_of_its_group(bits, block_size):
    for x in tensors(0):
        codes, scales = quantize(x, bits, block_size)
        assert codes.dtype == torch.int8 and codes.abs().max() <= LEVELS[bits]
        assert scales.numel() == group_count(x.shape, block_size)
        back = dequantize(codes, scales, x.shape, block_size)
        # Group of each element: consecutive blocks of block_size, or the rows (first dimension).
        flat = x.reshape(-1)
        length = block_size or (flat.numel() // scales.numel())
        group = torch.arange(flat.numel()) // length
        absmax = torch.zeros(scales.numel()).scatter_reduce(0, group, flat.abs(), "amax")
        torch.testing.assert_close(scales, absmax / LEVELS[bits], rtol=0, atol=0)  # scale = max|x| / Q
        bound = absmax[group] / (2 * LEVELS[bits])  # |x - x'| <= scale / 2
        assert torch.all((flat - back.reshape(-1)).abs() <= bound * (1 + 1e-5) + 1e-12)


def test_all_zero_group_gives_zero_codes_and_scale():
    codes, scales = quantize(torch.zeros(70), 8, 64)
    assert scales.tolist() == [0.0, 0.0] and codes.abs().sum() == 0


def test_int4_packs_two_codes_per_byte():
    codes = torch.tensor([-7, 7, 0, 3, -1], dtype=torch.int8)  # odd length: a zero code pads
    packed = pack_int4(codes)
    # nibble = code + 8, element 2i low: (-7+8) | (7+8)<<4 = 1 | 240; 8 | 11<<4; 7 | 8<<4
    assert packed.tolist() == [241, 8 + 176, 7 + 128]
    assert torch.equal(unpack_int4(packed, 5), codes)


@pytest.mark.parametrize("bits, block_size, expected", [
    # per tensor: codes (n bytes for int8, ceil(n / 2) for int4) + 4 bytes per scale
    (8, 64, (128 + 4 * 2) + (10 + 4) + (105 + 4 * 2) + (1 + 4)),
    (4, 64, (64 + 4 * 2) + (5 + 4) + (53 + 4 * 2) + (1 + 4)),
    (8, 0, (128 + 4 * 8) + (10 + 4) + (105 + 4 * 3) + (1 + 4)),  # rows: 8, 1, 3, 1
    (4, 0, (64 + 4 * 8) + (5 + 4) + (53 + 4 * 3) + (1 + 4)),
])
def test_bytes_sent_are_codes_plus_scales(bits, block_size, expected):
    assert sum(quantized_bytes(s, bits, block_size) for s in SHAPES) == expected

    def rank(comm):
        compressor = build_compressor(f"int{bits}", block_size=block_size, error_feedback=False)
        compressor.reduce([(str(i), t) for i, t in enumerate(tensors(comm.rank))], comm)
        return comm.take_step_stats()

    for stats in run_local(rank, 2):
        assert stats[f"comm_bytes/grad_allgather_int{bits}"] == expected
        assert stats["comm_bytes/uncompressed"] == (128 + 10 + 105 + 1) * 4
        assert stats["comm_bytes/total"] == expected


@pytest.mark.parametrize("bits", [8, 4])
def test_average_is_the_mean_of_dequantized_values_bitwise_on_every_rank(bits):
    def rank(comm):
        grads = tensors(comm.rank)
        Quantized(bits, 16, error_feedback=False).reduce([(str(i), t) for i, t in enumerate(grads)], comm)
        return grads

    results = run_local(rank, 2)
    for i, shape in enumerate(SHAPES):
        approx = [dequantize(*quantize(tensors(r)[i], bits, 16), torch.Size(shape), 16) for r in range(2)]
        expected = (approx[0] + approx[1]) / 2
        assert torch.equal(results[0][i], expected) and torch.equal(results[1][i], expected)


def test_error_feedback_keeps_the_running_sum_within_one_step():
    # The same vector x (max|x| = 1) sent T times as int4 (one block). Without feedback every call
    # loses the same rounding error, so the sum drifts by T times it. With feedback call t sends
    # x + e_{t-1} - e_t, so the sum is T x - e_T: off by the last residual only, at most half a step
    # of max|x + e| / 7 <= (1 + 1/14) / 7, i.e. |e_T| <= (1 + 1/14) / 14.
    x = torch.linspace(-1.0, 0.9, 64)
    steps, half_step = 20, 1.0 / 14
    sums = {}
    for feedback in (False, True):
        compressor, total = Quantized(4, 64, error_feedback=feedback), torch.zeros(64)
        for _ in range(steps):
            grad = x.clone()
            compressor.reduce([("x", grad)], Communicator())  # one process: quantization only
            total += grad
        sums[feedback] = (total - steps * x).abs().max().item()
    assert sums[False] > 10 * half_step  # 20 times the same rounding error
    # |x + e| <= 1 + half_step, so the residual stays within (1 + half_step) / 14
    assert sums[True] <= (1 + half_step) / 14 + 1e-5
    state = compressor.state_dict()
    assert set(state["errors"]) == {"x"} and state["errors"]["x"].abs().max() <= (1 + half_step) / 14 + 1e-6


def test_quantizers_are_for_pseudo_gradients_only():
    from bigbatch.compression.registry import compressor_spec

    assert compressor_spec("int8", "diloco.compression.method", pseudo_gradients=True).kinds == ("grad_allgather_int8",)
    with pytest.raises(ValueError, match="compression.method: 'int4' compresses DiLoCo pseudo-gradients only"):
        compressor_spec("int4")
