"""Weight averaging (ema:) in one process: EMA against its closed form, SWA against the mean of the
snapshots, skipped steps, the swap for evaluation, the trainer's eval rows and checkpoint, and the
config rules (exit 2, one line naming the key)."""

from __future__ import annotations

import json

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config import ConfigError
from bigbatch.launch.runtime import Runtime
from bigbatch.optim.averaging import WeightAverage, averaged_weights, mix
from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from tests.conftest import tiny_config, write_config

CPU = torch.device("cpu")


def test_mix_per_update():
    rows = [
        (("swa", 0.9, False, 1), 1.0),       # the first snapshot is the mean of one
        (("swa", 0.9, False, 4), 0.25),      # the 4th snapshot weighs 1/4 of the mean
        (("ema", 0.9, False, 1), 1.0),       # no bias fix: the first update copies the weights
        (("ema", 0.9, False, 2), 1 - 0.9),   # then 1 - decay
        (("ema", 0.9, True, 1), 1.0),        # bias fix: (1 - d) / (1 - d) = 1 at n = 1 too
        (("ema", 0.9, True, 2), 0.1 / (1 - 0.81)),  # (1 - d) / (1 - d^2) = 1 / (1 + d)
    ]
    for args, expected in rows:
        assert mix(*args) == pytest.approx(expected, rel=1e-15), args


def drive(average: WeightAverage, layer: torch.nn.Module, steps: int, taken=lambda step: True,
          batch: int = 16) -> list[dict[str, torch.Tensor]]:
    """`steps` optimizer-like updates of `layer` (a skipped step leaves it); the average is told
    after each one; returns the weights after each step."""
    g = torch.Generator().manual_seed(1)
    seen = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in layer.parameters():
                if taken(step):
                    p.add_(torch.randn(p.shape, generator=g))
        average.after_step(step, step * batch, taken(step))
        seen.append({n: p.detach().clone() for n, p in layer.named_parameters()})
    return seen


def make(kind="ema", decay=0.9, debias=False, every_steps=1, start_samples=0):
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    average = WeightAverage(dict(layer.named_parameters()), kind=kind, decay=decay, debias=debias,
                            every_steps=every_steps, start_samples=start_samples)
    return layer, average


@pytest.mark.parametrize("debias", [False, True])
def test_ema_after_n_steps_matches_the_closed_form(debias):
    d, n = 0.9, 7
    layer, average = make(decay=d, debias=debias)
    seen = drive(average, layer, n)
    for name, got in average.average.items():
        w = [s[name].double() for s in seen]
        if debias:  # zero-started EMA / (1 - d^n): snapshot k weighs (1 - d) d^(n-k) / (1 - d^n)
            expected = sum((1 - d) * d ** (n - k) * w[k - 1] for k in range(1, n + 1)) / (1 - d ** n)
        else:       # started at w_1: w_1 weighs d^(n-1), snapshot k >= 2 weighs (1 - d) d^(n-k)
            expected = d ** (n - 1) * w[0] + sum((1 - d) * d ** (n - k) * w[k - 1] for k in range(2, n + 1))
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
        # and exactly the float32 recurrence avg <- lerp(avg, w, mix(n))
        ref = seen[0][name].float()
        for k in range(2, n + 1):
            ref = torch.lerp(ref, seen[k - 1][name], mix("ema", d, debias, k))
        assert torch.equal(got, ref)
    assert average.count == n


def test_swa_is_the_mean_of_the_snapshots_from_start_samples_every_k_steps():
    # batch 16: start_samples 40 is first reached after step 3 (48 samples); every 2 steps: 4, 6, 8, 10
    layer, average = make(kind="swa", every_steps=2, start_samples=40)
    seen = drive(average, layer, 10)
    assert average.count == 4
    for name, got in average.average.items():
        expected = torch.stack([seen[step - 1][name].double() for step in (4, 6, 8, 10)]).mean(0)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


def test_skipped_steps_do_not_update():
    # step 4 is skipped (its weights are step 3's); with every_steps 2 the due steps are 2, 4, 6
    layer, average = make(kind="swa", every_steps=2)
    seen = drive(average, layer, 6, taken=lambda step: step != 4)
    assert average.count == 2
    for name, got in average.average.items():
        expected = (seen[1][name].double() + seen[5][name].double()) / 2
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


