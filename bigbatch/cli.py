"""The `bigbatch` command line: parse, validate, call. Bad input exits with code 2."""

from __future__ import annotations

import argparse
import sys

from bigbatch import exit_codes
from bigbatch.config import ConfigError
from bigbatch.training.guard import Diverged
from bigbatch.metrics import StorageError
from bigbatch.validate import load_config



def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run configuration")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.2 (repeatable)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default."""


def build_parser() -> argparse.ArgumentParser:
    from bigbatch import __version__

    parser = argparse.ArgumentParser(prog="bigbatch", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"bigbatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    command = lambda name, **kw: sub.add_parser(name, formatter_class=_HelpFormatter, **kw)  # noqa: E731

    train = command("train", help="train in this process (one rank under torchrun/srun/mpirun)")
    _add_config_args(train)
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config, every key with its description, and exit")

    launch = command("launch", help="start several ranks on this node (torch.distributed.run)")
    _add_config_args(launch)
    launch.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this node (one per GPU)")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's index, 0 .. nnodes-1")
    launch.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")

    lr_find = command("lr-find", help="LR range test: sweep the LR exponentially, suggest one")
    _add_config_args(lr_find)
    lr_find.add_argument("--min-lr", type=float, default=1e-5, help="first LR of the sweep")
    lr_find.add_argument("--max-lr", type=float, default=10.0, help="last LR of the sweep")
    lr_find.add_argument("--steps", type=int, default=100, help="steps of the sweep (fewer if the loss diverges)")

    bench = command("bench", help="communication micro-benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    allreduce = bench_sub.add_parser("allreduce", help="all-reduce latency, algbw and busbw per size",
                                     formatter_class=_HelpFormatter)
    allreduce.add_argument("--nproc-per-node", type=int, default=2, help="ranks to start on this node")
    allreduce.add_argument("--sizes", default="1M,16M,64M", help="comma-separated sizes (K/M/G = 2^10..)")
    allreduce.add_argument("--iters", type=int, default=20, help="timed all-reduces per size")
    allreduce.add_argument("--warmup", type=int, default=5, help="untimed all-reduces per size first")
    allreduce.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                           help="auto: nccl with CUDA, gloo otherwise")

    submit = command("submit", help="submit the run as a Slurm job (sbatch or submitit)")
    _add_config_args(submit)
    submit.add_argument("--dry-run", action="store_true",
                        help="write RUN_DIR/job.sbatch, print the rank map, check it with `sbatch --test-only`, "
                             "submit nothing")

    plan = command("plan", help="per-rank memory under ddp/zero1/2/3 and remat; largest micro-batch")
    _add_config_args(plan)
    plan.add_argument("--world-size", type=int, required=True, help="ranks the job will run on")
    plan.add_argument("--device-memory", default="80GB", help="memory of one device, e.g. 80GB, 24GiB")

    report = command("report", help="plot a run's metrics into PNG files")
    report.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    if args.print_config:
        print(load_config(args.config, args.set).to_commented_yaml(), end="")
        return 0
    from bigbatch.launch.env import detect

    # The world size comes from the launcher's variables, so every rule is checked before the
    # process group exists.
    cfg = load_config(args.config, args.set, world_size=detect().world_size)
    from bigbatch.launch.runtime import distributed_runtime
    from bigbatch.training.run import run_training

    with distributed_runtime(cfg.distributed) as runtime:
        run_training(cfg, runtime)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    # Every rule, the world-size ones included, is checked once here, before any rank starts.
    load_config(args.config, args.set, world_size=args.nproc_per_node * args.nnodes)
    from bigbatch.launch.local import launch

    train_args = [args.config] + [f"--set={item}" for item in args.set]
    return launch(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint, train_args)


