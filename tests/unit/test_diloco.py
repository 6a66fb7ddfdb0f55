"""DiLoCo in one process: simulated replicas are threads with `LocalCommunicator`s (`run_local`).

References are written out in the tests: periodic parameter averaging, synchronous SGD on the whole
batch, the Nesterov SGD formula, a hand-computed two-replica example, byte counts from the shapes.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.compression.powersgd import PowerSGD
from bigbatch.comm import Communicator, run_local
from bigbatch.distributed.diloco import (DiLoCo, DiLoCoStrategy, build_outer_optimizer,
                                         build_pseudo_grad_compressor, replica_groups, split_fragments)

AVERAGING = {"name": "sgd", "lr": 1.0, "momentum": 0.0, "nesterov": False}  # outer step = mean


class Vec(nn.Module):
    """One parameter vector, to set replicas' weights by hand."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values))


def mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """Linear(4, 8) [BatchNorm1d(8)] Tanh Linear(8, 2): 32 + 8 + 16 + 2 = 58 parameters."""
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 2)]
    return nn.Sequential(*layers)


def batch(rank: int, step: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)  # every replica its own data
    return torch.randn(rows, 4, generator=gen), torch.randn(rows, 2, generator=gen)


def inner_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sgd_momentum(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# -- process groups and validation --------------------------------------------------------------
def test_replica_groups_layout():
    assert replica_groups(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert replica_groups(6, 3) == ([[0, 1], [2, 3], [4, 5]], [[0, 2, 4], [1, 3, 5]])
    assert replica_groups(3, 3) == ([[0], [1], [2]], [[0, 1, 2]])  # m = 1: each rank a replica
    assert replica_groups(3, 1) == ([[0, 1, 2]], [[0], [1], [2]])  # k = 1: plain DDP
    with pytest.raises(ValueError, match="diloco.replicas=3 does not divide the world size 4"):
        replica_groups(4, 3)
    with pytest.raises(ValueError, match="diloco.replicas must be an integer >= 1"):
        replica_groups(4, 0)


def test_bad_settings_raise_value_errors():
    model = Vec([1.0])  # one process, no process group: Communicator() is a world of one
    with pytest.raises(ValueError, match="diloco.inner_steps"):
        DiLoCo(model, Communicator(), inner_steps=0)
    with pytest.raises(ValueError, match="diloco.fragments: 2 fragments need at least as many inner steps"):
        DiLoCo(model, Communicator(), inner_steps=1, fragments=2)
    with pytest.raises(ValueError, match="diloco.outer_optimizer.nesterov: Nesterov needs momentum > 0"):
        build_outer_optimizer([torch.zeros(1)], momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="diloco.outer_optimizer.name"):
        build_outer_optimizer([torch.zeros(1)], name="adam")
    with pytest.raises(ValueError, match="unknown diloco.outer_optimizer setting"):
        DiLoCo(model, Communicator(), 1, outer_optimizer={"betas": 0.9})
    with pytest.raises(ValueError, match="diloco.compression.method"):
        build_pseudo_grad_compressor("torch_powersgd")
    with pytest.raises(ValueError, match="diloco.mixing"):
        DiLoCo(model, Communicator(), 1, mixing=1.5)
    DiLoCo(model, Communicator(), 1, mixing=1.0)  # keep the local weights: valid
    with pytest.raises(ValueError, match=r"diloco.sync_delay: 3 must be below .* 6 // 2 = 3"):
        DiLoCo(nn.Sequential(Vec([1.0]), Vec([2.0])), Communicator(), 6, fragments=2, sync_delay=3)
    with pytest.raises(ValueError, match="diloco.sync_delay must be an integer >= 0"):
        DiLoCo(model, Communicator(), 2, sync_delay=-1)


def test_split_fragments_contiguous_and_balanced():
    assert split_fragments([10, 10, 10, 10], 2) == [range(0, 2), range(2, 4)]
    assert split_fragments([100, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split_fragments([1, 1, 100], 2) == [range(0, 2), range(2, 3)]
    assert split_fragments([5, 5, 5], 1) == [range(0, 3)]
    with pytest.raises(ValueError, match="diloco.fragments=4 exceeds the model's 3"):
        split_fragments([1, 1, 1], 4)


# -- the algorithm against references ------------------------------------------------------------
def _train(comm, models, steps, inner_steps, outer, make_opt=sgd_momentum, **diloco_kwargs):
    model = models[comm.rank]
    opt = make_opt(model)
    diloco = DiLoCo(model, comm, inner_steps, outer_optimizer=outer, **diloco_kwargs)
    history = []
    for step in range(steps):
        inner_step(model, opt, *batch(comm.rank, step))
        diloco.maybe_outer_step(model)
        history.append(clone_state(model))
    return history


def average_into(models: list[nn.Module], names: list[str] | None = None) -> None:
    """Periodic averaging: every floating-point entry (or those in `names`) set to the replicas' mean."""
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for key, value in states[0].items():
            if value.is_floating_point() and (names is None or key in names):
                mean = sum(s[key] for s in states) / len(states)
                for s in states:
                    s[key].copy_(mean)


def test_outer_sgd_lr1_is_periodic_averaging_params_and_buffers():
    steps, inner_steps = 7, 3  # outer steps after steps 3 and 6; ends mid-cycle
    base = mlp(batchnorm=True)
    history = run_local(_train, 2, [copy.deepcopy(base) for _ in range(2)], steps, inner_steps, AVERAGING)
    ref = [copy.deepcopy(base) for _ in range(2)]
    opts = [sgd_momentum(m) for m in ref]  # inner momentum is kept across outer steps
    for step in range(steps):
        for rank in range(2):
            inner_step(ref[rank], opts[rank], *batch(rank, step))
        if (step + 1) % inner_steps == 0:
            average_into(ref)  # parameters and the BatchNorm running statistics
        for rank in range(2):
            for key, expected in ref[rank].state_dict().items():
                torch.testing.assert_close(history[rank][step][key], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(history[0][-1]["0.weight"], history[1][-1]["0.weight"])  # mid-cycle


def test_h1_outer_sgd_lr1_equals_synchronous_sgd_on_global_batch():
    steps, base = 4, mlp()

    def replica(comm, models):
        model, diloco = models[comm.rank], DiLoCo(models[comm.rank], comm, 1, outer_optimizer=AVERAGING)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            x, y = batch(0, step, rows=8)
            half = slice(4 * comm.rank, 4 * comm.rank + 4)  # each replica half the global batch
            inner_step(model, opt, x[half], y[half])
            diloco.maybe_outer_step(model)
        return clone_state(model)

    results = run_local(replica, 2, [copy.deepcopy(base) for _ in range(2)])
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(steps):
        inner_step(ref, opt, *batch(0, step, rows=8))  # mean loss over all 8 rows
    for result in results:
        for key, expected in ref.state_dict().items():
            torch.testing.assert_close(result[key], expected, rtol=0, atol=1e-6)


def test_outer_nesterov_step_matches_formula_and_torch_sgd():
    start, cycles, lr, mu = [0.5, -1.0, 2.0], 4, 0.7, 0.9
    gen = torch.Generator().manual_seed(5)
    moves = torch.randn(2, cycles, 3, generator=gen)  # moves[rank][cycle]: what inner training did

    def replica(comm):
        model = Vec(start)
        diloco = DiLoCo(model, comm, inner_steps=1)  # default outer: SGD(0.7, momentum 0.9, Nesterov)
        seen = []
        for cycle in range(cycles):
            with torch.no_grad():
                model.w.add_(moves[comm.rank, cycle])
            diloco.maybe_outer_step(model)
            seen.append(model.w.detach().clone())
        return seen

    results = run_local(replica, 2)
    theta, buf = torch.tensor(start), None
    torch_theta = torch.tensor(start)
    torch_sgd = torch.optim.SGD([torch_theta], lr=lr, momentum=mu, nesterov=True)
    for cycle in range(cycles):
        delta = -(moves[0, cycle] + moves[1, cycle]) / 2  # mean of theta_global - theta_local
        buf = delta.clone() if buf is None else mu * buf + delta
        theta = theta - lr * (delta + mu * buf)
        torch_theta.grad = delta.clone()
        torch_sgd.step()
        for seen in results:
            torch.testing.assert_close(seen[cycle], theta, rtol=0, atol=1e-6)
            torch.testing.assert_close(seen[cycle], torch_theta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lr, expected", [(1.0, [7.0, 20.0]), (0.5, [8.5, 20.0])])
def test_pseudo_gradient_sign_and_scale_hand_computed(lr, expected):
    # theta_global = [10, 20]; replica 0 trained to [8, 21], replica 1 to [6, 19].
    # delta_0 = [2, -1], delta_1 = [4, 1]; mean delta = [3, 0]; theta_global - lr * [3, 0].
    locals_ = [[8.0, 21.0], [6.0, 19.0]]

    def replica(comm):
        model = Vec([10.0, 20.0])
        diloco = DiLoCo(model, comm, 1, outer_optimizer={**AVERAGING, "lr": lr})
        with torch.no_grad():
            model.w.copy_(torch.tensor(locals_[comm.rank]))
        metrics = diloco.maybe_outer_step(model)
        return model.w.detach().clone(), diloco.global_params["w"].clone(), metrics

    for local, glob, metrics in run_local(replica, 2):
        assert local.tolist() == expected and glob.tolist() == expected
        assert metrics == {"diloco_outer_step": 1, "diloco_pseudo_grad_norm": 3.0}  # |[3, 0]|


def test_replica_zero_weights_are_broadcast_at_construction():
    def replica(comm):
        model = Vec([float(comm.rank)] * 2)  # replicas disagree
        DiLoCo(model, comm, 1)
        return model.w.detach().clone(), comm.take_step_stats()["comm_bytes/diloco_init"]

    for weights, init_bytes in run_local(replica, 2):
        assert weights.tolist() == [0.0, 0.0] and init_bytes == 2 * 4


# -- checkpointing -------------------------------------------------------------------------------
def load_checkpoint(comm, model, opt, diloco, checkpoint) -> None:
    """Rank 0's replicated state goes to every rank, as the checkpoint store does."""
    replicated = torch.load(io.BytesIO(checkpoint["replicated"]), weights_only=True)
    per_rank = torch.load(io.BytesIO(checkpoint["per_rank"][comm.rank]), weights_only=True)
    model.load_state_dict(per_rank["model"])
    opt.load_state_dict(per_rank["optimizer"])
    diloco.replicated_state().load_state_dict(replicated)
    diloco.per_rank_state().load_state_dict(per_rank["diloco"])


def save_checkpoint(model, opt, diloco) -> tuple[bytes, bytes]:
    """(replicated, this rank's) checkpoint bytes."""
    replicated, per_rank = io.BytesIO(), io.BytesIO()
    torch.save(diloco.replicated_state().state_dict(), replicated)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "diloco": diloco.per_rank_state().state_dict()}, per_rank)
    return replicated.getvalue(), per_rank.getvalue()


def _resumable(comm, models, checkpoint, first_step, last_step):
    model = models[comm.rank]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    diloco = DiLoCo(model, comm, 3, compressor=PowerSGD(rank=1, start_step=0, seed=4))
    if checkpoint is not None:
        load_checkpoint(comm, model, opt, diloco, checkpoint)
    for step in range(first_step, last_step):
        inner_step(model, opt, *batch(comm.rank, step))
        diloco.maybe_outer_step(model)
    return clone_state(model), *save_checkpoint(model, opt, diloco), diloco.state_dict()


def test_state_dict_round_trip_mid_cycle_continues_exactly():
    fresh = lambda seed: [mlp(seed) for _ in range(2)]  # noqa: E731
    uninterrupted = run_local(_resumable, 2, fresh(0), None, 0, 8)  # outer steps after 3 and 6
    first = run_local(_resumable, 2, fresh(0), None, 0, 4)  # stop one step into the second cycle
    checkpoint = {"replicated": first[0][1], "per_rank": [r[2] for r in first]}
    resumed = run_local(_resumable, 2, fresh(123), checkpoint, 4, 8)  # other init: all from the checkpoint
    for (expected, *_), (got, *_) in zip(uninterrupted, resumed):
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    # What "replicated" means: theta_global and the outer momentum are the same on both ranks...
    states = [r[3] for r in first]
    for name, tensor in states[0]["replicated"]["global_params"].items():
        assert torch.equal(tensor, states[1]["replicated"]["global_params"][name])
    momenta = [s["replicated"]["outer_optimizer"]["state"][0]["momentum_buffer"] for s in states]
    assert torch.equal(momenta[0], momenta[1])
    # ... while the PowerSGD residuals are per rank.
    errors = [s["per_rank"]["compressor"]["errors"]["0.weight"] for s in states]
    assert not torch.allclose(errors[0], errors[1])


# -- communication accounting --------------------------------------------------------------------
def _per_step_stats(comm, models, compressor_settings, steps, inner_steps):
    model = models[comm.rank]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco = DiLoCo(model, comm, inner_steps, compressor=build_pseudo_grad_compressor(**compressor_settings))
    comm.take_step_stats()  # drop the construction broadcast
    rows = []
    for step in range(steps):
        inner_step(model, opt, *batch(comm.rank, step))
        diloco.maybe_outer_step(model)
        rows.append(comm.take_step_stats())
    return rows


@pytest.mark.parametrize("method, element_bytes", [("none", 4), ("fp16", 2), ("bf16", 2)])
def test_outer_bytes_are_parameters_times_element_size(method, element_bytes):
    base = mlp()
    params = sum(p.numel() for p in base.parameters())
    assert params == 58  # 4*8 + 8 + 8*2 + 2
    rows = run_local(_per_step_stats, 2, [copy.deepcopy(base) for _ in range(2)], {"method": method}, 6, 3)
    for rank_rows in rows:
        for step, row in enumerate(rank_rows, start=1):
            outer = step % 3 == 0
            assert row["comm_bytes/diloco_outer"] == (params * element_bytes if outer else 0)
            assert row["comm_bytes/uncompressed"] == (params * 4 if outer else 0)
            assert row["comm_bytes/total"] == row["comm_bytes/diloco_outer"]  # no other kind, no buffers
            assert "comm_bytes/grad_allreduce_fp16" not in row  # the compressor's kinds are relabelled


# float32 (diloco.compression.factor_bits 0): 0.weight (8, 16) at rank 1 sends P 8 + Q 16 elements;
# 0.bias 8, 2.weight (2, 8) (16 < 2 * (2 + 8) * 1, not worth compressing) and 2.bias 2 go plain.
# int8 (8): 0.weight P^T 8 codes + a 4-byte scale, Q^T 16 + 4; 2.weight is now worth it (64 B >= 2 x
# 18 B): P^T 2 + 4, Q^T 8 + 4; the biases plain.
@pytest.mark.parametrize("factor_bits, outer_bytes", [(0, (8 + 16 + 8 + 16 + 2) * 4),
                                                      (8, 12 + 20 + 6 + 12 + (8 + 2) * 4)])
def test_outer_bytes_with_powersgd_follow_its_shapes(factor_bits, outer_bytes):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))  # input 16 here
    models = [copy.deepcopy(base) for _ in range(2)]

    def replica(comm, models):
        model = models[comm.rank]
        compressor = build_pseudo_grad_compressor("powersgd", rank=1, start_step=0, factor_bits=factor_bits)
        diloco = DiLoCo(model, comm, 1, compressor=compressor)
        comm.take_step_stats()
        with torch.no_grad():
            model[0].weight.add_(comm.rank)
        diloco.maybe_outer_step(model)
        return comm.take_step_stats()

    for row in run_local(replica, 2, models):
        assert row["comm_bytes/diloco_outer"] == outer_bytes
        assert row["comm_bytes/uncompressed"] == (8 * 16 + 8 + 16 + 2) * 4
        assert "comm_bytes/powersgd_p" not in row
    for a, b in zip(*(m.parameters() for m in models)):  # every replica applied the same bits
        assert torch.equal(a, b)


def test_float_buffers_are_averaged_and_counted_separately():
    base = mlp(batchnorm=True)
    rows = run_local(_per_step_stats, 2, [copy.deepcopy(base) for _ in range(2)], {"method": "none"}, 2, 2)
    # running_mean and running_var of BatchNorm1d(8); num_batches_tracked (int64) is left alone.
    assert rows[0][1]["comm_bytes/diloco_buffers"] == 2 * 8 * 4
    assert rows[0][1]["comm_bytes/diloco_outer"] == (58 + 16) * 4  # BatchNorm adds weight and bias


# -- streaming DiLoCo ----------------------------------------------------------------------------
def test_streaming_fragments_are_averaged_on_their_staggered_steps():
    steps, inner_steps = 9, 4
    base = mlp()
    fragment_names = [["0.weight"], ["0.bias", "2.weight", "2.bias"]]  # 32 | 8 + 16 + 2 parameters

    def replica(comm, models):
        model = models[comm.rank]
        opt = sgd_momentum(model)
        diloco = DiLoCo(model, comm, inner_steps, outer_optimizer=AVERAGING, fragments=2)
        assert diloco.fragments == fragment_names
        comm.take_step_stats()
        history, sent = [], []
        for step in range(steps):
            inner_step(model, opt, *batch(comm.rank, step))
            diloco.maybe_outer_step(model)
            history.append(clone_state(model))
            sent.append(comm.take_step_stats()["comm_bytes/diloco_outer"])
        return history, sent

    results = run_local(replica, 2, [copy.deepcopy(base) for _ in range(2)])
    # Fragment 0 syncs at steps 2, 6 (t % 4 == 2), fragment 1 at steps 4, 8 (t % 4 == 0).
    schedule = {2: 0, 6: 0, 4: 1, 8: 1}
    ref = [copy.deepcopy(base) for _ in range(2)]
    opts = [sgd_momentum(m) for m in ref]
    for step in range(1, steps + 1):
        for rank in range(2):
            inner_step(ref[rank], opts[rank], *batch(rank, step - 1))
        if step in schedule:
            average_into(ref, fragment_names[schedule[step]])
        for rank, (history, sent) in enumerate(results):
            expected_bytes = {0: 32 * 4, 1: 26 * 4}.get(schedule.get(step), 0)
            assert sent[step - 1] == expected_bytes
            for key, expected in ref[rank].state_dict().items():
                torch.testing.assert_close(history[step - 1][key], expected, rtol=0, atol=1e-6)


def test_streaming_mixing_keeps_part_of_the_local_weights():
    # Same example as the hand-computed one: new theta_global = [7, 20] (lr 1); mixing 0.5 gives
    # 0.5 * local + 0.5 * [7, 20].
    locals_ = [[8.0, 21.0], [6.0, 19.0]]
    expected = [[7.5, 20.5], [6.5, 19.5]]

    def replica(comm):
        model = Vec([10.0, 20.0])
        diloco = DiLoCo(model, comm, 1, outer_optimizer=AVERAGING, mixing=0.5)
        with torch.no_grad():
            model.w.copy_(torch.tensor(locals_[comm.rank]))
        diloco.maybe_outer_step(model)
        return model.w.detach().tolist(), diloco.global_params["w"].tolist()

    for rank, (local, glob) in enumerate(run_local(replica, 2)):
        assert local == expected[rank] and glob == [7.0, 20.0]


class TwoScalars(nn.Module):
    """Two one-element parameters: fragment 0 is `a`, fragment 1 is `b`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))


OUTER_SGD_LR2 = {"name": "sgd", "lr": 2.0, "momentum": 0.0, "nesterov": False}  # global -= 2 * mean delta
GRADIENT = [1.0, 3.0]  # replica r's fixed gradient: inner SGD lr 1 subtracts it from a and b every step

# H = 6, 2 fragments: `a` syncs at steps 3, 9 and `b` at 6, 12; its exchange starts tau steps before.
# Each row: sync step -> (replica 0's local, replica 1's local, theta_global) of the synced fragment.
# Between syncs a replica's local weights only fall by its gradient (checked step by step).
STREAMING_CASES = {
    # tau 0, alpha 0: step 3: locals -3, -9 (3 steps of 1 and 3); deltas 0 - local = 3, 9, mean 6;
    # global 0 - 2 * 6 = -12 and both replicas restart there. Step 6 (b): 6 steps, deltas 6, 18,
    # mean 12, global -24. Step 9 (a): locals -12 - 6 = -18, -12 - 18 = -30, deltas 6, 18, global
    # -12 - 24 = -36. Step 12 (b): likewise -24 - 24 = -48.
    (0, 0.0): {3: (-12, -12, -12), 6: (-24, -24, -24), 9: (-36, -36, -36), 12: (-48, -48, -48)},
    # tau 0, alpha 0.5: same globals at steps 3 and 6; locals = (local + global) / 2:
    # step 3: (-3 - 12) / 2 = -7.5, (-9 - 12) / 2 = -10.5; step 6: (-6 - 24) / 2, (-18 - 24) / 2.
    # Step 9: locals -7.5 - 6 = -13.5, -10.5 - 18 = -28.5; deltas -12 - local = 1.5, 16.5, mean 9;
    # global -12 - 18 = -30; mixed (-13.5 - 30) / 2 = -21.75, (-28.5 - 30) / 2 = -29.25.
    # Step 12: locals -15 - 6 = -21, -21 - 18 = -39; deltas -3, 15, mean 6; global -36; mixed
    # (-21 - 36) / 2 = -28.5, (-39 - 36) / 2 = -37.5.
    (0, 0.5): {3: (-7.5, -10.5, -12), 6: (-15, -21, -24), 9: (-21.75, -29.25, -30), 12: (-28.5, -37.5, -36)},
    # tau 0, alpha 1: locals never change (-t, -3t); global moves as before at steps 3 and 6, then
    # step 9: deltas -12 - (-9) = -3, -12 - (-27) = 15, mean 6, global -24; step 12: deltas
    # -24 + 12 = -12, -24 + 36 = 12, mean 0, global stays -24.
    (0, 1.0): {3: (-3, -9, -12), 6: (-6, -18, -24), 9: (-9, -27, -24), 12: (-12, -36, -24)},
    # tau 1, alpha 0: a's delta is taken at step 2 (locals -2, -6; mean 4), applied at step 3:
    # global -8, step 3's local progress on `a` dropped. b: taken at 5 (mean 10), global -20 at 6.
    # a again: taken at 8, locals -8 - 5 = -13, -8 - 15 = -23, deltas 5, 15, mean 10, global -28.
    # b: taken at 11, locals -25, -35, mean 10, global -40.
    (1, 0.0): {3: (-8, -8, -8), 6: (-20, -20, -20), 9: (-28, -28, -28), 12: (-40, -40, -40)},
    # tau 1, alpha 0.5: globals -8 and -20 first; mixed with the locals of the sync step:
    # (-3 - 8) / 2 = -5.5, (-9 - 8) / 2 = -8.5; (-6 - 20) / 2 = -13, (-18 - 20) / 2 = -19.
    # a at step 8: locals -5.5 - 5 = -10.5, -8.5 - 15 = -23.5; deltas 2.5, 15.5, mean 9; global
    # -8 - 18 = -26; step 9's locals -11.5, -26.5 mixed: -18.75, -26.25.
    # b at step 11: locals -13 - 5 = -18, -19 - 15 = -34; deltas -2, 14, mean 6; global -32;
    # step 12's locals -19, -37 mixed: -25.5, -34.5.
    (1, 0.5): {3: (-5.5, -8.5, -8), 6: (-13, -19, -20), 9: (-18.75, -26.25, -26), 12: (-25.5, -34.5, -32)},
    # tau 1, alpha 1: locals never change; globals -8, -20, then a at step 8: deltas -8 + 8 = 0,
    # -8 + 24 = 16, mean 8, global -24; b at step 11: deltas -20 + 11 = -9, -20 + 33 = 13, mean 2,
    # global -24.
    (1, 1.0): {3: (-3, -9, -8), 6: (-6, -18, -20), 9: (-9, -27, -24), 12: (-12, -36, -24)},
}


@pytest.mark.parametrize("tau, alpha", list(STREAMING_CASES))
def test_streaming_sync_delay_and_mixing_hand_computed(tau, alpha):
    def replica(comm):
        model = TwoScalars()
        diloco = DiLoCo(model, comm, 6, outer_optimizer=OUTER_SGD_LR2, fragments=2, mixing=alpha,
                        sync_delay=tau)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        comm.take_step_stats()
        rows = []
        for _ in range(12):
            for p in model.parameters():
                p.grad = torch.full((1,), GRADIENT[comm.rank])
            opt.step()
            diloco.maybe_outer_step(model)
            rows.append(([model.a.item(), model.b.item()], [diloco.global_params[n].item() for n in "ab"],
                         comm.take_step_stats()["comm_bytes/diloco_outer"]))
        return rows

    results = run_local(replica, 2)
    expected, previous = STREAMING_CASES[(tau, alpha)], [[0.0, 0.0], [0.0, 0.0]]
    for step in range(1, 13):
        synced = {3: 0, 9: 0, 6: 1, 12: 1}.get(step)
        for rank in range(2):
            local, glob, sent = results[rank][step - 1]
            for fragment in range(2):
                if fragment == synced:
                    assert local[fragment] == expected[step][rank], (step, rank)
                    assert glob[fragment] == expected[step][2], step
                else:  # one inner step: minus the replica's gradient
                    assert local[fragment] == previous[rank][fragment] - GRADIENT[rank], (step, rank, fragment)
            previous[rank] = local
            # The fragment's one float goes out tau steps before its sync step.
            assert sent == (4 if step + tau in (3, 6, 9, 12) else 0), (step, sent)


def test_streaming_resume_with_an_exchange_in_flight_continues_exactly():
    """tau = 1, H = 4, 2 fragments of mlp(): exchanges start at steps 1, 3, 5, ... and apply one step
    later; a checkpoint after step 5 holds fragment 0's averaged delta, applied at step 6."""
    def run(comm, models, checkpoint, first, last):
        model = models[comm.rank]
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        diloco = DiLoCo(model, comm, 4, fragments=2, sync_delay=1, mixing=0.5)
        if checkpoint is not None:
            load_checkpoint(comm, model, opt, diloco, checkpoint)
        history = []
        for step in range(first, last):
            inner_step(model, opt, *batch(comm.rank, step))
            diloco.maybe_outer_step(model)
            history.append(clone_state(model))
        return history, *save_checkpoint(model, opt, diloco), diloco.replicated_state().state_dict()["pending"]

    fresh = lambda seed: [mlp(seed) for _ in range(2)]  # noqa: E731
    uninterrupted = run_local(run, 2, fresh(0), None, 0, 9)
    first = run_local(run, 2, fresh(0), None, 0, 5)
    pending = first[0][3]
    assert pending["fragment"] == 0 and list(pending["deltas"]) == ["0.weight"]  # 32 of 58 parameters
    checkpoint = {"replicated": first[0][1], "per_rank": [r[2] for r in first]}
    resumed = run_local(run, 2, fresh(123), checkpoint, 5, 9)
    for rank in range(2):
        for step, got in enumerate(resumed[rank][0], start=5):
            for key, expected in uninterrupted[rank][0][step].items():
                assert torch.equal(got[key], expected), (rank, step, key)
    for rank in range(2):  # step 9 started fragment 0 again: both runs save the same mean delta
        assert torch.equal(resumed[rank][3]["deltas"]["0.weight"], uninterrupted[rank][3]["deltas"]["0.weight"])


# -- the strategy without a process group -------------------------------------------------------
def test_strategy_single_process_is_one_replica_lookahead():
    model = mlp()
    strategy = DiLoCoStrategy(model, torch.device("cpu"), replicas=1, inner_steps=2)
    assert strategy.model is model and strategy.world_size == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = clone_state(model)
    rows = []
    for step in range(2):
        with strategy.sync_context(last_micro_step=True):
            F.mse_loss(strategy.model(batch(0, step)[0]), batch(0, step)[1]).backward()
        opt.step()
        opt.zero_grad()
        before = clone_state(model)
        rows.append(strategy.after_step())
    # One replica, first outer step of SGD(0.7, Nesterov 0.9): buf = delta, theta0 - 0.7 * 1.9 * delta.
    for key, theta0 in start.items():
        delta = theta0 - before[key]
        torch.testing.assert_close(model.state_dict()[key], theta0 - 0.7 * 1.9 * delta, rtol=0, atol=1e-6)
    assert rows[0] == {} and rows[1]["diloco_outer_step"] == 1
    stats = strategy.comm_metrics()
    assert stats["comm_bytes/diloco_outer"] == 0 and stats["comm_bytes/diloco_outer_uncompressed"] == 0
    with pytest.raises(ValueError, match="diloco.replicas=2 does not divide the world size 1"):
        DiLoCoStrategy(mlp(), torch.device("cpu"), replicas=2, inner_steps=2)
