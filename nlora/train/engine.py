"""Everything about the distributed engine, in one place: the run's Accelerator, which engines are accepted, and
FSDP2 sharding of the base model.

Engines. `accelerate launch` picks the process count and the engine: DDP (multi-GPU or multi-CPU) or DeepSpeed
ZeRO stage 1/2 keep every parameter whole on every process. With run option `sharding: fsdp2`, nlora itself
shards the base model across the launched processes with PyTorch's `torch.distributed.fsdp.fully_shard` (the
function accelerate's FSDP2 calls), one unit per transformer block plus the root. It does that itself rather than
through accelerate's FSDP plugin because (1) the plugin does not switch on for CPU processes, so the tested path
would not be the one users run, and (2) accelerate shards at `prepare` time, but nlora adds a new adapter to the
same model at every task.

What is sharded. The frozen base weights are; the LoRA factors are not. `fully_shard` wraps the model before any
adapter exists, so every adapter is added later as a plain parameter of its block that FSDP2 does not manage:
  * adapters come and go after wrapping (a new one per task, a folded "past" adapter), and an FSDP2 unit's
    parameter set is fixed when it is created;
  * they are small (r · (d_in + d_out) per layer, well under 1% of a 7B base at r 8), so sharding them would save
    little, while keeping them whole means saving (PEFT format), checkpoints, resume, diagnostics and the
    regularisers read them directly, with no gather;
  * the base is frozen, so FSDP2 only all-gathers it for each block's forward (and again for backward) and
    reduce-scatters nothing; the adapters' gradients, replicated like under DDP, are averaged across processes
    once per optimizer step (`reduce_replicated_gradients`).
Evaluation runs every batch on every process under sharding: each forward is a collective, and generation stops
after a number of steps that depends on the batch, so the processes must run the same batches. It holds the root
unit gathered throughout (`gathered_root`), since generation calls parts of the model outside the root's forward.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from ..config import RunConfig
from ..errors import NloraError
from ..precision import select_device
from ..preflight import check_batch_split
from ..tracking import accelerator_tracking

_SHARDED = "_nlora_fsdp2"  # attribute set on a model whose base is sharded


# Where a launcher tells a process how many were started: torchrun (accelerate's multi-process launchers, nlora's
# --num-processes) and MPI (Intel MPI, Open MPI, MVAPICH), the variables accelerate reads.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch() -> None:
    """Refuse a process that `accelerate launch` started alone although more were asked for. With --cpu, or on a
    machine without GPUs, accelerate's launcher starts one process and leaves the others to mpirun; it then sets
    MASTER_ADDR and MASTER_PORT (only when more than one process is asked for) but no process count, and the one
    process would run the whole job as a one-process run."""
    by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by every `accelerate launch`
    if by_accelerate and "MASTER_PORT" in os.environ and not any(v in os.environ for v in _WORLD_SIZE_VARIABLES):
        raise NloraError("`accelerate launch` started one process although more were asked for (MASTER_PORT is "
                         "set, no WORLD_SIZE): with --cpu or without GPUs it starts a single process and leaves "
                         "the others to mpirun. Start N processes with `nlora run --num-processes N ...` or "
                         "`accelerate launch --config_file examples/accelerate/ddp.yaml -m nlora run ... --device "
                         "cpu`; for one process, launch without --num_processes")


def make_accelerator(config: RunConfig) -> Accelerator:
    """The run's Accelerator: mixed precision and gradient accumulation come from the run's options (recorded in
    config.yaml); the distributed engine (DDP, DeepSpeed) and the process count come from `accelerate launch`."""
    check_launch()
    for option, variable, neutral in (("mixed_precision", "ACCELERATE_MIXED_PRECISION", "no"),
                                      ("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")):
        launched = os.environ.get(variable, neutral)
        if launched not in (neutral, str(getattr(config, option))):
            raise NloraError(f"the accelerate launch configuration sets {option} {launched}, but option "
                             f"'{option}' is {getattr(config, option)}; set it through nlora "
                             f"(--{option.replace('_', '-')} {launched}) so that the run directory records it")
    # A previous run in this process may have used another precision; the process group (PartialState) stays.
    AcceleratorState._reset_state()
    select_device(config.device)
    # split_batches: batch_size is the global batch, so the prepared scheduler steps once per optimizer step.
    accelerator = Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              **accelerator_tracking(config))
    _check_engine(accelerator, config)
    return accelerator


def _check_engine(accelerator: Accelerator, config: RunConfig) -> None:
    """Refuse the engines that would shard the LoRA factors themselves, check `sharding`, and fill DeepSpeed's
    batch settings from the run's options."""
    engine = accelerator.distributed_type
    if engine == DistributedType.FSDP:
        raise NloraError("accelerate's FSDP plugin is not used: it shards the model when it is prepared, but nlora "
                         "adds a new adapter at every task. Launch with a plain multi-process configuration "
                         "(examples/accelerate/fsdp2.yaml) and pass --sharding fsdp2: nlora then shards the base "
                         "model itself with FSDP2 (fully_shard per transformer block)")
    if config.sharding == "fsdp2":
        if engine not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO):
            raise NloraError(f"option 'sharding': fsdp2 needs a plain multi-process launch (multi-GPU or "
                             f"multi-CPU), not {engine.value}")
        if config.mixed_precision != "no":
            raise NloraError("option 'sharding': fsdp2 runs with mixed_precision no (load the base model in "
                             "bf16 instead); autocast around a sharded model is not supported yet")
    if engine != DistributedType.DEEPSPEED:
        return
    if config.grad_mask != "none":
        raise NloraError(f"option 'grad_mask': {config.grad_mask} masks the gradients before the optimizer step, "
                         "but DeepSpeed steps inside its backward; launch without DeepSpeed (DDP, or --sharding "
                         "fsdp2)")
    check_batch_split(config, accelerator.num_processes)  # DeepSpeed's micro-batch below divides by it
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage == 3:
        raise NloraError("DeepSpeed ZeRO stage 3 is not supported: it gathers each parameter only inside the "
                         "forward of the module that owns it (lora_A and lora_B are their own modules), so the "
                         "penalties, which read both factors in the adapted layer's forward, would see partitions; "
                         "it is also untested here (DeepSpeed does not install on this CPU-only machine). Use "
                         "--sharding fsdp2 to shard the base model, or ZeRO stage 2 "
                         "(examples/accelerate/deepspeed_zero2.yaml)")
    ds = plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": config.batch_size // accelerator.num_processes,
              "gradient_accumulation_steps": config.gradient_accumulation_steps,
              "gradient_clipping": config.max_grad_norm or 0.0}  # DeepSpeed: 0 turns clipping off
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise NloraError(f"the DeepSpeed configuration sets {key} {ds[key]}, but nlora's options give "
                             f"{value}; set it to auto (nlora fills it from batch_size, "
                             "gradient_accumulation_steps and max_grad_norm)")
        ds[key] = value


