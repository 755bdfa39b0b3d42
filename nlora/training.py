"""The training loop of one phase: AdamW on the current adapter, task loss + the method's regulariser, through
`accelerate` (device placement, mixed precision, data parallelism across processes).

Data order is a fixed permutation per (seed, phase, epoch), so a run resumed from a checkpoint sees exactly the
batches it would have seen. `batch_size` is the global batch: accelerate splits it across processes
(split_batches), so 1 and N processes take the same optimizer steps."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adapters import ContinualAdapters
from .checkpoint import Progress, save_checkpoint
from .config import RunConfig
from .data import Example
from .errors import NloraError
from .faults import fault_point
from .methods import Method
from .objectives import Objective


@dataclass
class TrainStats:
    steps: int
    mean_loss: float
    mean_regularizer: float
    seconds: float

    def to_dict(self) -> dict:
        return {"steps": self.steps, "mean_loss": self.mean_loss, "mean_regularizer": self.mean_regularizer,
                "seconds": round(self.seconds, 3)}


def make_accelerator(config: RunConfig) -> Accelerator:
    return Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def epoch_order(n: int, seed: int, phase: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + phase) * 1009 + epoch)
    return torch.randperm(n, generator=g).tolist()


def trainable_state(adapters: ContinualAdapters) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in adapters.model.named_parameters() if p.requires_grad}


def train_task(adapters: ContinualAdapters, objective: Objective, method: Method, examples: list[Example],
               config: RunConfig, phase: int, accelerator: Accelerator, run_dir: Path | None = None,
               resume: tuple[Progress, dict, dict] | None = None, desc: str = "train",
               progress: bool = True) -> TrainStats:
    named = trainable_state(adapters)
    params = list(named.values())
    if not params:
        raise NloraError(f"method '{method.name}' left no trainable parameters for task {phase}")
    if config.batch_size % accelerator.num_processes:
        raise NloraError(f"option 'batch_size': {config.batch_size} does not split evenly across "
                         f"{accelerator.num_processes} processes")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    pos = Progress(phase, 0, 0, 0, 0.0, 0.0)
    if resume is not None:
        pos, saved, state = resume
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(saved[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    model, optimizer, scheduler = accelerator.prepare(adapters.model, optimizer, scheduler)
    model.train()
    accum = config.gradient_accumulation_steps
    n_batches = -(-len(examples) // config.batch_size)
    bar = tqdm(total=config.epochs * n_batches, initial=pos.epoch * n_batches + pos.batch, desc=desc,
               disable=not (progress and accelerator.is_local_main_process), leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for epoch in range(pos.epoch, config.epochs):
            order = epoch_order(len(examples), config.seed, phase, epoch)
            first = pos.batch if epoch == pos.epoch else 0
            subset = [examples[i] for i in order[first * config.batch_size:]]
            # Its own generator: a loader drawing its seed from the global RNG would shift dropout on resume.
            loader = accelerator.prepare_data_loader(
                DataLoader(subset, batch_size=config.batch_size, shuffle=False, collate_fn=objective.collate,
                           generator=torch.Generator().manual_seed(0)))
            for b, batch in enumerate(loader, start=first):
                group_end = min((b // accum + 1) * accum, n_batches)
                boundary = b + 1 == group_end
                in_group = group_end - (b // accum) * accum
                sync = contextlib.nullcontext() if boundary else accelerator.no_sync(model)
                with sync:
                    loss = objective.loss(model, batch)
                    reg = method.regularizer(adapters, phase)
                    total = loss if reg is None else loss + reg
                    if not torch.isfinite(total):
                        raise NloraError(
                            f"task {phase} ({desc}): non-finite loss at step {pos.step} (task loss "
                            f"{loss.item():.4g}, regulariser {'none' if reg is None else f'{reg.item():.4g}'}); "
                            "lower option 'lr' or 'lambda'. The last checkpoint is kept.")
                    accelerator.backward(total / in_group)
                pos.loss_sum += loss.item() / in_group
                pos.reg_sum += 0.0 if reg is None else reg.item() / in_group
                bar.update(1)
                if not boundary:
                    continue
                if config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pos.step += 1
                pos.epoch, pos.batch = (epoch, b + 1) if b + 1 < n_batches else (epoch + 1, 0)
                bar.set_postfix(loss=f"{pos.loss_sum / pos.step:.4f}", reg=f"{pos.reg_sum / pos.step:.4g}")
                fault_point("train_step")
                if (run_dir is not None and config.checkpoint_steps and pos.step % config.checkpoint_steps == 0
                        and pos.epoch < config.epochs):
                    if accelerator.is_main_process:
                        save_checkpoint(run_dir, pos, named, optimizer, scheduler)
                    accelerator.wait_for_everyone()
    finally:
        bar.close()
        model.eval()
        accelerator.free_memory()
    steps = max(pos.step, 1)
    return TrainStats(pos.step, pos.loss_sum / steps, pos.reg_sum / steps, time.perf_counter() - start)
