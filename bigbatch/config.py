"""The typed configuration tree: YAML in, validated `Config` out.

Every field carries a one-line description (shown by `bigbatch train CONFIG --print-config` and in
the README). This module is the schema and imports nothing of ours: the rules beyond one field live
in each package (`bigbatch/*/rules.py`) and `bigbatch.validate` composes them. Validation collects
every problem and raises one `ConfigError` listing them, each naming the key and the fix; the CLI
turns that into exit code 2 before anything is written.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """One or more problems in a run configuration; `problems` lists them, one per key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    # No float key has a use for inf or nan (an infinite epoch count overflowed the run length).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)


def _f(default: Any, doc: str, **kw: Any) -> Any:
    return Field(default, description=doc, **kw)


# Counts of steps, samples, tokens and batch sizes stay exact as floats (the LR schedule divides
# them); seeds fit numpy's 32-bit generator.
MAX_COUNT = 2**53
MAX_SEED = 2**32 - 1


def _count(default: Any, doc: str, **kw: Any) -> Any:
    return _f(default, doc, le=MAX_COUNT, **kw)


PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
# Layers and blocks are built one module at a time, so a hostile count would hang the build before any
# memory check could run (bigbatch.models.size counts parameters on the meta device, not modules).
MAX_LAYERS = 4096
LayerCount = Annotated[int, Field(gt=0, le=MAX_LAYERS)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class RunConfig(Section):
    name: str = _f("run", "run name; the run directory is out_dir/name")
    out_dir: str = _f("runs", "parent folder of run directories")
    seed: int = _f(0, "seed for model init, data order and every RNG (0 to 2**32 - 1)", ge=0, le=MAX_SEED)
    max_steps: Optional[int] = _count(None, "stop after this many optimizer steps", gt=0)
    max_samples: Optional[int] = _count(None, "stop after this many training samples", gt=0)
    epochs: Optional[float] = _count(None, "stop after this many passes over the training set", gt=0)
    deterministic: bool = _f(True, "use deterministic torch algorithms (bitwise resume on CPU)")
    if_exists: Literal["resume", "error", "archive"] = _f(
        "resume", "when the run dir already holds a run: resume it (checkpoint.resume says from where; "
        "never is refused), error, or archive (rename it to NAME.archived-DATE, start fresh; a requeue of "
        "the same Slurm job resumes)")


class DataConfig(Section):
    name: str = _f("fashion_mnist", "fashion_mnist | text | tokens | synthetic | 'pkg.module:build'")
    path: Optional[str] = _f(None, "dataset folder or file (fashion_mnist: Debian's folder by default)")
    glob: str = _f("*.txt", "text: files under `path` matching this glob")
    val_fraction: float = _f(0.1, "text/tokens/synthetic: fraction held out for validation", ge=0, lt=1)
    seq_len: int = _count(128, "text/tokens: tokens per training window", gt=0)
    token_dtype: Literal["uint16", "uint32"] = _f("uint16", "tokens: integer type of the binary file")
    vocab_size: Optional[int] = _count(None, "tokens: vocabulary size (default: max id + 1)", gt=0)
    errors: Literal["strict", "replace"] = _f(
        "strict", "text: invalid UTF-8 stops the run naming file and byte offset (strict) or becomes U+FFFD")
    shape: list[PositiveInt] = _f([1, 28, 28], "synthetic: shape of one input sample")
    num_classes: int = _count(10, "synthetic: number of classes", gt=1)
    num_samples: int = _count(4096, "synthetic: number of samples", gt=0)
    prefetch: Optional[bool] = _f(
        None, "gather the next step's batch in a background thread while this one runs (default: on for the "
        "built-in datasets, off for a custom one: a split whose batch() draws random numbers must keep it off)")
    kwargs: dict[str, Any] = _f({}, "extra keyword arguments for a custom builder")


class ModelConfig(Section):
    name: str = _f("mlp", "mlp | resnet | gpt | 'pkg.module:Class'")
    hidden: list[PositiveInt] = _f([256, 256], "mlp: hidden layer widths", max_length=MAX_LAYERS)
    width: int = _f(16, "resnet: channels of the first stage (64 = ResNet-18 width)", gt=0)
    blocks: list[LayerCount] = _f([1, 1, 1], "resnet: residual blocks per stage ([2,2,2,2] = ResNet-18)",
                                  min_length=1, max_length=8)
    n_layer: int = _f(4, "gpt: transformer blocks", gt=0, le=MAX_LAYERS)
    n_head: int = _f(4, "gpt: attention heads", gt=0)
    d_model: int = _f(128, "gpt: embedding width", gt=0)
    dropout: float = _f(0.0, "gpt/mlp: dropout probability", ge=0, lt=1)
    kwargs: dict[str, Any] = _f({}, "extra keyword arguments for a custom model class")
    loss: str = _f("cross_entropy", "training loss: cross_entropy, or 'pkg.module:fn' called as "
                   "fn(outputs, targets) -> mean loss (an nn.Module class is instantiated without arguments)")
    compile: bool = _f(False, "torch.compile the model (inductor; needs a C compiler on CPU); state-dict keys "
                       "and checkpoints stay those of the eager model")


class LRScalingConfig(Section):
    rule: Literal["none", "linear", "sqrt", "linear_then_sqrt"] = _f(
        "none", "how the peak LR follows the global batch B")
    base_batch: int = _count(256, "B0: the batch at which optim.lr was tuned", gt=0)
    knee_batch: Optional[int] = _count(None, "Bk: linear_then_sqrt switches to sqrt above it", gt=0)


class OptimConfig(Section):
    name: str = _f("sgd", "optimizer, registered in bigbatch.optim.registry: sgd, adam, adamw, adagrad, "
                   "rmsprop, lars, lamb, lion, schedule_free_adamw, muon, soap (heavyball)")
    lr: float = _f(0.1, "base LR (at lr_scaling.base_batch)", gt=0)
    weight_decay: float = _f(0.0, "weight decay", ge=0)
    momentum: float = _f(0.9, "sgd/lars/rmsprop/muon momentum", ge=0, lt=1)
    nesterov: bool = _f(False, "sgd/lars/muon: Nesterov momentum")
    betas: tuple[Fraction, Fraction] = _f((0.9, 0.999), "adam-family betas, each in [0, 1)")
    eps: Optional[float] = _f(None, "epsilon (default: the optimizer's own)", gt=0)
    decay_norm_and_bias: bool = _f(False, "also apply weight decay (and LARS/LAMB adaptation) to biases and norms")
    grad_clip: Optional[float] = _f(None, "clip the global gradient norm to this value", gt=0)
    trust_coefficient: float = _f(0.001, "lars: trust coefficient", gt=0)
    lars_clip: bool = _f(False, "lars: LARC clipping mode")
    trust_clip: Optional[float] = _f(None, "lamb: upper bound of the trust ratio", gt=0)
    muon_ns_steps: int = _f(5, "muon: Newton-Schulz iterations orthogonalizing each hidden matrix's update",
                            ge=1)
    impl: Literal["torch", "apex"] = _f("torch", "torch (ours) or apex fused kernels (CUDA only)")
    foreach: Optional[bool] = _f(None, "multi-tensor kernels (default: the optimizer's choice)")
    lr_scaling: LRScalingConfig = _f(LRScalingConfig(), "LR scaling rule")


class LRScheduleConfig(Section):
    name: Literal["constant", "cosine", "linear", "wsd", "one_cycle", "cyclic"] = _f(
        "constant", "schedule after warmup")
    warmup_samples: Optional[int] = _count(None, "warmup length in samples", ge=0)
    warmup_fraction: float = _f(0.0, "warmup length as a fraction of the run (if warmup_samples unset)",
                                ge=0, lt=1)
    min_lr_ratio: float = _f(0.0, "final LR as a fraction of the peak", ge=0, le=1)
    decay_fraction: float = _f(0.2, "wsd: final fraction of the run spent decaying", gt=0, le=1)
    cycle_samples: Optional[int] = _count(None, "cyclic: samples per half cycle", gt=0)


class Stage(Section):
    until_samples: int = _count(..., "this stage lasts until this many samples were seen", gt=0)
    batch: int = _count(..., "global batch during this stage", gt=0)


class BatchScheduleConfig(Section):
    kind: Literal["constant", "ramp", "stages"] = _f("constant", "how the global batch changes")
    start: Optional[int] = _count(None, "ramp: first global batch", gt=0)
    increment: Optional[int] = _count(None, "ramp: growth per interval", gt=0)
    ramp_samples: Optional[int] = _count(None, "ramp: samples until the target batch is reached", gt=0)
    stages: list[Stage] = _f([], "stages: table of {until_samples, batch}; global_batch afterwards")


class AdaptiveBatchConfig(Section):
    enabled: bool = _f(False, "grow the batch toward factor × gradient noise scale")
    factor: float = _f(1.0, "target batch = factor × noise scale", gt=0)
    min: Optional[int] = _count(None, "smallest batch (default batch.global_batch)", gt=0)
    max: Optional[int] = _count(None, "largest batch", gt=0)
    every_samples: int = _count(50_000, "re-evaluate the batch this often", gt=0)


class BatchConfig(Section):
    global_batch: int = _count(256, "samples per optimizer step over all ranks (the one knob)", gt=0)
    micro_batch: Optional[int] = _count(None, "largest per-rank forward batch; accumulation fills the rest",
                                    gt=0)
    schedule: BatchScheduleConfig = _f(BatchScheduleConfig(), "batch-size schedule")
    adaptive: AdaptiveBatchConfig = _f(AdaptiveBatchConfig(), "noise-scale driven batch growth")


class DistributedConfig(Section):
    strategy: str = _f("ddp", "how the model is replicated or sharded (bigbatch.distributed.registry): ddp, "
                       "zero1, zero2, zero3, deepspeed, diloco")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "auto: nccl with CUDA, gloo otherwise")
    timeout_s: float = _f(300.0, "collective timeout; a dead rank fails the job within it", gt=0)
    bucket_cap_mb: float = _f(25.0, "DDP gradient bucket size", gt=0)


