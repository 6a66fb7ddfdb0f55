"""Slurm's compressed host and task lists, expanded as `scontrol show hostnames` does.

    expand_hostlist("rack[1-2]-node[01-02]")  -> rack1-node01, rack1-node02, rack2-node01, rack2-node02
    expand_hostlist("gpu[1,3-4],login")       -> gpu1, gpu3, gpu4, login
    expand_tasks_per_node("3(x2),2")          -> [3, 3, 2]

Host lists: names are separated by commas (or whitespace) outside brackets; a name is literal text
and bracket groups of numbers and ranges, expanded as a cartesian product with the first group
outermost; a range keeps the zero padding of its lower end (`[01-10]` -> 01..10, `[1-010]` -> 1..10);
order and duplicates are kept. Unlike some Slurm builds we also accept text after the last bracket
(`node[01-02]-ib`), which sites use for interface names.
"""

from __future__ import annotations

import itertools
import math
import re

MAX_RANGE = 65536  # hosts in one range, Slurm's own limit (a typo like [1-1000000] is refused)
MAX_HOSTS = 1 << 20

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """Every host name of a Slurm host list, in Slurm's order; ValueError for a malformed one."""
    hosts: list[str] = []
    for name in _split_top_level(hostlist):
        hosts += _expand_name(name, hostlist)
        if len(hosts) > MAX_HOSTS:
            raise ValueError(f"host list {hostlist!r}: more than {MAX_HOSTS} hosts")
    return hosts


def expand_tasks_per_node(tasks: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ('3(x2),2') as one count per node ([3, 3, 2])."""
    counts: list[int] = []
    for item in tasks.split(","):
        match = _TASKS.match(item.strip())
        if not match:
            raise ValueError(f"SLURM_TASKS_PER_NODE={tasks!r}: {item!r} is not N or N(xREPEAT), "
                             "e.g. '3(x2),2'")
        repeat = int(match[2] or 1)
        if repeat > MAX_HOSTS or len(counts) + repeat > MAX_HOSTS:
            raise ValueError(f"SLURM_TASKS_PER_NODE={tasks!r}: more than {MAX_HOSTS} nodes")
        counts += [int(match[1])] * repeat
    return counts


def _split_top_level(hostlist: str) -> list[str]:
    """Names separated by commas or whitespace outside brackets; empty names are dropped."""
    names, current, depth = [], "", 0
    for ch in hostlist:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"host list {hostlist!r}: unbalanced or nested brackets")
        if depth == 0 and (ch == "," or ch.isspace()):
            names.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError(f"host list {hostlist!r}: '[' without its ']'")
    return [n for n in names + [current] if n]


def _expand_name(name: str, hostlist: str) -> list[str]:
    # re.split with a capturing group alternates literal text and bracket contents.
    parts = re.split(r"\[([^\]]*)\]", name)
    choices = [[text] if i % 2 == 0 else _expand_group(text, hostlist) for i, text in enumerate(parts)]
    if math.prod(len(options) for options in choices) > MAX_HOSTS:
        raise ValueError(f"host list {hostlist!r}: more than {MAX_HOSTS} hosts")
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_group(group: str, hostlist: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']."""
    numbers: list[str] = []
    for item in group.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ValueError(f"host list {hostlist!r}: [{group}] holds {item!r}, not a number or a "
                             "range like 01-04")
        low, high = match[1], match[2] if match[2] is not None else match[1]
        if int(high) < int(low):
            raise ValueError(f"host list {hostlist!r}: range {item!r} runs backwards")
        if int(high) - int(low) >= MAX_RANGE:
            raise ValueError(f"host list {hostlist!r}: range {item!r} has more than {MAX_RANGE} hosts")
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers
