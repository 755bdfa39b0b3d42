"""The training loop of one phase: AdamW on the current adapter, task loss + the method's regulariser, through
`accelerate` (device placement, mixed precision, data parallelism across processes).

Data order is a fixed permutation per (seed, phase, epoch), so a run resumed from a checkpoint sees exactly the
batches it would have seen. `batch_size` is the global batch: each process trains on its part of it (`shard`),
and the task loss is normalised by the term count of the whole optimizer step (all processes and accumulated
micro-batches), so 1 and N processes, and accumulation k x b versus one batch of k*b, compute the same gradient.
The loss a model returns is a mean over its own batch's terms (answer tokens for generative models, examples for
the encoder), so a process scales it by (its terms x processes / step's terms): DDP averages over processes, and
a mean over uneven token counts per process would otherwise weigh tokens unequally. The regulariser is the same
on every process and is added once per optimizer step (averaged over the accumulated micro-batches)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from ..adapters import ContinualAdapters
from ..config import RunConfig
from ..errors import NloraError
from ..faults import fault_point
from ..methods import Method, MethodContext
from ..objectives import Objective, to_device
from ..preflight import check_batch_split
from ..tasks.data import Example
from ..tracking import RunLogger, StepWindow, batch_tokens, peak_memory_mb, reset_peak_memory
from .checkpoint import Progress, save_checkpoint
from .engine import average_gradients, is_sharded, prepare, reduce_replicated_gradients
from .migu import MiguMask
from .regularization import Regularization


@dataclass
class TrainStats:
    steps: int
    mean_loss: float
    mean_regularizer: float
    seconds: float

    def to_dict(self) -> dict:
        return {"steps": self.steps, "mean_loss": self.mean_loss, "mean_regularizer": self.mean_regularizer,
                "seconds": round(self.seconds, 3)}


def epoch_order(n: int, seed: int, phase: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + phase) * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()


def shard(batch: list, rank: int, world: int) -> list:
    """This process's contiguous part of a global batch; part sizes differ by at most one (the last batch of an
    epoch may be smaller than the process count, leaving some parts empty)."""
    return batch[rank * len(batch) // world: (rank + 1) * len(batch) // world]


def trainable_state(adapters: ContinualAdapters) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in adapters.model.named_parameters() if p.requires_grad}


METHOD_PREFIX = "method."  # names of a method's own parameters in checkpoints


def checkpointed_state(adapters: ContinualAdapters, method_params: dict[str, torch.nn.Parameter]
                       ) -> dict[str, torch.Tensor]:
    """What a mid-task checkpoint holds of the model: every tensor that trains, every factor of the current adapter
    (a frozen factor a method set, e.g. A designed from data, included), and the method's own parameters."""
    current = f".{adapters.current}."
    state = {n: p for n, p in adapters.model.named_parameters() if p.requires_grad or current in n}
    state.update({METHOD_PREFIX + n: p for n, p in method_params.items()})
    return state


def _check_finite(named: dict[str, torch.nn.Parameter], phase: int, step: int, desc: str) -> None:
    """A finite loss can still come with an update that overflows the weights; catch it before they are saved."""
    bad = [n for n, p in named.items() if not torch.isfinite(p).all()]
    if bad:
        raise NloraError(f"task {phase} ({desc}): non-finite adapter weights after step {step} ({len(bad)} "
                         f"tensors, e.g. {bad[0]}); lower option 'lr' or 'lambda'. The last checkpoint is kept.")


