"""The sbatch job script of a run, rendered by one pure function from the config.

Two kinds of quoting meet in a job script, and each value gets the one its reader needs:

- `#SBATCH` lines are read by sbatch's own option parser, not by a shell. It honours single and
  double quotes, but a backslash escapes the next character even inside single quotes, so
  `shlex.quote` would lose backslashes. `sbatch_quote` double-quotes and backslash-escapes `\\` and
  `"`, which that parser turns back into the exact value. Newlines cannot be expressed there at all,
  so they are a config error (`sbatch_option_problems`).
- Everything below the `#SBATCH` block is bash: values are `shlex.quote`d, and values handed to
  `bigbatch train --set` are additionally YAML (JSON) quoted so a name like `yes` or `123` stays a
  string. `slurm.setup` lines are the one exception: they are shell code by design, copied verbatim.

Signal choice: `--signal=USR1@120` without the `B:` prefix. Without it, Slurm signals every process
of every job step (the srun-launched ranks, and with launch_mode=torchrun the `bigbatch launch`
agent and its workers too); with `B:` only the batch shell would be signalled and the ranks, which
run in an srun step, would never hear of the time limit.
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import signal as signal_module
from pathlib import Path
from typing import Union

from bigbatch.config import Config, SlurmConfig
from bigbatch.slurm.shape import JobShape, shape_problems

# Long options sbatch accepts in a script (Slurm 22.05's `sbatch --help` plus documented ones it
# leaves out and a few from later releases; an old sbatch rejects the newer ones itself).
SBATCH_LONG_OPTIONS = frozenset("""
account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint
container container-id contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task
deadline delay-boot dependency distribution error exclude exclusive export export-file extra
extra-node-info get-user-env gid gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task
gres gres-flags hint hold ignore-pbs input job-name kill-on-invalid-dep licenses mail-type mail-user
mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus network nice no-kill no-requeue nodefile
nodelist nodes ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket open-mode
output overcommit oversubscribe parsable partition power prefer priority profile propagate qos quiet
reboot requeue reservation segment signal sockets-per-node spread-job switches test-only thread-spec
threads-per-core time time-min tmp tres-bind tres-per-task uid usage use-min-nodes verbose version
wait wait-all-nodes wckey wrap
""".split())

# Options that slurm.extra may not set, with what to use instead.
MANAGED_OPTIONS = {
    "account": "slurm.account", "partition": "slurm.partition", "qos": "slurm.qos",
    "nodes": "slurm.nodes", "ntasks-per-node": "slurm.ntasks_per_node",
    "ntasks": "slurm.nodes and slurm.ntasks_per_node",
    "gpus-per-node": "slurm.gpus_per_node", "cpus-per-task": "slurm.cpus_per_task",
    "mem": "slurm.mem", "time": "slurm.time", "constraint": "slurm.constraint",
    "exclusive": "slurm.exclusive", "job-name": "slurm.job_name", "mail-user": "slurm.mail",
    "signal": "slurm.signal", "requeue": "slurm.requeue", "no-requeue": "slurm.requeue",
    "output": "nothing: bigbatch writes RUN_DIR/slurm-%j.out",
    "open-mode": "nothing: bigbatch appends so a requeued job keeps its log",
}
# Options that change what the sbatch client does rather than the job; meaningless in a script.
CLIENT_OPTIONS = frozenset({"help", "usage", "version", "parsable", "quiet", "verbose", "wait",
                            "wrap", "test-only"})
EXTRA_OPTIONS = sorted(SBATCH_LONG_OPTIONS - set(MANAGED_OPTIONS) - CLIENT_OPTIONS)

_SIGNAL_SPEC = re.compile(r"^(?:(?P<prefix>[RB]+):)?(?P<sig>[A-Z0-9]+)(?:@(?P<secs>\d+))?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# String fields of SlurmConfig that end up on #SBATCH lines.
_SBATCH_STRING_FIELDS = ("partition", "account", "qos", "mem", "time", "constraint", "job_name",
                         "mail", "signal")


# ----------------------------------------------------------------------------- validation

def sbatch_option_problems(slurm: SlurmConfig) -> list[str]:
    """Every problem of the slurm section that would make a broken or unsafe job script."""
    problems = [p for key, value in slurm.extra.items() for p in _extra_problems(key, value)]
    for name in _SBATCH_STRING_FIELDS:
        value = getattr(slurm, name)
        if isinstance(value, str) and ("\n" in value or "\r" in value):
            problems.append(f"slurm.{name}: a line break cannot be expressed on an #SBATCH line; "
                            "remove it")
    problems += _signal_problems(slurm.signal)
    for key in slurm.env:
        if not _ENV_NAME.match(key):
            problems.append(f"slurm.env.{key}: not a valid environment variable name "
                            "(letters, digits and _, not starting with a digit)")
    problems += shape_problems(slurm)
    if slurm.backend == "submitit" and slurm.time is None:
        problems.append("slurm.time: required with slurm.backend=submitit (submitit otherwise "
                        "imposes a 5-minute limit), e.g. slurm.time=04:00:00")
    return problems


def run_dir_problems(run_dir: Path) -> list[str]:
    """The run directory goes on the #SBATCH --output line: no line break, and no backslash (Slurm
    then drops every backslash and stops expanding %j, so the log would land elsewhere)."""
    text = str(run_dir)
    for bad, what in (("\n", "a line break"), ("\r", "a line break"), ("\\", "a backslash")):
        if bad in text:
            return [f"run.name / run.out_dir: the run directory {json.dumps(text)} contains {what}, "
                    "which Slurm's --output cannot express; remove it"]
    return []


def _extra_problems(key: str, value: Union[str, int, bool]) -> list[str]:
    if key in MANAGED_OPTIONS:
        return [f"slurm.extra.{key}: set by bigbatch; use {MANAGED_OPTIONS[key]} instead"]
    if key not in EXTRA_OPTIONS:
        close = difflib.get_close_matches(key, EXTRA_OPTIONS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return [f"slurm.extra.{key}: not an sbatch long option (write names without '--', with "
                f"'-' not '_').{hint} Valid options: {', '.join(EXTRA_OPTIONS)}"]
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        return [f"slurm.extra.{key}: a line break cannot be expressed on an #SBATCH line; remove it"]
    return []


def _signal_problems(spec: str) -> list[str]:
    match = _SIGNAL_SPEC.match(spec)
    if not match:
        return [f"slurm.signal: {spec!r} is not SIGNAL[@SECONDS], e.g. USR1@120"]
    if "B" in (match["prefix"] or ""):
        return [f"slurm.signal: {spec!r}: the B: prefix signals only the batch shell, but the ranks "
                "run in an srun step and would never see it; drop 'B:' (e.g. USR1@120)"]
    try:
        signal_number(spec)
    except ValueError as err:
        return [f"slurm.signal: {err}"]
    return []


def signal_number(spec: str) -> int:
    """`USR1@120` -> signal.SIGUSR1; the number Slurm sends before the time limit."""
    match = _SIGNAL_SPEC.match(spec)
    sig = match["sig"] if match else spec
    if sig.isdigit():
        return int(sig)
    name = sig if sig.startswith("SIG") else "SIG" + sig
    if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal_module, name):
        raise ValueError(f"{spec!r}: {sig} is not a signal a program can catch; use USR1, USR2 or TERM")
    return int(getattr(signal_module, name))


# ----------------------------------------------------------------------------- quoting

_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def sbatch_quote(value: str) -> str:
    """Quote a value for an `#SBATCH --key=VALUE` line (sbatch's parser, not a shell's)."""
    if _SBATCH_SAFE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def yaml_string(value: str) -> str:
    """A YAML scalar that loads back as exactly this string (JSON strings are YAML)."""
    return json.dumps(value)


def log_pattern(run_dir: Path) -> str:
    """`RUN_DIR/slurm-%j.out` with any `%` of the directory escaped from sbatch's filename patterns."""
    return str(run_dir).replace("%", "%%") + "/slurm-%j.out"


