"""`bigbatch launch`: start N ranks per node through torch.distributed.run (torchrun's engine)."""

from __future__ import annotations

import signal

from torch.distributed import run as torch_run


def torchrun_args(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
                  bigbatch_args: list[str], max_restarts: int = 0) -> list[str]:
    """Arguments for torch.distributed.run that start `python -m bigbatch ARGS...` on every rank."""
    args = [f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}"]
    if nnodes == 1 and rdzv_endpoint is None:
        args.append("--standalone")  # picks a free local port itself
    else:
        if rdzv_endpoint is None:
            raise ValueError("--rdzv-endpoint HOST:PORT is required with --nnodes > 1")
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={rdzv_endpoint}"]
    return args + ["-m", "bigbatch", *bigbatch_args]


def launch(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
           train_args: list[str]) -> int:
    """Run `bigbatch train` on every rank; returns 0 on success."""
    return run_module(nproc_per_node, ["train", *train_args], nnodes, node_rank, rdzv_endpoint)


def run_module(nproc_per_node: int, bigbatch_args: list[str], nnodes: int = 1, node_rank: int = 0,
               rdzv_endpoint: str | None = None) -> int:
    """`python -m bigbatch ARGS` on every rank. A failed rank makes torchrun stop the others."""
    # Slurm signals every process of the step, this agent included, before the time limit (USR1) or
    # on `scancel --signal`. USR1 would kill the agent while its workers checkpoint; a Python no-op
    # keeps it alive (unlike SIG_IGN it is not inherited across exec: workers install their own).
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    parser = torch_run.get_args_parser()
    args = parser.parse_args(torchrun_args(nproc_per_node, nnodes, node_rank, rdzv_endpoint,
                                           bigbatch_args))
    try:
        torch_run.run(args)
    except Exception as err:  # torchrun's ChildFailedError already printed the rank's traceback
        print(f"bigbatch launch: {type(err).__name__}: a rank failed", flush=True)
        return 1
    return 0
