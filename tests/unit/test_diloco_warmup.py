"""DiLoCo's synchronous warm start (`diloco.warmup_steps`), in one process with simulated replicas.

References: synchronous SGD on the whole batch (the warm-up), the hand-computed streaming
trajectories of tests/unit/test_diloco.py shifted by where the warm-up leaves the weights (the cycles
count from its end), byte counts from the shapes, and a checkpoint round trip against the
uninterrupted run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bigbatch.comm import Communicator, run_local
from bigbatch.distributed.diloco import DiLoCo, build_pseudo_grad_compressor
from bigbatch.validate import load_config
from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch
from tests.unit.test_diloco import (AVERAGING, GRADIENT, OUTER_SGD_LR2, STREAMING_CASES, TwoScalars, Vec,
                                    batch, clone_state, load_checkpoint, mlp, save_checkpoint)
from tests.unit.test_validate import problems_of

PARAMS = 58  # mlp(): 4*8 + 8 + 8*2 + 2


def warm_step(model, opt, diloco, x, y) -> dict:
    """One step as DiLoCoStrategy takes it: backward, warm-up gradient sync, inner step, outer step."""
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    diloco.sync_warmup_gradients(model)
    opt.step()
    return diloco.maybe_outer_step(model)


def test_warmup_is_synchronous_sgd_on_the_global_batch_then_cycles_start_at_w():
    steps, warmup, inner_steps = 9, 4, 2  # warm-up 1..4; outer steps at 6 and 8; 9 ends mid-cycle

    def replica(comm, models):
        model = models[comm.rank]
        diloco = DiLoCo(model, comm, inner_steps, outer_optimizer=AVERAGING, warmup_steps=warmup)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        comm.take_step_stats()
        history, rows, globals_at_w = [], [], None
        for step in range(steps):
            x, y = batch(0, step, rows=8)
            half = slice(4 * comm.rank, 4 * comm.rank + 4)  # each replica half the global batch
            metrics = warm_step(model, opt, diloco, x[half], y[half])
            rows.append((metrics, comm.take_step_stats()))
            history.append(clone_state(model))
            if step + 1 == warmup:
                globals_at_w = {n: t.clone() for n, t in diloco.global_params.items()}
        return history, rows, globals_at_w

    base = mlp()
    results = run_local(replica, 2, [copy.deepcopy(base) for _ in range(2)])
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(warmup):
        opt.zero_grad()
        F.mse_loss(ref(batch(0, step, rows=8)[0]), batch(0, step, rows=8)[1]).backward()  # all 8 rows
        opt.step()
        for key, expected in ref.state_dict().items():
            assert torch.equal(results[0][0][step][key], results[1][0][step][key]), (step, key)  # bitwise
            torch.testing.assert_close(results[0][0][step][key], expected, rtol=0, atol=1e-6)
    for history, rows, globals_at_w in results:
        for name, tensor in globals_at_w.items():  # theta_global = the weights the warm-up ended with
            assert torch.equal(tensor, history[warmup - 1][name]), name
        for step, (metrics, stats) in enumerate(rows, start=1):
            assert stats["comm_bytes/diloco_warmup"] == (PARAMS * 4 if step <= warmup else 0), step
            assert stats["comm_bytes/diloco_outer"] == (PARAMS * 4 if step in (6, 8) else 0), step
            assert metrics.get("diloco_outer_step") == {6: 1, 8: 2}.get(step), step
    after = [r[0] for r in results]
    assert not torch.equal(after[0][4]["0.weight"], after[1][4]["0.weight"])  # step 5: replicas alone
    assert torch.equal(after[0][5]["0.weight"], after[1][5]["0.weight"])  # step 6: averaged
    assert not torch.equal(after[0][8]["0.weight"], after[1][8]["0.weight"])  # step 9: mid-cycle


WARMUP_SHIFT = -12.0  # 6 warm-up steps of the replicas' mean gradient (1 + 3) / 2 = 2, inner SGD lr 1


@pytest.mark.parametrize("tau, alpha", list(STREAMING_CASES))
def test_streaming_after_the_warmup_is_the_hand_computed_trajectory_shifted(tau, alpha):
    """H = 6, 2 fragments, W = 6. During the warm-up both replicas fall by the mean gradient 2 per
    step, to -12 at step 6, and theta_global becomes -12. The cycles count from there: every weight of
    step 6 + s is STREAMING_CASES's at step s shifted by -12 (each update is affine in the start)."""
    warmup = 6

    def replica(comm):
        model = TwoScalars()
        diloco = DiLoCo(model, comm, 6, outer_optimizer=OUTER_SGD_LR2, fragments=2, mixing=alpha,
                        sync_delay=tau, warmup_steps=warmup)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        comm.take_step_stats()
        rows = []
        for _ in range(warmup + 12):
            for p in model.parameters():
                p.grad = torch.full((1,), GRADIENT[comm.rank])
            diloco.sync_warmup_gradients(model)
            opt.step()
            diloco.maybe_outer_step(model)
            stats = comm.take_step_stats()
            rows.append(([model.a.item(), model.b.item()], [diloco.global_params[n].item() for n in "ab"],
                         stats["comm_bytes/diloco_outer"], stats["comm_bytes/diloco_warmup"]))
        return rows

    results = run_local(replica, 2)
    expected = STREAMING_CASES[(tau, alpha)]
    for rank in range(2):
        for step in range(1, warmup + 1):
            local, glob, outer, warm = results[rank][step - 1]
            assert local == [-2.0 * step] * 2 and outer == 0 and warm == 2 * 4, (rank, step)
            assert glob == ([0.0, 0.0] if step < warmup else [WARMUP_SHIFT] * 2), (rank, step)
        for s, values in expected.items():
            local, glob, _, _ = results[rank][warmup + s - 1]
            fragment = {3: 0, 9: 0, 6: 1, 12: 1}[s]
            assert local[fragment] == values[rank] + WARMUP_SHIFT, (rank, s)
            assert glob[fragment] == values[2] + WARMUP_SHIFT, (rank, s)
        for s in range(1, 13):  # a fragment's one float goes out tau steps before its sync step
            _, _, outer, warm = results[rank][warmup + s - 1]
            assert warm == 0 and outer == (4 if s + tau in (3, 6, 9, 12) else 0), (rank, s)