class CompressionConfig(Section):
    method: str = _f("none", "gradient compression for DDP, registered in bigbatch.compression.registry: "
                     "none, fp16, bf16, powersgd, torch_powersgd")
    rank: int = _f(2, "powersgd: rank of the approximation", gt=0)
    start_step: int = _f(10, "powersgd: plain all-reduce before this step", ge=0)
    min_compression_rate: float = _f(2.0, "powersgd: compress only tensors shrunk at least this much",
                                     gt=0)
    error_feedback: bool = _f(True, "powersgd: carry the residual to the next step")
    warm_start: bool = _f(True, "powersgd: reuse Q between steps")
    orthogonalization: Literal["gram_schmidt", "qr"] = _f("gram_schmidt", "powersgd: how P is orthogonalized")
    seed: int = _f(0, "powersgd: seed of the initial Q")
    target_ratio: Optional[float] = _f(
        None, "powersgd: choose the rank instead of setting it: the largest rank whose compressed steps send at least "
        "this many times fewer bytes than the float32 all-reduce (100 with factor_bits 8: rank 13 on the demo)",
        gt=1)
    factor_bits: Literal[0, 8, 4] = _f(0, "powersgd: 8 or 4 sends P and Q as int8/int4 codes with a float32 scale per "
                                       "64 elements of a column (rank 8 at 8 bits costs about rank 2 in float32); "
                                       "0: float32")
    time_collectives: bool = _f(
        False, "method none: average in bigbatch's Python comm hook to also time it (comm_s/grad_allreduce, "
        "~2 ms/step on CPU); off: DDP's own C++ all-reduce, bytes still counted")