def cmd_lr_find(args: argparse.Namespace) -> int:
    from bigbatch.launch.env import detect

    cfg = load_config(args.config, args.set, world_size=detect().world_size)
    from bigbatch.launch.runtime import distributed_runtime
    from bigbatch.commands.lr_find import run_lr_find

    with distributed_runtime(cfg.distributed) as runtime:
        result = run_lr_find(cfg, runtime, args.min_lr, args.max_lr, args.steps)
    if runtime.is_main:
        scaling = cfg.optim.lr_scaling
        rule = "" if scaling.rule == "none" else (f", = optim.lr x {result['suggested_lr'] / result['optim_lr']:.4g} "
                                                   f"by lr_scaling {scaling.rule} from base_batch {scaling.base_batch}")
        print(f"lr-find: {len(result['losses'])} steps from {args.min_lr:g}; suggested lr "
              f"{result['suggested_lr']:.4g} at global batch {cfg.batch.global_batch}{rule}")
        print(f"set optim.lr: {result['optim_lr']:.4g}   (plot {result['plot']}, sweep "
              f"{cfg.run_dir / 'lr_find.json'})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Outside a launcher, start N ranks that re-run this command; inside one, measure."""
    import os

    from bigbatch.config import DistributedConfig
    from bigbatch.distributed.allreduce_bench import format_table, parse_size, run_allreduce_bench
    from bigbatch.launch.runtime import distributed_runtime

    try:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    except ValueError as err:
        raise ValueError(f"--sizes: {err}") from None
    if "RANK" not in os.environ:
        from bigbatch.launch.local import run_module

        return run_module(args.nproc_per_node, ["bench", "allreduce", f"--sizes={args.sizes}",
                                                f"--iters={args.iters}", f"--warmup={args.warmup}",
                                                f"--backend={args.backend}"])
    with distributed_runtime(DistributedConfig(backend=args.backend)) as runtime:
        rows = run_allreduce_bench(sizes, args.iters, args.warmup, device=runtime.device)
        if runtime.is_main:
            print(f"all-reduce over {runtime.world_size} ranks ({runtime.backend})")
            print(format_table(rows))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from bigbatch.validate import validate

    cfg = load_config(args.config, args.set)
    from bigbatch.slurm.shape import JobShape, rank_map

    validate(cfg, JobShape.of(cfg.slurm).world_size)  # the job's ranks, before anything is queued
    from bigbatch.slurm.submit import SubmitError, submit

    try:
        result = submit(cfg, args.config, args.set, dry_run=args.dry_run)
    except SubmitError as err:  # Slurm refused or cannot be reached
        print(f"bigbatch: submit: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"job script: {result.script_path}")
        print(result.test_only or "sbatch not found: script written, not checked")
        print(rank_map(cfg))
    else:
        print(f"submitted job {result.job_id}")
        print(f"log: {result.log_path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if args.world_size < 1:
        raise ValueError("--world-size: must be at least 1")
    cfg = load_config(args.config, args.set, world_size=args.world_size)
    from bigbatch.commands.plan import plan_run

    print(plan_run(cfg, args.world_size, args.device_memory))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bigbatch.commands.report import throughput_summary, write_report

    for path in write_report(args.run_dir):
        print(path)
    summary = throughput_summary(args.run_dir)
    if summary:
        print(summary)
    return 0


COMMANDS = {"train": cmd_train, "launch": cmd_launch, "lr-find": cmd_lr_find, "bench": cmd_bench,
            "submit": cmd_submit, "plan": cmd_plan,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"bigbatch: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except (ValueError, FileNotFoundError) as err:
        print(f"bigbatch: error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except Diverged:  # rank 0's run summary already said why, in one line
        return exit_codes.DIVERGED
    except StorageError as err:  # a full disk: the file and the errno, no traceback
        print(f"bigbatch: error: {err}", file=sys.stderr)
        return exit_codes.FAILED
    except KeyboardInterrupt:  # Ctrl-C before the training loop could note it
        from bigbatch.launch.failure import interrupted
        return interrupted()
    except Exception as err:  # under `bigbatch launch`: the launcher prints one line for it
        from bigbatch.launch.failure import launched_rank, record_rank_failure
        if not launched_rank():
            raise
        return record_rank_failure(err)
