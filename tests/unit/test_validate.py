"""One validation pass: the schema is a leaf, every rule fires before anything is built or spawned."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.cli import main
from bigbatch.config import ConfigError
from bigbatch.validate import load_config
from tests.conftest import REPO, tiny_config, write_config

PACKAGE = REPO / "bigbatch"


def problems_of(tmp_path, raw, world_size=None):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "c.yaml", raw), world_size=world_size)
    return info.value.problems


def test_rules_that_used_to_fire_only_inside_build_are_config_errors(tmp_path):
    raw = tiny_config(tmp_path, optim={"nesterov": True, "momentum": 0.0},
                      distributed={"strategy": "diloco"},
                      diloco={"outer_optimizer": {"momentum": 0.0, "nesterov": True}})
    keys = sorted(p.split(":")[0] for p in problems_of(tmp_path, raw))
    assert keys == ["diloco.outer_optimizer.nesterov", "optim.nesterov"]


def test_world_size_rules_need_the_world_size(tmp_path):
    raw = tiny_config(tmp_path, batch={"global_batch": 24, "micro_batch": 5},
                      distributed={"strategy": "diloco"}, diloco={"replicas": 3})
    load_config(write_config(tmp_path / "c.yaml", raw))  # no world size: nothing to split yet
    problems = problems_of(tmp_path, raw, world_size=2)
    # 24 / 2 ranks = 12 per rank, 12 / 5 = 2.4 micro-batches; 3 replicas cannot split 2 ranks
    assert problems[0].startswith("batch.micro_batch=5 does not divide the per-rank batch 12")
    assert problems[1].startswith("diloco.replicas=3 does not divide the world size 2")


def test_batch_schedule_errors_name_the_schedule_key(tmp_path):
    raw = tiny_config(tmp_path, batch={"global_batch": 64,
                                       "schedule": {"kind": "ramp", "start": 16, "increment": 10,
                                                    "ramp_samples": 100}})
    [problem] = problems_of(tmp_path, raw)
    assert problem.startswith("batch.schedule.increment: (target 64 - start 16) = 48")


def _imports_of(path: Path) -> set[str]:
    """bigbatch modules imported by one file at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bigbatch"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bigbatch")}
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_config_schema_imports_nothing_of_ours():
    assert _imports_of(PACKAGE / "config.py") == set()


def test_no_import_cycle_between_packages():
    """Edges between top-level parts of bigbatch (subpackages and modules) form no cycle."""
    def part(module: str) -> str:
        return module.split(".")[1] if module.count(".") else module
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = part(_module_name(path))
        edges.setdefault(src, set()).update(part(m) for m in _imports_of(path) if part(m) != src)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2
    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_validation_imports_no_torch():
    code = "import sys, bigbatch.validate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_launch_reports_world_size_problems_once_before_spawning(tmp_path, capsys):
    raw = tiny_config(tmp_path, batch={"global_batch": 24, "micro_batch": 5})
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["launch", "--nproc-per-node", "2", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("batch.micro_batch=5 does not divide the per-rank batch 12") == 1
    assert not (tmp_path / "runs").exists()  # no rank ever started


def test_submit_checks_the_jobs_world_size(tmp_path, capsys):
    raw = tiny_config(tmp_path, batch={"global_batch": 24}, slurm={"nodes": 5})
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["submit", "--dry-run", str(config)]) == 2
    assert "does not split over 5 ranks" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_public_optimizers_import_from_the_package():
    from bigbatch.optim import LAMB, LARS
    from bigbatch.optim.lamb import LAMB as lamb_class

    assert LAMB is lamb_class and LARS.__doc__.startswith("LARS / LARC")


def test_registered_names_are_checked_with_the_closest_match(tmp_path):
    raw = tiny_config(tmp_path, optim={"name": "lamd"}, compression={"method": "powersdg"})
    problems = problems_of(tmp_path, raw)
    assert problems[0].startswith("optim.name: unknown optimizer 'lamd'. Did you mean 'lamb'?")
    assert problems[1].startswith("compression.method: unknown compression method 'powersdg'. Did you mean 'powersgd'?")
    raw = tiny_config(tmp_path, distributed={"strategy": "diloco"}, diloco={"compression": {"method": "torch_powersgd"}})
    [problem] = problems_of(tmp_path, raw)
    assert problem.startswith("diloco.compression.method: unknown compression method 'torch_powersgd'")