class OuterOptimizerConfig(Section):
    name: Literal["sgd"] = _f("sgd", "outer optimizer (SGD on the pseudo-gradient)")
    lr: float = _f(0.7, "outer learning rate", gt=0)
    momentum: float = _f(0.9, "outer momentum", ge=0, lt=1)
    nesterov: bool = _f(True, "Nesterov outer momentum (DiLoCo's choice)")


class PseudoGradCompressionConfig(Section):
    method: str = _f("none", "how pseudo-gradients travel: none, fp16, bf16, powersgd, int8, int4 (a registered "
                     "compressor)")
    rank: int = _f(2, "powersgd: rank", gt=0)
    start_step: int = _f(0, "powersgd: plain all-reduce for this many outer steps", ge=0)
    min_compression_rate: float = _f(2.0, "powersgd: compress only tensors shrunk at least this much", gt=0)
    error_feedback: bool = _f(True, "powersgd, int8, int4: carry the residual to the next outer step")
    warm_start: bool = _f(True, "powersgd: reuse Q between outer steps")
    orthogonalization: Literal["gram_schmidt", "qr"] = _f("gram_schmidt", "powersgd: orthogonalization")
    seed: int = _f(0, "powersgd: seed of the initial Q")
    block_size: int = _f(64, "int8, int4: elements per float32 scale; 0: one scale per row (first dimension)",
                         ge=0)
    factor_bits: Literal[0, 8, 4] = _f(0, "powersgd: 8 or 4 sends P and Q as int8/int4 codes with a float32 "
                                       "scale per 64 elements of a column; 0: float32")