def train_task(adapters: ContinualAdapters, objective: Objective, method: Method, examples: list[Example],
               config: RunConfig, phase: int, accelerator: Accelerator, run_dir: Path | None = None,
               resume: tuple[Progress, dict, dict] | None = None, desc: str = "train",
               progress: bool = True, logger: RunLogger | None = None,
               ctx: MethodContext | None = None) -> TrainStats:
    if ctx is None:
        ctx = MethodContext(config, adapters, objective, accelerator, [], run_dir)
    method_params = method.parameters(phase)
    named = {**trainable_state(adapters), **{METHOD_PREFIX + n: p for n, p in method_params.items()}}
    params = list(named.values())
    saved_state = checkpointed_state(adapters, method_params)
    batch_loss = method.has_hook("batch_loss")
    if not params:
        raise NloraError(f"method '{method.name}' left no trainable parameters for task {phase}")
    check_batch_split(config, accelerator.num_processes)  # run() checked it already; train_task is public
    optimizer = method.optimizer(params, config)  # AdamW unless the method chooses
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # a DeepSpeed optimizer keeps its own (partitioned) state: redo the task from its start
        resume = None
    pos = Progress(phase, 0, 0, 0, 0.0, 0.0)
    if resume is not None:
        pos, saved, state = resume
        with torch.no_grad():
            for name, p in saved_state.items():
                p.copy_(saved[name])
        if "method" in state:
            method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    model, optimizer, scheduler = prepare(accelerator, adapters.model, optimizer, scheduler)
    ctx.model = model
    model.train()
    accum = config.gradient_accumulation_steps
    rank, world = accelerator.process_index, accelerator.num_processes
    n_batches = -(-len(examples) // config.batch_size)
    bar = tqdm(total=config.epochs * n_batches, initial=pos.epoch * n_batches + pos.batch, desc=desc,
               disable=not (progress and accelerator.is_local_main_process), leave=False, dynamic_ncols=True)
    steps_per_epoch = -(-n_batches // accum)
    total_steps = config.epochs * steps_per_epoch
    if logger is not None:
        logger.train_begin(phase, pos.step, total_steps)
    # a resumed phase continues the logging window its checkpoint saved (the tokens summed over processes: once)
    window = StepWindow.restored(pos.window, tokens=accelerator.is_main_process)
    reset_peak_memory(accelerator.device)
    start = time.perf_counter()
    loss_terms = method.loss_terms(phase)
    regularization = Regularization(adapters.model, adapters.current, loss_terms)
    weight_options = _weight_options(method, loss_terms)
    swamp_checked = False  # the first logged window in which a regulariser acts is checked against the task loss
    # MIGU (nlora.train.migu): every task but the first
    migu = MiguMask(adapters, config.migu_q) if (config.grad_mask == "migu" and phase != method.phases(
        len(config.tasks))[0]) else None
    try:
        for epoch in range(pos.epoch, config.epochs):
            order = epoch_order(len(examples), config.seed, phase, epoch)
            first = pos.batch if epoch == pos.epoch else 0
            size = config.batch_size
            batches = [[examples[i] for i in order[s: s + size]] for s in range(0, len(order), size)]
            for b in range(first, n_batches):
                group_start = b // accum * accum
                group_end = min(group_start + accum, n_batches)
                boundary = b + 1 == group_end
                group_first = b == group_start or b == first
                # the regularisers once per optimizer step: their factors are the same in every micro-batch
                regularization.enabled = group_first
                if group_first:
                    ctx.step_examples = [e for batch in batches[group_start:group_end] for e in batch]
                    step_terms = objective.count_terms(objective.collate(ctx.step_examples))
                local = shard(batches[b], rank, world)
                # A process without examples (a short last batch) still runs forward and backward, weighted 0,
                # so that every process takes part in the gradient all-reduce.
                weight = 1.0 if local else 0.0
                ctx.examples = local or batches[b][:1]
                if migu is not None:
                    migu.counting = bool(local)
                batch = objective.collate(ctx.examples)
                terms = objective.count_terms(batch) * weight
                tokens = batch_tokens(batch) if local and logger is not None else 0
                batch = to_device(batch, accelerator.device)
                accelerator.sync_gradients = boundary  # DeepSpeed steps its engine inside backward at a boundary
                sync = contextlib.nullcontext() if boundary else accelerator.no_sync(model)
                with sync:
                    outputs = objective.forward(model, batch)
                    share = outputs.loss * (terms / step_terms)  # this process's part of the step's mean task loss
                    step_loss = accelerator.reduce(share.detach().float(), "sum") if world > 1 else share.detach()
                    # the method's own loss: a sum over this batch's loss items, normalised like the task loss
                    extra = method.batch_loss(phase, batch, outputs, ctx) if batch_loss else None
                    if extra is not None:
                        extra = extra * (weight / step_terms)
                        share = share + extra
                        extra = accelerator.reduce(extra.detach().float(), "sum") if world > 1 else extra.detach()
                    # the regulariser's gradient enters in backward, once per optimizer step
                    total = regularization.anchor(share * world)
                    # accelerate (or DeepSpeed) divides what backward gets by the accumulation steps
                    accelerator.backward(total * accelerator.gradient_accumulation_steps)
                    # computed inside the forward pass (reentrant checkpointing: its recomputation in backward)
                    values = regularization.collect()
                    if extra is not None:
                        values[method.name] = extra
                    reg = torch.stack(list(values.values())).sum() if values else None
                    if not (torch.isfinite(step_loss) and (reg is None or torch.isfinite(reg))):
                        raise NloraError(
                            f"task {phase} ({desc}): non-finite loss at step {pos.step} (task loss "
                            f"{step_loss.item():.4g}, regulariser {'none' if reg is None else f'{reg.item():.4g}'}); "
                            "lower option 'lr' or 'lambda'. The last checkpoint is kept.")
                loss_share, reg_share = step_loss.item(), 0.0 if reg is None else reg.item()
                pos.loss_sum += loss_share
                pos.reg_sum += reg_share
                window.add(loss_share, reg_share, tokens, len(batches[b]),
                           {name: v.item() for name, v in values.items()})
                bar.update(1)
                if not boundary:
                    continue
                reduce_replicated_gradients(model, params)  # FSDP2: the LoRA factors are whole on every process
                if method_params and world > 1 and not is_sharded(model):  # DDP averages the model's own only
                    average_gradients(list(method_params.values()))
                method.transform_gradients(phase, named, ctx)  # on whole gradients, before clipping
                if migu is not None:
                    migu.apply(world)
                logging = logger is not None and ((pos.step + 1) % config.log_steps == 0
                                                  or pos.step + 1 == total_steps)
                grad_norm = None
                if config.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                elif logging:  # the norm alone: an infinite max norm scales the gradients by exactly 1
                    grad_norm = accelerator.clip_grad_norm_(params, math.inf)
                lr = scheduler.get_last_lr()[0]  # the rate of this step, before the scheduler moves on
                try:
                    optimizer.step()
                except RuntimeError as e:
                    if "overflow" not in str(e):
                        raise
                    raise NloraError(f"task {phase} ({desc}): the optimizer step overflowed at step {pos.step} "
                                     f"({e}); lower option 'lr'. The last checkpoint is kept.") from None
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_step(phase, ctx)
                pos.step += 1
                pos.epoch, pos.batch = (epoch, b + 1) if b + 1 < n_batches else (epoch + 1, 0)
                window.end_step()
                if logging:
                    logged = _log_step(logger, accelerator, window, phase, pos.step, total_steps, steps_per_epoch,
                                       lr, grad_norm)
                    if not swamp_checked and logged["regularizer"] > 0:
                        swamp_checked = True
                        _warn_if_swamped(logger, logged, weight_options, method.name, phase, pos.step)
                bar.set_postfix(loss=f"{pos.loss_sum / pos.step:.4f}", reg=f"{pos.reg_sum / pos.step:.4g}")
                fault_point("train_step")
                if (run_dir is not None and config.checkpoint_steps and pos.step % config.checkpoint_steps == 0
                        and pos.epoch < config.epochs and not deepspeed):
                    _check_finite(named, phase, pos.step, desc)  # never replace a good checkpoint by a bad one
                    pos.window = _window_state(accelerator, window)
                    if accelerator.is_main_process:
                        save_checkpoint(run_dir, pos, saved_state, optimizer, scheduler, method.state_dict())
                    accelerator.wait_for_everyone()
    finally:
        regularization.close()
        if migu is not None:
            migu.close()
        bar.close()
        model.eval()
        accelerator.sync_gradients = True
        accelerator.free_memory()
    _check_finite(named, phase, pos.step, desc)
    steps = max(pos.step, 1)
    stats = TrainStats(pos.step, pos.loss_sum / steps, pos.reg_sum / steps, time.perf_counter() - start)
    if logger is not None:
        logger.train_end(phase, stats.to_dict())
    return stats


def _window_state(accelerator: Accelerator, window: StepWindow) -> dict:
    """The logging window for a checkpoint, its tokens summed over the processes (every process calls this)."""
    state = window.state()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(torch.tensor(state["tokens"], device=accelerator.device), "sum")
        state["tokens"] = int(total.item())
    return state


def _log_step(logger: RunLogger, accelerator: Accelerator, window: StepWindow, phase: int, step: int,
              total_steps: int, steps_per_epoch: int, lr: float, grad_norm) -> dict:
    """One line of log.jsonl (its values returned). Every process calls this at the same steps: the token count
    is summed over them."""
    tokens = window.tokens
    if accelerator.num_processes > 1:
        tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item())
    values = window.flush(tokens)
    values["lr"] = lr
    values["grad_norm"] = None if grad_norm is None else float(grad_norm)
    memory = peak_memory_mb(accelerator.device)
    if memory is not None:
        values["peak_memory_mb"] = memory
    logger.log_train(phase, step / steps_per_epoch, step, total_steps, values)
    return values


SWAMPED = 10  # a regulariser this many times the task loss leaves the task all but untrained


def _weight_options(method: Method, loss_terms: list) -> dict[str, str | None]:
    """{regulariser term: the method option that weighs it}: the term's own, else the method's one `*lambda`
    option (a method's own batch loss, a plug-in's term that names none)."""
    lambdas = [key for key in method.Options.keys() if key.endswith("lambda")]
    fallback = lambdas[0] if len(lambdas) == 1 else None
    options = {t.name: t.option or fallback for t in loss_terms}
    if method.has_hook("batch_loss"):
        options[method.name] = fallback
    return options


def _warn_if_swamped(logger: RunLogger, values: dict, options: dict[str, str | None], method: str, phase: int,
                     steps: int) -> None:
    """Once per session, from a task's first logged window in which a regulariser acts (N-LoRA's is 0 at the
    first step, B being 0): a regulariser many times the task loss means that its weight is on the wrong scale
    for this model (N-LoRA's λ depends on the penalty form and the layer sizes)."""
    loss = values["loss"]
    for term, value in values.get("regularizer_terms", {}).items():
        if loss > 0 and value > SWAMPED * loss:
            option = options.get(term)
            lower = f"lower option '{option}'" if option else f"lower the weight of '{term}'"
            logger.warn_once("swamped", f"task {phase + 1} ({logger.tasks[phase]}), logged step {steps}: "
                             f"regulariser '{term}' of method {method} is {value / loss:.0f}x the task loss "
                             f"({value:.3g} against {loss:.3g}), so the task is barely learned; {lower}")
            return
