"""The sbatch job script: golden files, hostile strings that must stay inert, option validation.

Golden files: tests/unit/golden/job_{srun,torchrun}.sbatch are compared byte for byte. After an
intended change to the script, regenerate them with

    BIGBATCH_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_slurm_render.py

and review the diff like code.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from bigbatch.config import Config, ConfigError
from bigbatch.validate import load_config, validate_config
from bigbatch.slurm.render import (EXTRA_OPTIONS, log_pattern, render_sbatch, sbatch_option_problems,
                                   sbatch_quote, signal_number)
from tests.conftest import tiny_config, write_config

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("BIGBATCH_REGENERATE_GOLDEN") == "1"

# Every shell metacharacter we could think of; run from a scratch cwd, any executed part leaves a file.
HOSTILE = "a'; echo pwned; $(touch subst) `touch tick` \"q\" \\ %j # ${HOME} *"
HOSTILE_ML = HOSTILE + "\nb'; touch newline"  # where a line break is allowed (bash words only)
HOSTILE_DIR = HOSTILE.replace("\\", "")  # a run directory: no backslash (see run_dir_problems)
MARKERS = ("subst", "tick", "newline", "pwned")


def golden_config(launch_mode: str):
    raw = tiny_config(Path("/unused"), run={"name": "golden", "out_dir": "/scratch/runs"},
                      slurm={"partition": "gpu", "account": "proj-42", "qos": "normal", "nodes": 2,
                             "gpus_per_node": 4, "cpus_per_task": 8,  # 4 ranks per node
                             "mem": "480G", "time": "04:00:00", "constraint": "a100&ib",
                             "exclusive": True, "mail": "me@example.org", "launch_mode": launch_mode,
                             "setup": ["module load cuda/12.4", "source /opt/venv/bin/activate"],
                             "env": {"NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "8"},
                             "extra": {"reservation": "big run", "nice": 10, "hold": False}})
    return validate_config(raw)


def render(cfg, run_dir: Path, *, python="/opt/venv/bin/python", config_path=None, overrides=()):
    return render_sbatch(cfg, config_path=config_path or run_dir / "submitted-config.yaml",
                         overrides=list(overrides), run_dir=run_dir, python=python,
                         log_path=log_pattern(run_dir))


@pytest.mark.parametrize("launch_mode", ["srun", "torchrun"])
def test_script_matches_golden_file(launch_mode):
    text = render(golden_config(launch_mode), Path("/scratch/runs/golden"),
                  overrides=["optim.lr=0.2"])
    golden = GOLDEN / f"job_{launch_mode}.sbatch"
    if REGENERATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden.name} differs; see this file's docstring to regenerate"


@pytest.mark.parametrize("launch_mode", ["srun", "torchrun"])
def test_golden_files_are_valid_bash(launch_mode):
    subprocess.run(["bash", "-n", str(GOLDEN / f"job_{launch_mode}.sbatch")], check=True, timeout=30)


def test_signal_reaches_the_steps_and_the_log_survives_requeues():
    text = render(golden_config("srun"), Path("/r/x"))
    assert "#SBATCH --signal=USR1@120\n" in text  # no B:, the ranks live in the srun step
    assert "#SBATCH --requeue\n" in text and "#SBATCH --open-mode=append\n" in text
    assert "#SBATCH --output=/r/x/slurm-%j.out\n" in text
    cfg = validate_config(tiny_config(Path("/t"), slurm={"requeue": False}))
    assert "#SBATCH --no-requeue\n" in render(cfg, Path("/r/x"))


def test_percent_in_the_run_directory_is_not_a_filename_pattern():
    assert log_pattern(Path("/r/100%j done")) == "/r/100%%j done/slurm-%j.out"


# ----------------------------------------------------------------------------- hostile strings

def sbatch_parse(line: str) -> str:
    """The value sbatch reads from `#SBATCH --key=VALUE`: a transcription of Slurm's
    src/sbatch/opt.c `_get_argument` (quotes open and close, a backslash escapes the next
    character even inside quotes, an unquoted # starts a comment). The integration tests check the
    same strings against a real sbatch."""
    arg = line.split(" ", 1)[1]
    out, quote, escape = [], None, False
    for ch in arg:
        if escape:
            escape = False
        elif ch == "\\":
            escape = True
            continue
        elif quote:
            if ch == quote:
                quote = None
                continue
        elif ch in "\"'":
            quote = ch
            continue
        elif ch == "#" or ch.isspace():
            break
        out.append(ch)
    return "".join(out).split("=", 1)[1]


@pytest.mark.parametrize("value", [HOSTILE, "plain", "a\\b", 'x"y', "it's", "#hash", " lead"])
def test_sbatch_quote_round_trips_through_sbatchs_parser(value):
    assert sbatch_parse(f"#SBATCH --comment={sbatch_quote(value)}") == value


def hostile_config(launch_mode: str):
    slurm = {key: HOSTILE for key in ("partition", "account", "qos", "mem", "time", "constraint",
                                      "job_name", "mail")}
    slurm.update(nodes=2, ntasks_per_node=2, launch_mode=launch_mode, setup=["echo setup-ran"],
                 env={"HOSTILE_VAR": HOSTILE_ML}, extra={"comment": HOSTILE, "reservation": HOSTILE})
    return validate_config(tiny_config(Path("/t"), run={"name": HOSTILE_DIR}, slurm=slurm))


STUBS = {
    # Prints a node list and a NodeAddr like the real scontrol.
    "scontrol": '[ "$2" = hostnames ] && echo n1 && echo n2 && exit 0\n'
                'echo "NodeName=n1 Arch=x86_64"; echo "   NodeAddr=127.0.0.1 NodeHostName=localhost"',
    # Drops srun's own options and runs the task command as node 1 of 2.
    "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\n'
            'SLURM_NNODES=2 SLURM_NODEID=1 exec "$@"',
}
PYTHON_STUB = 'printf "%s\\0" "$0" "$@" > "$ARGV_FILE"\nprintf "%s" "$HOSTILE_VAR" > "$ENV_FILE"'


def write_stub(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("launch_mode", ["srun", "torchrun"])
def test_hostile_strings_arrive_verbatim_and_nothing_runs(tmp_path, launch_mode):
    bin_dir, cwd = tmp_path / "bin", tmp_path / "cwd"
    cwd.mkdir()
    for name, body in STUBS.items():
        write_stub(bin_dir / name, body)
    python = write_stub(tmp_path / HOSTILE_ML / "python", PYTHON_STUB)  # even the interpreter path
    run_dir = tmp_path / "runs" / HOSTILE_DIR
    config_path = tmp_path / HOSTILE_ML / "submitted-config.yaml"
    override = f"data.path={HOSTILE_ML}"
    script = tmp_path / "job.sbatch"
    script.write_text(render(hostile_config(launch_mode), run_dir, python=str(python),
                             config_path=config_path, overrides=[override]))
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)

    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-2]",
           "ARGV_FILE": str(tmp_path / "argv"), "ENV_FILE": str(tmp_path / "env"), "HOME": "/nonexistent"}
    done = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "setup-ran" in done.stdout
    assert "pwned" not in done.stdout.replace(HOSTILE, "")
    assert sorted(os.listdir(cwd)) == [], "a hostile string ran a command"
    assert not any((tmp_path / m).exists() for m in MARKERS)

    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    pinned = [f"--set=run.out_dir={json.dumps(str(run_dir.parent))}",
              f"--set=run.name={json.dumps(HOSTILE_DIR)}"]
    if launch_mode == "srun":
        expected = [str(python), "-m", "bigbatch", "train", str(config_path), f"--set={override}", *pinned]
    else:  # MASTER_PORT = 15000 + 4242 % 20000; node count and rank come from the srun task
        expected = [str(python), "-m", "bigbatch", "launch", "--nproc-per-node=2",
                    "--rdzv-endpoint=127.0.0.1:19242", str(config_path), f"--set={override}", *pinned,
                    "--nnodes=2", "--node-rank=1"]
    assert argv == expected
    assert (tmp_path / "env").read_text() == HOSTILE_ML


def test_pinned_run_directory_loads_back_exactly(tmp_path):
    # The job's `--set run.name=...` goes through bigbatch's YAML override parser: it must give back
    # the very string, also for names YAML would read as something else.
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    for name in (HOSTILE_ML.replace("\\", ""), "yes", "123", "null", "[x]", "a: b"):  # no \ in run.name
        run_dir = tmp_path / HOSTILE_ML / name
        pinned = [f"run.out_dir={json.dumps(str(run_dir.parent))}", f"run.name={json.dumps(name)}"]
        cfg = load_config(config, pinned)
        assert (cfg.run.out_dir, cfg.run.name) == (str(run_dir.parent), name)
        assert yaml.safe_load(json.dumps(name)) == name


def test_line_break_in_an_sbatch_value_or_the_run_directory_is_refused_and_backslash_there(tmp_path):
    assert problems(tmp_path, partition="a\nb") == [
        "slurm.partition: a line break cannot be expressed on an #SBATCH line; remove it"]
    with pytest.raises(ValueError, match="slurm.partition"):  # render checks again on its own
        render(unchecked_config(tmp_path, slurm={"partition": "a\nb"}), tmp_path / "r")
    for run_dir in (tmp_path / "x\ntouch pwned", tmp_path / "a\\b"):
        with pytest.raises(ValueError, match="run.name / run.out_dir"):
            render(validate_config(tiny_config(tmp_path)), run_dir)


# ----------------------------------------------------------------------------- option validation

def problems(tmp_path, **slurm) -> list[str]:
    """What config validation (which includes the slurm section) reports for this slurm section."""
    try:
        validate_config(tiny_config(tmp_path, slurm=slurm))
    except ConfigError as err:
        return err.problems
    return []


def unchecked_config(tmp_path, **sections) -> Config:
    """A config past pydantic's types only, to test the renderer's own checks."""
    return Config.model_validate(tiny_config(tmp_path, **sections))


def test_option_problems_are_the_ones_config_validation_reports(tmp_path):
    slurm = {"extra": {"bogus": 1}, "signal": "KILL@10"}
    assert sbatch_option_problems(unchecked_config(tmp_path, slurm=slurm).slurm) == problems(tmp_path, **slurm)


def test_unknown_extra_option_names_the_key_and_lists_valid_ones(tmp_path):
    [problem] = problems(tmp_path, extra={"reservaton": "x"})
    assert problem.startswith("slurm.extra.reservaton: not an sbatch long option")
    assert "Did you mean 'reservation'?" in problem
    assert "Valid options: " + ", ".join(EXTRA_OPTIONS) in problem


def test_underscored_extra_option_suggests_the_dashed_name(tmp_path):
    [problem] = problems(tmp_path, extra={"mail_type": "ALL"})
    assert "Did you mean 'mail-type'?" in problem


def test_extra_cannot_override_options_bigbatch_manages(tmp_path):
    found = problems(tmp_path, extra={"nodes": 3, "output": "x.log", "parsable": True})
    assert found[0] == "slurm.extra.nodes: set by bigbatch; use slurm.nodes instead"
    assert found[1].startswith("slurm.extra.output: set by bigbatch; use nothing: bigbatch writes")
    assert found[2].startswith("slurm.extra.parsable: not an sbatch long option")


def test_all_problems_are_reported_together(tmp_path):
    found = problems(tmp_path, extra={"bogus": 1}, signal="B:USR1@120", env={"1BAD": "x"},
                     backend="submitit")
    assert [p.split(":")[0] for p in found] == ["slurm.extra.bogus", "slurm.signal", "slurm.env.1BAD",
                                                "slurm.time"]
    with pytest.raises(ValueError, match="slurm.extra.bogus"):
        render(unchecked_config(tmp_path, slurm={"extra": {"bogus": 1}}), tmp_path / "r")


@pytest.mark.parametrize("spec,problem", [
    ("USR1@120", None), ("SIGUSR2@60", None), ("TERM", None), ("R:USR1@30", None),
    ("B:USR1@120", "the B: prefix signals only the batch shell"),
    ("KILL@10", "KILL is not a signal a program can catch"),
    ("USR1 @120", "is not SIGNAL[@SECONDS]"),
])
def test_signal_spec(tmp_path, spec, problem):
    found = problems(tmp_path, signal=spec)
    assert (found == []) if problem is None else (problem in found[0])


def test_signal_number():
    import signal
    assert signal_number("USR1@120") == signal.SIGUSR1
    assert signal_number("SIGTERM") == signal.SIGTERM