class DiLoCoConfig(Section):
    replicas: int = _f(2, "k: model replicas; the world is k replicas x m ranks (DDP inside a replica)", gt=0)
    inner_steps: int = _f(50, "H: local steps between outer synchronisations", gt=0)
    outer_optimizer: OuterOptimizerConfig = _f(OuterOptimizerConfig(), "outer optimizer")
    compression: PseudoGradCompressionConfig = _f(PseudoGradCompressionConfig(), "pseudo-gradient compression")
    offload: bool = _f(True, "keep the global weights and outer optimizer state on the CPU")
    count_intra_bytes: bool = _f(True, "route intra-replica gradients through the accounting hook")
    fragments: int = _f(1, "streaming DiLoCo: parameter fragments synchronised on a staggered schedule", gt=0)
    mixing: float = _f(0.0, "streaming DiLoCo: local weight kept when a fragment syncs (alpha; 1 keeps the "
                       "local weights)", ge=0, le=1)
    sync_delay: int = _f(0, "streaming DiLoCo: start a fragment's exchange this many inner steps before it "
                         "is applied (tau, overlaps it with training); below inner_steps // fragments", ge=0)
    warmup_steps: int = _count(0, "synchronous warm start: the first W steps average gradients across replicas "
                               "(data parallel, no outer step); the cycles start after them; a multiple of "
                               "inner_steps", ge=0)


class DeepSpeedConfig(Section):
    stage: int = _f(2, "ZeRO stage 0-3 (distributed.strategy: deepspeed)", ge=0, le=3)
    config: dict[str, Any] = _f({}, "more DeepSpeed JSON config, merged over what bigbatch sets")


class RematConfig(Section):
    policy: Literal["none", "full", "every_k", "selective"] = _f(
        "none", "activation rematerialization of model.blocks")
    k: int = _f(2, "every_k: recompute every k-th block", gt=0)
    measure_every_steps: Optional[int] = _f(
        10, "log activation_bytes (saved for backward, one micro-batch) every N steps; null: never", gt=0)


