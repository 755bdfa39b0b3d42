"""The training loop of one task: AdamW on the current adapter, task loss + the method's regulariser, through
`accelerate` (device placement, mixed precision, distributed data parallelism)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adapters import ContinualAdapters
from .config import RunConfig
from .data import Example
from .errors import NloraError
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
    return Accelerator(cpu=config.device == "cpu")


def train_task(adapters: ContinualAdapters, objective: Objective, method: Method, examples: list[Example],
               config: RunConfig, task_index: int, accelerator: Accelerator, desc: str = "train",
               progress: bool = True) -> TrainStats:
    params = adapters.trainable_parameters()
    if not params:
        raise NloraError(f"method '{method.name}' left no trainable parameters for task {task_index}")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator().manual_seed(config.seed * 1009 + task_index)
    loader = DataLoader(examples, batch_size=config.batch_size, shuffle=True, generator=generator,
                        collate_fn=objective.collate)
    model, optimizer, loader, scheduler = accelerator.prepare(adapters.model, optimizer, loader, scheduler)
    model.train()
    steps, loss_sum, reg_sum, start = 0, 0.0, 0.0, time.perf_counter()
    total = config.epochs * len(loader)
    bar = tqdm(total=total, desc=desc, disable=not (progress and accelerator.is_local_main_process),
               leave=False, dynamic_ncols=True)
    try:
        for _ in range(config.epochs):
            for batch in loader:
                loss = objective.loss(model, batch)
                reg = method.regularizer(adapters, task_index)
                total_loss = loss if reg is None else loss + reg
                if not torch.isfinite(total_loss):
                    raise NloraError(f"task {task_index} ({desc}): non-finite loss at step {steps} "
                                     f"(task loss {loss.item():.4g}, regulariser "
                                     f"{'none' if reg is None else f'{reg.item():.4g}'}); lower option 'lr' "
                                     "or 'lambda'")
                accelerator.backward(total_loss)
                if config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                loss_sum += loss.item()
                reg_sum += 0.0 if reg is None else reg.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / steps:.4f}", reg=f"{reg_sum / steps:.4g}")
    finally:
        bar.close()
        model.eval()
        accelerator.free_memory()
    return TrainStats(steps, loss_sum / max(steps, 1), reg_sum / max(steps, 1), time.perf_counter() - start)