# ----------------------------------------------------------------------------- rendering

def sbatch_options(cfg: Config, log_path: str) -> list[tuple[str, Union[str, int, bool]]]:
    """(long option, value) pairs in script order; True means a bare flag."""
    s, shape = cfg.slurm, JobShape.of(cfg.slurm)
    torchrun = s.launch_mode == "torchrun"
    cpus = s.cpus_per_task * shape.ranks_per_node if (torchrun and s.cpus_per_task) else s.cpus_per_task
    pairs = [("job-name", s.job_name or cfg.run.name), ("partition", s.partition),
             ("account", s.account), ("qos", s.qos), ("nodes", s.nodes),
             # torchrun: one task per node, the `bigbatch launch` agent, which starts the ranks.
             ("ntasks-per-node", 1 if torchrun else shape.ranks_per_node), ("cpus-per-task", cpus),
             ("gpus-per-node", s.gpus_per_node or None), ("mem", s.mem), ("time", s.time),
             ("constraint", s.constraint), ("exclusive", s.exclusive or None),
             ("mail-user", s.mail), ("mail-type", "END,FAIL" if s.mail else None),
             ("output", log_path), ("open-mode", "append"), ("signal", s.signal),
             ("requeue" if s.requeue else "no-requeue", True)]
    extra = {k: v for k, v in s.extra.items() if v is not False}
    pairs = [(k, extra.pop(k) if k in extra else v) for k, v in pairs]  # extra mail-type wins
    pairs += sorted(extra.items())
    return [(k, v) for k, v in pairs if v is not None and v is not False]


def _sbatch_line(key: str, value: Union[str, int, bool]) -> str:
    if value is True:
        return f"#SBATCH --{key}"
    if isinstance(value, int):
        return f"#SBATCH --{key}={value}"
    return f"#SBATCH --{key}={sbatch_quote(value)}"


def train_arguments(config_path: Path, overrides: list[str], run_dir: Path) -> list[str]:
    """[CONFIG, override, ...] with the run directory pinned, so a requeued job resumes in place."""
    pinned = [f"run.out_dir={yaml_string(str(run_dir.parent))}", f"run.name={yaml_string(run_dir.name)}"]
    return [str(config_path), *overrides, *pinned]


def launch_lines(cfg: Config, python: str, train_args: list[str]) -> list[str]:
    s, shape = cfg.slurm, JobShape.of(cfg.slurm)
    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={s.nodes}"]
    settings = [_words(f"--set={item}") for item in train_args[1:]]
    if s.launch_mode == "srun":
        srun += [f"--ntasks={shape.world_size}", f"--ntasks-per-node={shape.ranks_per_node}"]
        if s.cpus_per_task:
            srun.append(f"--cpus-per-task={s.cpus_per_task}")
        return ["# One task per rank; each finds its rank in SLURM_PROCID/SLURM_NTASKS.",
                _continued([_words(*srun), _words(python, "-m", "bigbatch", "train", train_args[0]),
                            *settings])]
    srun += [f"--ntasks={s.nodes}", "--ntasks-per-node=1"]
    if s.cpus_per_task:
        srun.append(f"--cpus-per-task={s.cpus_per_task * shape.ranks_per_node}")
    # The node rank and count exist only inside each srun task, hence the `bash -c` that appends
    # them; every other argument reaches `bigbatch launch` through "$@" untouched.
    per_task = 'exec "$@" --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID"'
    return ["# One task per node: `bigbatch launch` (torchrun) starts the node's ranks.",
            _continued([_words(*srun), _words("bash", "-c", per_task, "bigbatch-launch"),
                        _words(python, "-m", "bigbatch", "launch",
                               f"--nproc-per-node={shape.ranks_per_node}")
                        + ' --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
                        _words(train_args[0]), *settings])]


def _words(*words: str) -> str:
    return " ".join(shlex.quote(w) for w in words)


def _continued(lines: list[str]) -> str:
    return " \\\n  ".join(lines)


RENDEZVOUS = """\
# Rendezvous on the head node's NodeAddr (node names need not resolve); the port follows the job id.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
head_addr=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' | sed -n 1p)
export MASTER_ADDR="${head_addr:-$head_node}"
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
echo "bigbatch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \\
  "rendezvous $MASTER_ADDR:$MASTER_PORT"
"""


def render_sbatch(cfg: Config, *, config_path: Path, overrides: list[str], run_dir: Path,
                  python: str, log_path: Path | str) -> str:
    """The whole job script; ValueError (listing every problem) for an unsafe slurm section."""
    problems = sbatch_option_problems(cfg.slurm) + run_dir_problems(Path(log_path))
    if problems:
        raise ValueError("cannot render the job script:\n" + "\n".join(f"  - {p}" for p in problems))
    lines = ["#!/bin/bash",
             "# Written by `bigbatch submit`; submit it again with `sbatch job.sbatch`.",
             f"# Run directory, fixed at submission so a requeued job resumes there: {json.dumps(str(run_dir))}"]
    lines += [_sbatch_line(k, v) for k, v in sbatch_options(cfg, str(log_path))]
    lines += ["", "set -eo pipefail"]
    if cfg.slurm.setup:
        lines += ["", "# slurm.setup (verbatim)", *cfg.slurm.setup]
    if cfg.slurm.env:
        lines += ["", "# slurm.env"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in cfg.slurm.env.items()]
    lines += ["", RENDEZVOUS]
    lines += launch_lines(cfg, python, train_arguments(config_path, overrides, run_dir))
    return "\n".join(lines) + "\n"