class CheckpointConfig(Section):
    every_steps: Optional[int] = _f(None, "save every this many steps", gt=0)
    every_minutes: Optional[float] = _f(None, "save every this many minutes", gt=0)
    keep_last: int = _f(3, "keep the newest k checkpoints (0 keeps all)", ge=0)
    at_end: bool = _f(True, "save when training ends")
    resume: str = _f("auto", "auto (newest valid in the run dir) | never | PATH to a step-N dir")
    allow_config_change: bool = _f(
        False, "resume although keys other than budget, eval, metrics, checkpoint, slurm and "
        "distributed.timeout_s changed since the checkpoint (parameter shapes must still match)")


class GuardConfig(Section):
    enabled: bool = _f(False, "turn the loss-spike guard on")
    nan: Literal["skip", "error"] = _f("skip", "what a non-finite loss does")
    spike_factor: float = _f(3.0, "a loss above factor × recent median is a spike", gt=1)
    window: int = _f(50, "recent losses the median is taken over", gt=1)
    rollback: bool = _f(True, "on a spike, reload the latest checkpoint")
    skip_batches: int = _f(200, "batches skipped after a rollback", ge=0)
    max_consecutive_skips: int = _f(20, "non-finite loss/grad-norm steps skipped in a row before the run "
                                        "stops as diverged (exit 3); checked even when the guard is off", ge=1)


class EMAConfig(Section):
    enabled: bool = _f(False, "keep an average of the weights (float32, beside the model), checkpointed and "
                       "evaluated (bigbatch.optim.averaging)")
    kind: Literal["ema", "swa"] = _f("ema", "ema: exponential moving average; swa: equal-weight mean of the "
                                     "weights from start_samples on")
    decay: float = _f(0.999, "ema: weight of the old average at each update (1 - decay mixes in the weights)",
                      gt=0, lt=1)
    debias: bool = _f(False, "ema: Adam-style bias correction (update n mixes in (1 - decay) / (1 - decay^n)); "
                      "off: the first update copies the weights")
    every_steps: int = _count(1, "update after every N-th optimizer step (diloco: every N-th outer "
                              "synchronisation); skipped steps never update", gt=0)
    start_samples: int = _count(0, "first update after the step that reaches this many samples", ge=0)
    eval_with_ema: bool = _f(True, "evaluate with the averaged weights (val_*), the raw ones logged as "
                             "val_*_raw")


class EvalConfig(Section):
    every_steps: Optional[int] = _f(None, "evaluate every this many steps", gt=0)
    at_end: bool = _f(True, "evaluate when training ends")
    batch_size: int = _f(1024, "per-rank evaluation batch", gt=0)
    max_batches: Optional[int] = _f(None, "cap on evaluation batches per rank", gt=0)


class MetricsConfig(Section):
    log_every_steps: int = _f(10, "plain log line period when not on a TTY", gt=0)
    tensorboard: bool = _f(True, "write TensorBoard event files")
    progress: Literal["auto", "bar", "log", "none"] = _f("auto", "rank-0 progress display")
    noise_scale: bool = _f(False, "estimate and log the gradient noise scale (needs >= 2 ranks)")
    noise_scale_ema: float = _f(0.99, "EMA decay of the noise-scale estimates", ge=0, lt=1)
    peak_flops: Union[float, str] = _f(
        "auto", "MFU's denominator, per device: FLOP/s (989e12), a GPU of the table (a100, h100-sxm, "
        "h100-pcie, h200, l40s, l4, a10), auto (detect the GPU; unknown on CPU: no MFU) or unknown")