def test_swapped_in_evaluates_the_average_and_restores_the_weights_bitwise():
    layer, average = make(kind="swa")
    x = torch.randn(4, 5)
    with average.swapped_in(layer):  # no update yet: the model's own weights
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    drive(average, layer, 3)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with average.swapped_in(layer):
        assert torch.equal(layer.weight, average.average["weight"])
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())


def test_trainer_logs_averaged_and_raw_metrics_and_checkpoints_the_average(tmp_path):
    raw = tiny_config(tmp_path, ema={"enabled": True, "decay": 0.9, "every_steps": 2},
                      eval={"every_steps": 2}, checkpoint={"every_steps": 4})
    trainer = build_trainer(validate_config(raw), Runtime(0, 1, 0, CPU, None))
    trainer.fit()
    trainer.metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    # 5 steps, updates after steps 2 and 4; evaluations at 2, 4 and the end (5)
    assert [(r["step"], r["weight_average_updates"]) for r in evals] == [(2, 1), (4, 2), (5, 2)]
    assert all({"val_loss", "val_accuracy", "val_loss_raw", "val_accuracy_raw"} <= set(r) for r in evals)
    assert evals[0]["val_loss"] == evals[0]["val_loss_raw"]  # one update copies the weights of step 2
    assert evals[1]["val_loss"] != evals[1]["val_loss_raw"]
    final = tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000005"
    saved = averaged_weights(final)
    assert saved.keys() == trainer.averaging.average.keys()
    assert all(torch.equal(saved[k], v) for k, v in trainer.averaging.average.items())
    # the same checkpoint loaded into a fresh trainer gives back the average and its count
    fresh = build_trainer(validate_config(raw), Runtime(0, 1, 0, CPU, None))
    fresh.checkpointer.load(final)
    assert fresh.averaging.count == 2
    assert all(torch.equal(fresh.averaging.average[k], v) for k, v in saved.items())
    # exported: the saved average loaded into a model evaluates to the final val_loss
    fresh.strategy.module.load_state_dict(saved, strict=False)
    assert fresh.evaluate_with(averaged=False)["val_loss"] == evals[-1]["val_loss"]


def test_a_non_finite_step_does_not_update_the_average(tmp_path):
    # GlitchyMLP's 3rd training forward returns NaN: step 3 is skipped, so 4 of 5 steps update
    model = {"name": "tests.custom_components:GlitchyMLP", "kwargs": {"d_in": 8, "classes": 3, "nan_at": 3}}
    raw = tiny_config(tmp_path, model=model, ema={"enabled": True, "kind": "swa"})
    trainer = build_trainer(validate_config(raw), Runtime(0, 1, 0, CPU, None))
    trainer.fit()
    trainer.metrics.close()
    assert trainer.averaging.count == 4


def problems_of(tmp_path, **sections) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(tiny_config(tmp_path, **sections), world_size=1)
    return info.value.problems


def test_rules_name_the_key(tmp_path):
    assert [p.split(":")[0] for p in problems_of(tmp_path, ema={"enabled": True, "kind": "swa", "decay": 0.99})] \
        == ["ema.decay"]
    [problem] = problems_of(tmp_path, ema={"enabled": True, "start_samples": 1000},
                            run={"max_steps": None, "max_samples": 800})
    assert problem.startswith("ema.start_samples=1000 is past run.max_samples=800")
    # (deepspeed may have its own problems here, e.g. not installed)
    [problem] = [p for p in problems_of(tmp_path, ema={"enabled": True}, distributed={"strategy": "deepspeed"})
                 if p.startswith("ema.")]
    assert problem.startswith("ema.enabled: not supported with distributed.strategy deepspeed")
    [problem] = problems_of(tmp_path, ema={"enabled": True, "decay": 1.0})
    assert problem.startswith("ema.decay:")
    validate_config(tiny_config(tmp_path, ema={"kind": "swa", "decay": 0.5}))  # off: nothing checked


def test_cli_exits_2_with_one_line_naming_the_key(tmp_path, capsys):
    raw = tiny_config(tmp_path, ema={"enabled": True, "every_steps": 0})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "ema." in line]
    assert len(lines) == 1 and "ema.every_steps" in lines[0]
    assert not (tmp_path / "runs").exists()
