"""PowerSGD and the baselines in one process: exactness, error feedback, a reference simulation of N
ranks, byte counts, and state round trips. Simulated ranks are threads (`run_local`)."""

from __future__ import annotations

import hashlib
import io
import math
import pickle

import pytest
import torch
from torch import nn

from bigbatch.compression.base import LowPrecision, NoCompression, flatten, unflatten_into
from bigbatch.compression.ddp_hook import CompressionHookState
from bigbatch.compression.factory import build_compressor
from bigbatch.compression.powersgd import PowerSGD
from bigbatch.comm import Communicator, run_local

# Gradient shapes of nn.Sequential(Linear(32, 64), ReLU, Linear(64, 64), ReLU, Linear(64, 3)) plus a
# conv kernel, which PowerSGD views as (8, 4*3*3) = (8, 36).
SHAPES = {"0.weight": (64, 32), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,),
          "4.weight": (3, 64), "4.bias": (3,), "conv.weight": (8, 4, 3, 3)}


def make_grads(steps: int, world_size: int, seed: int = 0) -> list[list[dict[str, torch.Tensor]]]:
    """grads[step][rank][name]: standard normal, different on every rank and step."""
    gen = torch.Generator().manual_seed(seed)
    return [[{name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
             for _ in range(world_size)] for _ in range(steps)]


def roundtrip_columns(factor, bits):
    """A factor (rows x r) as quantized P/Q travel: column by column in blocks of 64 consecutive
    entries of its transpose, scale = max|x| / Q (Q = 127 or 7), x' = round(x / scale) * scale."""
    levels = {8: 127, 4: 7}[bits]
    flat = factor.t().reshape(-1)
    out = torch.zeros_like(flat)
    for start in range(0, flat.numel(), 64):
        block = flat[start:start + 64]
        scale = block.abs().max() / levels
        if scale > 0:
            out[start:start + 64] = torch.round(block / scale) * scale
    return out.view(factor.shape[1], factor.shape[0]).t()


def reference_factor_bytes(n, m, r, factor_bits):
    """Bytes of P (n x r) and Q (m x r): float32, or int8/int4 codes plus a float32 scale per 64."""
    if not factor_bits:
        return 4 * (n + m) * r
    return sum(r * (k if factor_bits == 8 else -(-k // 2)) + 4 * -(-r * k // 64) for k in (n, m))


def reference_step_bytes(shapes, rank, factor_bits, min_compression_rate=2.0):
    """Bytes a rank sends in a compressed step: factors of the matrices worth compressing, the rest plain."""
    total = 0
    for shape in shapes:
        n, m = shape[0], math.prod(shape[1:])
        r = min(n, m, rank)
        if len(shape) < 2 or 4 * n * m < min_compression_rate * reference_factor_bytes(n, m, r, factor_bits):
            total += 4 * n * m
        else:
            total += reference_factor_bytes(n, m, r, factor_bits)
    return total


def reference_powersgd(grads, rank, start_step, min_compression_rate=2.0, seed=0,
                       error_feedback=True, warm_start=True, factor_bits=0):
    """Outputs[step][name] of PowerSGD over all ranks' gradients, written straight from the paper
    (Vogels et al. 2019, Algorithm 1 with error feedback), one matrix at a time.

    Initial Q of a parameter: torch.randn(m, r) from a Generator seeded with the first 8 bytes
    (little endian, top bit cleared) of blake2b(f"{seed}:{name}:{draw}"), draw = 0, 1, ...
    With factor_bits, each rank's P and Q are sent as `roundtrip_columns` and averaged (P's mean
    instead of its sum: orthogonalization ignores the scale), and a matrix is compressed when its
    float32 bytes are >= min_compression_rate x the quantized factors' bytes.
    """
    def sent(factor):
        return roundtrip_columns(factor, factor_bits) if factor_bits else factor

    world = len(grads[0])
    errors = [{} for _ in range(world)]
    warm_q, draws, outputs = {}, {}, []
    for step, per_rank in enumerate(grads):
        out = {}
        for name in per_rank[0]:
            shape = per_rank[0][name].shape
            mean = sum(g[name] for g in per_rank) / world
            n = shape[0]
            m = mean.numel() // n
            r = min(n, m, rank)
            if step < start_step or len(shape) < 2 or 4 * n * m < min_compression_rate * reference_factor_bytes(n, m, r, factor_bits):
                out[name] = mean
                continue
            ms = [g[name].reshape(n, m) + (errors[k].get(name, 0) if error_feedback else 0)
                  for k, g in enumerate(per_rank)]
            q = warm_q.get(name) if warm_start else None
            if q is None:
                draw = draws.get(name, 0)
                draws[name] = draw + 1
                digest = hashlib.blake2b(f"{seed}:{name}:{draw}".encode(), digest_size=8).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
                q = torch.randn(m, r, generator=gen)
            p = sum(sent(mk @ q) for mk in ms) / (world if factor_bits else 1)
            for j in range(r):  # Gram-Schmidt, column by column
                for i in range(j):
                    p[:, j] -= (p[:, i] @ p[:, j]) * p[:, i]
                p[:, j] /= p[:, j].norm()
            q = sum(sent(mk.t() @ p) for mk in ms) / world
            approx = p @ q.t()
            warm_q[name] = q
            for k in range(world):
                errors[k][name] = ms[k] - approx
            out[name] = approx.reshape(shape)
        outputs.append(out)
    return outputs


def apply_compressor(comm, compressor, grads):
    """Run `compressor` on this rank's gradients at every step; outputs[step][name]."""
    outputs = []
    for per_rank in grads:
        named = [(name, g.clone()) for name, g in per_rank[comm.rank].items()]
        compressor.reduce(named, comm)
        compressor.end_step()
        outputs.append(dict(named))
    return outputs


def _run_powersgd(comm, grads, settings):
    return apply_compressor(comm, PowerSGD(**settings), grads), comm.totals()


def assert_outputs_close(actual, expected, atol):
    for step, (a, e) in enumerate(zip(actual, expected)):
        for name in e:
            torch.testing.assert_close(a[name], e[name], rtol=1e-4, atol=atol,
                                       msg=lambda m: f"step {step}, {name}: {m}")


@pytest.mark.parametrize("settings", [
    dict(rank=2, start_step=2),
    dict(rank=1, start_step=0, warm_start=False),
    dict(rank=4, start_step=1, error_feedback=False, seed=7),
], ids=["rank2", "no-warm-start", "no-error-feedback"])
def test_simulated_ranks_match_reference(settings):
    assert_ranks_match_reference(make_grads(steps=5, world_size=3), settings)


def assert_ranks_match_reference(grads, settings):
    """3 simulated ranks: each close to the reference, all bitwise equal to each other."""
    expected = reference_powersgd(grads, **settings)
    per_rank = run_local(_run_powersgd, 3, grads, settings)
    for outputs, _ in per_rank:
        assert_outputs_close(outputs, expected, atol=1e-4)
    for outputs, _ in per_rank[1:]:  # every rank applies the very same update
        for step in range(len(grads)):
            for name in SHAPES:
                assert torch.equal(outputs[step][name], per_rank[0][0][step][name])
    return expected


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_factors_match_reference(bits):
    settings = dict(rank=3, start_step=1, factor_bits=bits)
    grads = make_grads(steps=5, world_size=3, seed=2)
    expected = assert_ranks_match_reference(grads, settings)
    plain = reference_powersgd(grads, rank=3, start_step=1)
    error = (expected[-1]["2.weight"] - plain[-1]["2.weight"]).norm() / plain[-1]["2.weight"].norm()
    assert error > 1e-3  # the rounding is real: the quantized run is not the float32 one


def _count_quantized_bytes(comm):
    compressor = PowerSGD(rank=2, start_step=0, factor_bits=8)
    named = [(name, torch.randn(shape)) for name, shape in SHAPES.items()]
    compressor.reduce(named, comm)
    return comm.take_step_stats()


def test_quantized_factor_bytes_match_the_analytic_count():
    # int8, rank 2, blocks of 64 along each transposed factor (r x rows): r*rows codes + 4 per block.
    #   0.weight (64, 32): P^T 2x64 128 + 4*2 = 136, Q^T 2x32 64 + 4*1 = 68; 4*2048 >= 2*204: compressed
    #   2.weight (64, 64): P 136, Q 136
    #   4.weight (3, 64): P^T 2x3 6 + 4 = 10, Q^T 136; 4*192 = 768 >= 2*146: compressed (float32: not)
    #   conv (8, 36): P^T 2x8 16 + 4 = 20, Q^T 2x36 72 + 8 = 80; 4*288 >= 2*100: compressed
    stats = run_local(_count_quantized_bytes, 2)[0]
    assert stats["comm_bytes/powersgd_p"] == 136 + 136 + 10 + 20
    assert stats["comm_bytes/powersgd_q"] == 68 + 136 + 136 + 80
    assert stats["comm_bytes/powersgd_uncompressed"] == (64 + 64 + 3) * 4
    assert PowerSGD(rank=2, factor_bits=8).compressed_rank((3, 64)) == 2
    assert PowerSGD(rank=2).compressed_rank((3, 64)) == 0


DEMO_SHAPES = [(1024, 784), (1024,), (1024, 1024), (1024,), (10, 1024), (10,)]  # configs/fashion_mnist.yaml


@pytest.mark.parametrize("factor_bits", [0, 8, 4])
@pytest.mark.parametrize("target_ratio", [20, 100, 150])
def test_target_ratio_chooses_the_largest_rank_within_the_byte_budget(factor_bits, target_ratio):
    full = 4 * sum(math.prod(s) for s in DEMO_SHAPES)
    compressor = PowerSGD(factor_bits=factor_bits)
    rank = compressor.fit_rank(DEMO_SHAPES, target_ratio)
    assert compressor.rank == rank
    assert reference_step_bytes(DEMO_SHAPES, rank, factor_bits) * target_ratio <= full
    assert reference_step_bytes(DEMO_SHAPES, rank + 1, factor_bits) * target_ratio > full
    assert compressor.step_bytes(DEMO_SHAPES) == reference_step_bytes(DEMO_SHAPES, rank, factor_bits)


def test_target_ratio_out_of_reach_names_the_key_and_the_most_it_can_do():
    shapes = [(64, 64), (4096,)]  # the plain vector alone is half the bytes: ratio < 2 at any rank
    with pytest.raises(ValueError, match=r"compression.target_ratio: 10 is out of reach .*\(16,384 B of it in "
                                         r"tensors sent plain.* set target_ratio <= 1.9$"):
        PowerSGD().fit_rank(shapes, 10)
    # Where int8 factors would reach it, the message says so too: (64 + 64) x 4 B at rank 1 is 2048x /
    # 512 B = 32x fewer in float32, about 110x in int8.
    with pytest.raises(ValueError, match=r"set target_ratio <= 32 or factor_bits: 8$"):
        PowerSGD().fit_rank([(64, 64)], 100)
    assert PowerSGD().fit_rank(shapes, 1.9) == 1  # the bound it names is reachable
    # 8x8 (256 B): rank 2 sends 128 B (2x); rank 3's 192 B are not 2x smaller (min_compression_rate),
    # so the matrix would go plain: the choice stops at 2.
    assert PowerSGD().fit_rank([(8, 8)], 1.5) == 2


@pytest.mark.parametrize("orthogonalization", ["gram_schmidt", "qr"])
def test_exact_rank_r_average_is_reconstructed(orthogonalization):
    # Two ranks, each holding a rank-1 gradient: their average has rank exactly 2, so rank-2
    # PowerSGD recovers it once warm (one power iteration already spans its column space).
    gen = torch.Generator().manual_seed(3)

    def rank_one(n, m):
        return torch.randn(n, 1, generator=gen) @ torch.randn(1, m, generator=gen)

    per_rank = [{"w": rank_one(48, 40), "k": rank_one(16, 36).view(16, 4, 3, 3)} for _ in range(2)]
    grads = [per_rank] * 3  # the same gradient for three steps (warm start)
    settings = dict(rank=2, start_step=0, error_feedback=False, orthogonalization=orthogonalization)
    outputs, _ = run_local(_run_powersgd, 2, grads, settings)[0]
    for name in ("w", "k"):
        mean = (per_rank[0][name] + per_rank[1][name]) / 2
        error = (outputs[-1][name] - mean).norm() / mean.norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


def test_error_feedback_conserves_the_gradient_sum():
    # One rank: whatever is not applied at a step stays in the residual, so after T steps
    #   sum(applied) + residual == sum(inputs)   for every parameter, compressed or not.
    comm, compressor = Communicator(), PowerSGD(rank=1, start_step=2)
    grads = make_grads(steps=6, world_size=1, seed=5)
    applied = apply_compressor(comm, compressor, grads)
    for name in SHAPES:
        inputs = sum(step[0][name] for step in grads)
        residual = compressor.residual(name)
        total = sum(out[name] for out in applied) + (0 if residual is None else residual)
        torch.testing.assert_close(total, inputs, rtol=0, atol=1e-5)
    assert compressor.residual("0.weight").norm() > 0.1  # rank 1 really was lossy
    assert compressor.residual("0.bias") is None  # biases are averaged exactly, no residual


def _count_mlp_bytes(comm):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    compressor = PowerSGD(rank=2, start_step=1)
    stats = []
    for _ in range(2):
        named = [(name, torch.randn_like(p)) for name, p in model.named_parameters()]
        compressor.reduce(named, comm)
        compressor.end_step()
        stats.append(comm.take_step_stats())
    return stats


def test_bytes_match_the_analytic_count():
    # float32, rank 2, min rate 2. The MLP has 2048 + 64 + 4096 + 64 + 192 + 3 = 6467 parameters.
    #   0.weight (64, 32): 2048 >= 2 * (64+32) * 2 = 384 -> compressed, P 64*2 = 128, Q 32*2 = 64
    #   2.weight (64, 64): 4096 >= 2 * 128 * 2 = 512    -> compressed, P 128,        Q 128
    #   4.weight (3, 64):   192 <  2 * 67 * 2 = 268      -> uncompressed
    #   biases: uncompressed. Uncompressed: 64 + 64 + 192 + 3 = 323 elements.
    before, after = run_local(_count_mlp_bytes, 2)[0]
    assert before["comm_bytes/grad_allreduce"] == 6467 * 4  # step 0 < start_step: plain
    assert before["comm_bytes/uncompressed"] == 6467 * 4
    assert after["comm_bytes/powersgd_p"] == (128 + 128) * 4
    assert after["comm_bytes/powersgd_q"] == (64 + 128) * 4
    assert after["comm_bytes/powersgd_uncompressed"] == 323 * 4
    assert after["comm_bytes/grad_allreduce"] == 0
    assert after["comm_bytes/total"] == (256 + 192 + 323) * 4
    assert after["comm_bytes/uncompressed"] == 6467 * 4


@pytest.mark.parametrize("shape, expected", [
    ((64, 32), 2), ((3, 64), 0), ((64,), 0), ((8, 4, 3, 3), 2), ((2, 2), 0), ((1, 1000), 0),
    ((0, 5), 0), ((6, 6), 0),  # 36 < 2 * 12 * 2 = 48
    ((8, 8), 2),  # 64 >= 2 * 16 * 2 = 64: the rate is met exactly, so it compresses
])
def test_which_tensors_are_compressed(shape, expected):
    assert PowerSGD(rank=2).compressed_rank(shape) == expected


def _save_and_resume(comm, grads, settings, split):
    uninterrupted = PowerSGD(**settings)
    first = apply_compressor(comm, uninterrupted, grads[:split])
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = PowerSGD(**settings)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.step == split
    rest = grads[split:]
    return first, apply_compressor(comm, uninterrupted, rest), apply_compressor(comm, resumed, rest)


@pytest.mark.parametrize("warm_start, factor_bits", [(True, 0), (False, 0), (True, 4)])
def test_state_dict_round_trip_continues_identically(warm_start, factor_bits):
    settings = dict(rank=2, start_step=2, warm_start=warm_start, factor_bits=factor_bits)
    grads = make_grads(steps=7, world_size=2, seed=11)
    for _, continued, resumed in run_local(_save_and_resume, 2, grads, settings, 4):
        for a, b in zip(continued, resumed):
            for name in SHAPES:
                assert torch.equal(a[name], b[name]), name


def test_load_state_dict_rejects_another_rank():
    state = PowerSGD(rank=2).state_dict()
    with pytest.raises(ValueError, match="set compression.rank"):
        PowerSGD(rank=4).load_state_dict(state)


def test_non_contiguous_and_zero_gradients():
    comm = Communicator()
    base = torch.randn(40, 64)
    named = [("t", base.clone().t()), ("z", torch.zeros(64, 64))]  # transposed: not contiguous
    PowerSGD(rank=2, start_step=0, error_feedback=False).reduce(named, comm)
    reference = [("t", base.clone().t().contiguous()), ("z", torch.zeros(64, 64))]
    PowerSGD(rank=2, start_step=0, error_feedback=False).reduce(reference, comm)
    assert torch.equal(named[0][1], reference[0][1])
    assert torch.equal(named[1][1], torch.zeros(64, 64))  # no NaN from normalizing a zero column


def _low_precision(comm, compressor, values):
    grads = [("w", torch.full((3, 5), values[comm.rank])), ("b", torch.full((7,), -values[comm.rank]))]
    compressor.reduce(grads, comm)
    return dict(grads), comm.take_step_stats()


@pytest.mark.parametrize("method, kind, rtol", [("none", "grad_allreduce", 0.0),
                                                ("fp16", "grad_allreduce_fp16", 1e-3),
                                                ("bf16", "grad_allreduce_bf16", 1e-2)])
def test_baselines_average_within_their_precision(method, kind, rtol):
    # 40000 + 50000 overflows float16 (max 65504); fp16 divides by the world size first.
    values = [40000.123, 50000.456]
    mean = sum(values) / 2
    for grads, stats in run_local(lambda comm: _low_precision(comm, build_compressor(method), values), 2):
        torch.testing.assert_close(grads["w"], torch.full((3, 5), mean), rtol=rtol, atol=0)
        torch.testing.assert_close(grads["b"], torch.full((7,), -mean), rtol=rtol, atol=0)
        element_size = 4 if method == "none" else 2
        assert stats[f"comm_bytes/{kind}"] == 22 * element_size
        assert stats["comm_bytes/uncompressed"] == 22 * 4


def test_factory():
    assert isinstance(build_compressor("none"), NoCompression)
    assert build_compressor("bf16").dtype == torch.bfloat16
    assert isinstance(build_compressor("fp16"), LowPrecision)
    psgd = build_compressor("powersgd", rank=3, start_step=5, orthogonalization="qr")
    assert (psgd.rank, psgd.start_step, psgd.orthogonalization) == (3, 5, "qr")
    assert build_compressor("torch_powersgd", rank=2) is None
    with pytest.raises(ValueError, match="unknown compression method .topk.. Choose one of none, fp16"):
        build_compressor("topk")
    assert isinstance(build_compressor("fp16", rank=2, seed=1), LowPrecision)  # powersgd-only: ignored
    with pytest.raises(ValueError, match="unknown compression setting.* rnak; valid: rank, start_step"):
        build_compressor("powersgd", rnak=2)
    with pytest.raises(ValueError, match="rank must be"):
        PowerSGD(rank=0)
    with pytest.raises(ValueError, match="factor_bits must be 0 .float., 8 or 4, got 16"):
        PowerSGD(factor_bits=16)


def test_flatten_is_a_view_for_back_to_back_tensors_and_a_copy_otherwise():
    buffer = torch.arange(10.0)
    views = [buffer[:6].view(2, 3), buffer[6:]]  # how DDP lays out a bucket's gradients
    assert flatten(views).data_ptr() == buffer.data_ptr()
    apart = [torch.ones(2, 3), torch.ones(4)]
    flat = flatten(apart)
    flat.mul_(2)
    unflatten_into(flat, apart)
    assert torch.equal(apart[0], torch.full((2, 3), 2.0)) and torch.equal(apart[1], torch.full((4,), 2.0))


def test_hook_state_pickles_without_its_process_group():
    compressor = PowerSGD(rank=2, start_step=0)
    compressor.reduce([("w", torch.randn(16, 16))], Communicator())
    state = CompressionHookState(compressor, Communicator(group=object()), {1: "w"})
    restored = pickle.loads(pickle.dumps(state))
    assert restored.comm.group is None
    assert torch.equal(restored.compressor.state_dict()["q_t"]["w"], compressor.state_dict()["q_t"]["w"])