class SlurmConfig(Section):
    partition: Optional[str] = _f(None, "sbatch --partition")
    account: Optional[str] = _f(None, "sbatch --account")
    qos: Optional[str] = _f(None, "sbatch --qos")
    nodes: int = _f(1, "sbatch --nodes", gt=0)
    ntasks_per_node: Optional[int] = _f(
        None, "ranks per node (srun tasks, or torchrun workers per node); default gpus_per_node, "
        "or 1 without GPUs", gt=0)
    gpus_per_node: int = _f(0, "sbatch --gpus-per-node", ge=0)
    cpus_per_task: Optional[int] = _f(None, "sbatch --cpus-per-task", gt=0)
    mem: Optional[str] = _f(None, "sbatch --mem, e.g. 64G")
    time: Optional[str] = _f(None, "sbatch --time, e.g. 04:00:00")
    constraint: Optional[str] = _f(None, "sbatch --constraint")
    exclusive: bool = _f(False, "sbatch --exclusive")
    job_name: Optional[str] = _f(None, "sbatch --job-name (default run.name)")
    mail: Optional[str] = _f(None, "sbatch --mail-user (with --mail-type=END,FAIL)")
    signal: str = _f("USR1@120", "sbatch --signal: signal sent this many seconds before the time limit")
    requeue: bool = _f(True, "requeue the job after a preemption or time-limit signal")
    launch_mode: Literal["torchrun", "srun"] = _f(
        "srun", "torchrun: one srun task per node running `bigbatch launch`; srun: one task per rank")
    setup: list[str] = _f([], "shell lines run before training (module loads, venv activation)")
    env: dict[str, str] = _f({}, "environment variables exported in the job")
    extra: dict[str, Union[str, int, bool]] = _f({}, "other sbatch options by long name, e.g. {reservation: x}")
    backend: Literal["sbatch", "submitit"] = _f("sbatch", "submit with sbatch or through submitit")


