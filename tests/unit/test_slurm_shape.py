"""Job shape: one rank per GPU by default, the rank map, and the rendered scripts that start it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bigbatch.config import ConfigError
from bigbatch.slurm.render import log_pattern, render_sbatch
from bigbatch.slurm.shape import JobShape, batch_split, rank_map
from bigbatch.validate import validate_config
from tests.conftest import REPO, tiny_config, write_config

SHAPES = [(1, 8), (2, 8), (4, 4)]  # nodes x GPUs per node


def gpu_config(tmp_path, nodes, gpus, launch_mode, **slurm):
    return validate_config(tiny_config(tmp_path, batch={"global_batch": 512, "micro_batch": 8},
                                       slurm={"nodes": nodes, "gpus_per_node": gpus,
                                              "launch_mode": launch_mode, **slurm}))


def script(cfg, tmp_path) -> str:
    run_dir = tmp_path / "run"
    return render_sbatch(cfg, config_path=run_dir / "c.yaml", overrides=[], run_dir=run_dir,
                         python="python", log_path=log_pattern(run_dir))


@pytest.mark.parametrize("launch_mode", ["srun", "torchrun"])
@pytest.mark.parametrize("nodes,gpus", SHAPES)
def test_one_rank_per_gpu_in_the_rendered_script(tmp_path, nodes, gpus, launch_mode):
    text = script(gpu_config(tmp_path, nodes, gpus, launch_mode), tmp_path)
    assert f"#SBATCH --nodes={nodes}\n" in text and f"#SBATCH --gpus-per-node={gpus}\n" in text
    srun = re.search(r"^srun .*$", text, re.M).group(0)
    if launch_mode == "srun":  # one srun task per rank
        assert f"#SBATCH --ntasks-per-node={gpus}\n" in text
        assert f"--ntasks={nodes * gpus} --ntasks-per-node={gpus}" in srun
        assert "bigbatch launch" not in text
    else:  # one `bigbatch launch` per node, starting one worker per GPU
        assert "#SBATCH --ntasks-per-node=1\n" in text
        assert f"--ntasks={nodes} --ntasks-per-node=1" in srun
        assert f"-m bigbatch launch --nproc-per-node={gpus} " in text


@pytest.mark.parametrize("nodes,gpus", SHAPES)
def test_rank_map_is_node_major_with_one_device_per_local_rank(tmp_path, nodes, gpus):
    shape = JobShape.of(gpu_config(tmp_path, nodes, gpus, "srun").slurm)
    assert shape.world_size == nodes * gpus
    slots = shape.slots()
    assert [s.rank for s in slots] == list(range(nodes * gpus))
    assert [(s.node, s.local_rank, s.device) for s in slots] == [
        (n, l, f"cuda:{l}") for n in range(nodes) for l in range(gpus)]


@pytest.mark.parametrize("nodes,gpus", SHAPES)
def test_batch_split_follows_the_world_size(tmp_path, nodes, gpus):
    cfg = gpu_config(tmp_path, nodes, gpus, "torchrun")
    split = batch_split(cfg, JobShape.of(cfg.slurm))
    per_rank = 512 // (nodes * gpus)
    assert (split.per_rank, split.micro_batch, split.accumulation) == (per_rank, 8, per_rank // 8)


def test_rank_map_text_for_two_nodes_of_eight_gpus(tmp_path):
    text = rank_map(gpu_config(tmp_path, 2, 8, "srun"))
    lines = text.splitlines()
    assert lines[0] == ("rank map: 2 node(s) x 8 rank(s) = 16 ranks (srun launch); global batch 512 = "
                        "32 per rank = micro-batch 8 x 4 accumulation step(s)")
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 16
    assert rows[0] == ["0", "0", "0", "cuda:0", "32"]
    assert rows[9] == ["1", "1", "9", "cuda:1", "32"]


def test_large_rank_map_shows_first_and_last_nodes(tmp_path):
    text = rank_map(gpu_config(tmp_path, 16, 8, "srun"))
    rows = [line.split() for line in text.splitlines()[2:] if not line.strip().startswith("...")]
    assert {row[0] for row in rows} == {"0", "1", "15"}
    assert "(nodes 2-14 follow the same pattern)" in text
    assert rows[-1] == ["15", "7", "127", "cuda:7", "4"]


def test_without_gpus_one_rank_per_node_on_the_cpu(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, slurm={"nodes": 3}))
    shape = JobShape.of(cfg.slurm)
    assert (shape.ranks_per_node, shape.world_size) == (1, 3)
    assert shape.slot(2, 0).device == "cpu"
    cpu_ranks = validate_config(tiny_config(tmp_path, slurm={"nodes": 2, "ntasks_per_node": 4}))
    assert JobShape.of(cpu_ranks.slurm).world_size == 8


def test_explicit_ntasks_equal_to_gpus_is_fine(tmp_path):
    cfg = gpu_config(tmp_path, 2, 8, "srun", ntasks_per_node=8)
    assert JobShape.of(cfg.slurm).world_size == 16


def test_ntasks_disagreeing_with_gpus_is_a_config_error_naming_both_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        gpu_config(tmp_path, 2, 8, "srun", ntasks_per_node=1)
    [problem] = err.value.problems
    assert problem.startswith("slurm.ntasks_per_node=1 disagrees with slurm.gpus_per_node=8")


def test_submit_dry_run_prints_the_rank_map_and_checks_the_jobs_world_size(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, batch={"global_batch": 512}))
    env = {"PATH": str(tmp_path / "no-sbatch"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bigbatch", "submit", str(config), "--dry-run",
           "--set", "slurm.nodes=2", "--set", "slurm.gpus_per_node=8"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rank map: 2 node(s) x 8 rank(s) = 16 ranks (srun launch); global batch 512 = 32 per rank" in done.stdout
    assert done.stdout.splitlines()[-1].split() == ["1", "7", "15", "cuda:7", "32"]
    bad = subprocess.run(cmd + ["--set", "batch.global_batch=24"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "does not split over 16 ranks" in bad.stderr
    assert "Traceback" not in bad.stderr