def test_int4_pseudo_gradients_after_the_warmup():
    """Compression only touches the exchanges, which start after the warm-up: W = H = 3, int4 in
    blocks of 64 (one scale per tensor of mlp()): 29 bytes of codes + 4 scales at steps 6 and 9."""
    def replica(comm, models):
        model = models[comm.rank]
        diloco = DiLoCo(model, comm, 3, compressor=build_pseudo_grad_compressor("int4"), warmup_steps=3)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        comm.take_step_stats()
        sent = []
        for step in range(9):
            warm_step(model, opt, diloco, *batch(comm.rank, step))
            stats = comm.take_step_stats()
            sent.append((stats["comm_bytes/diloco_warmup"], stats["comm_bytes/diloco_outer"]))
        return sent

    for sent in run_local(replica, 2, [mlp() for _ in range(2)]):
        int4 = (16 + 4 + 8 + 1) + 4 * 4
        assert sent == [(PARAMS * 4, 0)] * 3 + [(0, 0), (0, 0), (0, int4)] * 2


def _resumable(comm, models, checkpoint, first, last):
    model = models[comm.rank]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    diloco = DiLoCo(model, comm, 4, fragments=2, sync_delay=1, mixing=0.5, warmup_steps=4)
    if checkpoint is not None:
        load_checkpoint(comm, model, opt, diloco, checkpoint)
    history = []
    for step in range(first, last):
        warm_step(model, opt, diloco, *batch(comm.rank, step))
        history.append(clone_state(model))
    return history, *save_checkpoint(model, opt, diloco)