class Config(Section):
    """A whole run."""

    run: RunConfig = _f(RunConfig(), "run identity and length")
    data: DataConfig = _f(DataConfig(), "dataset")
    model: ModelConfig = _f(ModelConfig(), "model")
    optim: OptimConfig = _f(OptimConfig(), "optimizer")
    lr: LRScheduleConfig = _f(LRScheduleConfig(), "LR schedule on a sample clock")
    batch: BatchConfig = _f(BatchConfig(), "global batch, micro-batch and batch-size schedule")
    distributed: DistributedConfig = _f(DistributedConfig(), "parallelism and process group")
    precision: Literal["fp32", "bf16"] = _f("fp32", "fp32, or bf16 autocast for forward/backward")
    compression: CompressionConfig = _f(CompressionConfig(), "gradient compression (DDP only)")
    diloco: DiLoCoConfig = _f(DiLoCoConfig(), "DiLoCo inner/outer optimization (distributed.strategy: diloco)")
    deepspeed: DeepSpeedConfig = _f(DeepSpeedConfig(), "DeepSpeed engine (distributed.strategy: deepspeed)")
    remat: RematConfig = _f(RematConfig(), "activation rematerialization")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), "checkpoints and resume")
    guard: GuardConfig = _f(GuardConfig(), "loss-spike guard")
    ema: EMAConfig = _f(EMAConfig(), "weight averaging: EMA or SWA of the weights")
    eval: EvalConfig = _f(EvalConfig(), "held-out evaluation")
    metrics: MetricsConfig = _f(MetricsConfig(), "metrics sinks and progress display")
    slurm: SlurmConfig = _f(SlurmConfig(), "Slurm submission (bigbatch submit)")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def to_commented_yaml(self) -> str:
        """The resolved config as YAML with each key's description as a comment (--print-config);
        it loads back to the same values as `to_yaml`."""
        return "\n".join(_commented_lines(self, 0)) + "\n"

    def digest(self) -> str:
        """Short hash of the resolved config, stored in checkpoint metadata."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]


def _commented_lines(section: BaseModel, depth: int) -> list[str]:
    lines, pad = [], "  " * depth
    for name, field in type(section).model_fields.items():
        value, doc = getattr(section, name), field.description or ""
        if isinstance(value, BaseModel):
            lines += [f"{pad}{name}:  # {doc}", *_commented_lines(value, depth + 1)]
            continue
        text = yaml.safe_dump(section.model_dump(mode="json", include={name})[name], default_flow_style=True,
                              width=2**31)
        text = text.removesuffix("\n").removesuffix("\n...").strip()  # a scalar document ends with "..."
        lines.append(f"{pad}{name}: {text}  # {doc}")
    return lines


# ----------------------------------------------------------------------------- loading

class AliasError(yaml.YAMLError):
    """A YAML anchor or alias in a run config."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases. Nine levels of nine aliases expand a 1 kB file into
    nine to the ninth values, and every later pass (validation, dumping, hashing) would walk them all;
    a run config has no need for them, so they are refused before anything is built."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise AliasError(f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name, *name, "
                             "<<: *name) are not allowed in a run config; write the values out")
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` without anchors and aliases (AliasError names the line)."""
    return yaml.load(text, Loader=_NoAliasLoader)


def read_raw_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """The YAML mapping with `a.b=c` overrides applied, and the problems found on the way.

    Only reading problems (missing file, bad YAML, not a mapping) raise at once: nothing else can be
    checked without the mapping. Rules beyond the schema live in `bigbatch.validate`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path}: not found; pass the path of a YAML file"])
    try:
        raw = load_yaml(path.read_text()) or {}
    except AliasError as err:
        raise ConfigError([f"config file {path}: {err}"]) from None
    except RecursionError:
        raise ConfigError([f"config file {path}: nested too deeply; a run config is a few levels of "
                           "sections"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"config file {path}: not valid YAML ({err}); fix the syntax"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {path}: the top level must be a mapping of sections"])
    return raw, [p for item in overrides for p in _apply_override(raw, item)]


def parse_config(raw: dict, problems: Sequence[str] = ()) -> tuple[Config | None, list[str]]:
    """(Config or None, problems): the schema's verdict on a raw mapping, every field at once."""
    problems = list(problems)
    try:
        return Config.model_validate(raw), problems
    except ValidationError as err:
        return None, problems + [_describe(e) for e in err.errors()]


def _apply_override(raw: dict, item: str) -> list[str]:
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        return [f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set optim.lr=0.1"]
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return [f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section"]
        node = child
    try:
        node[parts[-1]] = load_yaml(value) if value.strip() else None
    except AliasError as err:
        return [f"--set {item[:80]!r}: {err}"]
    except RecursionError:
        return [f"--set {item[:80]!r}: nested too deeply"]
    except yaml.YAMLError:
        node[parts[-1]] = value
    return []


def _describe(error: dict) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(error["loc"][:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{key}: unknown key.{hint} Valid keys here: {', '.join(valid)}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _valid_keys(loc: tuple) -> list[str]:
    """Field names of the section at `loc` (a pydantic error location) in the Config tree."""
    model: Any = Config
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        model = next((a for a in getattr(annotation, "__args__", ()) if hasattr(a, "model_fields")),
                     annotation)
        if getattr(annotation, "__origin__", None) is list:
            model = annotation.__args__[0]
    return list(getattr(model, "model_fields", {}))


# ----------------------------------------------------------------------------- batch arithmetic

def split_batch(global_batch: int, world_size: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) for one optimizer step; ValueError shows the arithmetic.

    The global batch must divide over the ranks; the per-rank batch is then cut into equal
    micro-batches no larger than `micro_batch`.
    """
    if global_batch % world_size:
        raise ValueError(
            f"batch.global_batch={global_batch} does not split over {world_size} ranks "
            f"({global_batch} / {world_size} = {global_batch / world_size:g}); use a multiple of {world_size}")
    per_rank = global_batch // world_size
    if micro_batch is None or per_rank <= micro_batch:
        return per_rank, 1
    if per_rank % micro_batch:
        raise ValueError(
            f"batch.micro_batch={micro_batch} does not divide the per-rank batch {per_rank} "
            f"(= global_batch {global_batch} / {world_size} ranks; {per_rank} / {micro_batch} = "
            f"{per_rank / micro_batch:g}); choose a micro_batch dividing {per_rank} or a global_batch "
            f"that is a multiple of {world_size * micro_batch}")
    return micro_batch, per_rank // micro_batch