def test_a_registered_optimizer_reaches_config_planner_and_build(tmp_path):
    """Adding an optimizer is one registration: validation, the planner and the factory all see it."""
    from bigbatch.optim.registry import OPTIMIZERS, OptimizerSpec, register_optimizer
    from bigbatch.memory.planner import optimizer_state_bytes

    register_optimizer("plain_sgd_test", OptimizerSpec("bigbatch.optim.factory:build_sgd", 0, momentum_bytes=4,
                                                       uses_momentum=True))
    try:
        cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, optim={"name": "plain_sgd_test"})))
        assert optimizer_state_bytes("plain_sgd_test", momentum=0.9) == 4
        import torch

        from bigbatch.optim.factory import build_optimizer
        assert isinstance(build_optimizer(torch.nn.Linear(2, 2), cfg.optim), torch.optim.SGD)
    finally:
        OPTIMIZERS._specs.pop("plain_sgd_test")


def test_every_kind_a_compressor_records_is_registered():
    """comm_savings divides by the registered kinds: a compressor's bytes under an unregistered kind
    would make it look free. Run each built-in on two simulated ranks and compare."""
    import torch

    from bigbatch.comm import run_local
    from bigbatch.compression.factory import build_compressor
    from bigbatch.compression.registry import COMPRESSORS, gradient_kinds

    for name, spec in COMPRESSORS.items():
        if spec.build is None:
            continue
        def rank(comm, name=name):
            compressor = build_compressor(name, rank=1, start_step=0)
            compressor.reduce([("w", torch.ones(8, 8)), ("b", torch.ones(8))], comm)
            return comm.take_step_stats()
        for stats in run_local(rank, 2):
            kinds = {k.split("/", 1)[1] for k, v in stats.items() if k.startswith("comm_bytes/") and v > 0}
            assert kinds - {"uncompressed", "total"} <= set(spec.kinds) <= set(gradient_kinds()), name


def test_adaptive_batch_bounds_are_checked_against_the_world(tmp_path):
    # 2 ranks x micro-batch 8: the adaptive batch moves in steps of 16
    raw = tiny_config(tmp_path, batch={"global_batch": 32, "micro_batch": 8,
                                       "adaptive": {"enabled": True, "min": 40, "max": 24}},
                      metrics={"noise_scale": True})
    problems = problems_of(tmp_path, raw, world_size=2)
    assert problems[0].startswith("batch.adaptive.min: 40 is not a multiple of 16 (= 2 ranks x micro-batch 8)")
    assert problems[1].startswith("batch.adaptive.max: 24 is not a multiple of 16")
    assert problems[2] == "batch.adaptive.min: 40 is above batch.adaptive.max 24"


def test_adaptive_batch_grows_at_most_to_the_training_set_by_default():
    from types import SimpleNamespace

    from bigbatch.config import Config
    from bigbatch.training.build import build_noise_monitor

    cfg = Config.model_validate({"batch": {"global_batch": 32, "adaptive": {"enabled": True}},
                                 "run": {"max_steps": 1}, "data": {"name": "synthetic"}})
    runtime = SimpleNamespace(world_size=2)
    strategy = SimpleNamespace(local_grad_norm=SimpleNamespace(enabled=False))
    # 1000 training samples, granularity 2: at most 1000, not 64 x 32 = 2048
    assert build_noise_monitor(cfg, strategy, runtime, lambda s: 32, 1000).adaptive.maximum == 1000
    assert build_noise_monitor(cfg, strategy, runtime, lambda s: 32, 10**6).adaptive.maximum == 2048


def test_target_ratio_is_checked(tmp_path):
    raw = tiny_config(tmp_path, compression={"method": "fp16", "target_ratio": 100})
    [problem] = problems_of(tmp_path, raw)
    assert problem.startswith("compression.target_ratio: choosing the rank by bytes is bigbatch's PowerSGD only")
    raw = tiny_config(tmp_path, compression={"method": "powersgd", "target_ratio": 100, "rank": 4})
    [problem] = problems_of(tmp_path, raw)
    assert problem.startswith("compression.target_ratio: it chooses the rank, so compression.rank cannot be set")
    raw = tiny_config(tmp_path, compression={"method": "powersgd", "target_ratio": 1})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 2  # must be > 1
    assert not (tmp_path / "runs").exists()


def test_quantized_powersgd_factors_are_checked(tmp_path):
    raw = tiny_config(tmp_path, compression={"method": "torch_powersgd", "factor_bits": 8})
    [problem] = problems_of(tmp_path, raw)
    assert problem.startswith("compression.factor_bits: quantized P and Q are bigbatch's PowerSGD only")
    raw = tiny_config(tmp_path, compression={"method": "powersgd", "factor_bits": 16})
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(config)]) == 2
    assert not (tmp_path / "runs").exists()