@pytest.mark.parametrize("stop", [2, 4, 5])  # mid-warm-up, at its end, with an exchange in flight
def test_resume_mid_warmup_and_right_after_continues_exactly(stop):
    """H = 4, W = 4, 2 fragments, tau 1: fragment 0's exchanges start at steps 5, 9 (applied at 6,
    10), fragment 1's at 7 (applied at 8)."""
    fresh = lambda seed: [mlp(seed) for _ in range(2)]  # noqa: E731
    uninterrupted = run_local(_resumable, 2, fresh(0), None, 0, 11)
    first = run_local(_resumable, 2, fresh(0), None, 0, stop)
    checkpoint = {"replicated": first[0][1], "per_rank": [r[2] for r in first]}
    resumed = run_local(_resumable, 2, fresh(123), checkpoint, stop, 11)  # other init: all from the checkpoint
    for rank in range(2):
        for step, got in enumerate(resumed[rank][0], start=stop):
            for key, expected in uninterrupted[rank][0][step].items():
                assert torch.equal(got[key], expected), (rank, step, key)


def test_resume_refuses_a_changed_warmup_it_is_still_in():
    def replica(comm, warmup_steps, state):
        diloco = DiLoCo(Vec([1.0]), comm, 2, warmup_steps=warmup_steps)
        diloco.replicated_state().load_state_dict(state)

    def saved(comm, steps):
        model = Vec([1.0])
        diloco = DiLoCo(model, comm, 2, warmup_steps=4)
        for _ in range(steps):
            diloco.maybe_outer_step(model)
        return diloco.replicated_state().state_dict()

    mid, after = run_local(saved, 1, 3)[0], run_local(saved, 1, 6)[0]
    run_local(replica, 1, 4, mid)
    run_local(replica, 1, 2, after)  # both warm-ups are over at step 6: only the phase of H moves
    for warmup, state in ((2, mid), (0, mid), (8, after)):
        with pytest.raises(RuntimeError, match=r"saved with diloco.warmup_steps=4; .* keep diloco.warmup_steps: 4"):
            run_local(replica, 1, warmup, state)


def test_bad_warmup_raises_value_errors():
    with pytest.raises(ValueError, match="diloco.warmup_steps must be an integer >= 0"):
        DiLoCo(Vec([1.0]), Communicator(), 2, warmup_steps=-2)
    with pytest.raises(ValueError, match=r"diloco.warmup_steps: 3 must be a multiple of diloco.inner_steps \(2\)"):
        DiLoCo(Vec([1.0]), Communicator(), 2, warmup_steps=3)


def diloco(tmp_path, **keys) -> dict:
    return tiny_config(tmp_path, distributed={"strategy": "diloco"}, diloco={"inner_steps": 6, **keys})


def test_warmup_must_be_whole_cycles(tmp_path):
    assert load_config(write_config(tmp_path / "ok.yaml", diloco(tmp_path, warmup_steps=12))).diloco.warmup_steps == 12
    [problem] = problems_of(tmp_path, diloco(tmp_path, warmup_steps=10))
    assert problem == ("diloco.warmup_steps: 10 must be a multiple of diloco.inner_steps (6), so "
                       "synchronisations stay on multiples of H; set diloco.warmup_steps to 6 or 12")
    [problem] = problems_of(tmp_path, diloco(tmp_path, warmup_steps=-1))
    assert problem.startswith("diloco.warmup_steps")


@pytest.mark.parametrize("value, message", [
    ("7", "diloco.warmup_steps: 7 must be a multiple of diloco.inner_steps (6), so synchronisations stay on "
          "multiples of H; set diloco.warmup_steps to 6 or 12"),
    ("-6", "diloco.warmup_steps"),
])
def test_bad_warmup_exits_2_with_one_line_naming_the_key(tmp_path, value, message):
    config = write_config(tmp_path / "c.yaml", diloco(tmp_path, replicas=1))  # one process: one replica
    result = bigbatch("train", str(config), "--set", f"diloco.warmup_steps={value}")
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and message in problems[0], result.stderr  # one line, naming the key