# ------------------------------------------------------------------------------------------------- FSDP2

def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class the model names as not to be split (transformers'
    `_no_split_modules`: LlamaDecoderLayer, T5Block, BertLayer, ...), outermost first."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not blocks:
        raise NloraError(f"option 'sharding': cannot find the transformer blocks of {type(model).__name__} "
                         f"(its _no_split_modules is {sorted(names) or 'empty'}); use sharding none")
    return blocks


def shard_model(model: torch.nn.Module, accelerator: Accelerator, config: RunConfig) -> torch.nn.Module:
    """With `sharding: fsdp2` and more than one process, shard the base model's parameters across the processes:
    `fully_shard` on each transformer block, then on the root. Call before any adapter is added. A no-op
    otherwise (one process holds the whole model anyway)."""
    if config.sharding != "fsdp2" or accelerator.num_processes == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    if any("lora_" in n for n, _ in model.named_parameters()):
        raise NloraError("internal: shard the base model before adding adapters")
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    setattr(model, _SHARDED, True)
    # transformers' mark of a model FSDP manages: its `generate` then keeps the processes in step until all have
    # finished (synced_gpus), so one that ends early still joins the others' gathers
    model._is_fsdp_managed_module = True
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(getattr(m, _SHARDED, False) for m in model.modules())


def prepare(accelerator: Accelerator, model, optimizer, scheduler):
    """accelerate's `prepare`, except that a sharded model is not wrapped again (DDP would replicate it)."""
    if is_sharded(model):
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return model, optimizer, scheduler
    return accelerator.prepare(model, optimizer, scheduler)


def reduce_replicated_gradients(model, params: list[torch.nn.Parameter]) -> None:
    """Under sharding, average the gradients of the whole (unsharded) trainable parameters across processes, in
    one collective; DDP does this itself otherwise. Call once per optimizer step, before clipping."""
    if is_sharded(model):
        average_gradients(params)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` across the processes, in one collective (a tensor without a gradient
    this step counts as zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def evaluation_split(model, accelerator) -> tuple[int, int]:
    """(rank, world) for splitting evaluation batches: a sharded model evaluates every batch on every process."""
    if accelerator is None or is_sharded(model):
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


@contextlib.contextmanager
def gathered_root(model):
    """Under sharding, keep the root unit's parameters (what no transformer block holds: embeddings, final norms,
    LM head) gathered for the duration. The root's forward gathers them, but generation also calls parts of the
    model outside it (a seq2seq model's encoder first, the decoder then reusing the shared embedding). A
    collective: every process enters, as every process evaluates every batch under sharding."""
    root = next((m for m in model.modules() if getattr(m, _SHARDED, False)), None)
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def shutdown() -> None:
    """Leave the process group at the end of a launched run: every process waits for the others, then the group
    is destroyed. A gloo process that exits with its group alive can abort in the group's worker threads."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
