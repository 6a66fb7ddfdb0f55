"""Slurm host lists and task counts: a table of real-world forms, checked against scontrol when present."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from bigbatch.slurm.hostlist import expand_hostlist, expand_tasks_per_node

HOSTLISTS = [
    ("gpu-a01", ["gpu-a01"]),
    ("n1,n2", ["n1", "n2"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("nid[00098-00100]", ["nid00098", "nid00099", "nid00100"]),
    ("n[9-11]", ["n9", "n10", "n11"]),                       # padding comes from the lower end
    ("n[1-010]", [f"n{i}" for i in range(1, 11)]),
    ("n[1,3-5]", ["n1", "n3", "n4", "n5"]),
    ("n[2,1,2]", ["n2", "n1", "n2"]),                         # order and duplicates kept
    ("n[1-2],m[07-08],login", ["n1", "n2", "m07", "m08", "login"]),
    ("gpu-a[01-02],gpu-b07", ["gpu-a01", "gpu-a02", "gpu-b07"]),
    ("rack[1-2]-node[01-04]", [f"rack{r}-node0{n}" for r in (1, 2) for n in range(1, 5)]),
    ("n[001-3,7]x[1-2]", ["n001x1", "n001x2", "n002x1", "n002x2", "n003x1", "n003x2", "n7x1", "n7x2"]),
    ("n[1-2]-[3-4]", ["n1-3", "n1-4", "n2-3", "n2-4"]),
    ("n[1-2]-ib[0]", ["n1-ib0", "n2-ib0"]),
    ("a,,b", ["a", "b"]),
    ("a b", ["a", "b"]),
    ("jwb[0001-0002],jwb0042", ["jwb0001", "jwb0002", "jwb0042"]),
    ("localhost", ["localhost"]),
    ("", []),
    # Text after the last bracket: sites name interfaces so; some Slurm builds refuse it.
    ("node[01-02]-ib", ["node01-ib", "node02-ib"]),
    ("cn[1-2].cluster.example", ["cn1.cluster.example", "cn2.cluster.example"]),
]

MALFORMED = [
    ("n[3-1]", "runs backwards"),
    ("n[1-", "'[' without its ']'"),
    ("n]", "unbalanced"),
    ("n[1[2]]", "nested"),
    ("n[]", "not a number or a range"),
    ("n[a-b]", "not a number or a range"),
    ("n[0-70000]", "more than 65536 hosts"),
]


@pytest.mark.parametrize("hostlist,hosts", HOSTLISTS)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist,message", MALFORMED)
def test_malformed_hostlist_names_itself_and_the_problem(hostlist, message):
    with pytest.raises(ValueError, match=r"host list") as err:
        expand_hostlist(hostlist)
    assert message in str(err.value) and repr(hostlist) in str(err.value)


@pytest.mark.parametrize("tasks,counts", [
    ("1", [1]), ("8", [8]), ("2(x3)", [2, 2, 2]), ("3(x2),2", [3, 3, 2]), ("4,2(x2),1", [4, 2, 2, 1]),
])
def test_expand_tasks_per_node(tasks, counts):
    assert expand_tasks_per_node(tasks) == counts


@pytest.mark.parametrize("tasks", ["", "x", "3(x)", "3(2)", "3(x2", "-1", "2,,3"])
def test_malformed_tasks_per_node(tasks):
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node(tasks)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
def test_same_answer_as_scontrol_show_hostnames(tmp_path):
    # `scontrol show hostnames` expands locally but needs some slurm.conf to start.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hl\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    compared = []
    for hostlist, _ in HOSTLISTS:
        if not hostlist:
            continue
        done = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True,
                              text=True, env=env, timeout=30)
        if "Invalid hostlist" in done.stdout + done.stderr:  # a suffix this Slurm build refuses
            continue
        assert expand_hostlist(hostlist) == done.stdout.split(), hostlist
        compared.append(hostlist)
    assert len(compared) >= 15, compared
