"""The training loop: AdamW with warmup and cosine decay, gradient accumulation and clipping, an
evaluation each epoch with early stopping, checkpoints that make any interruption resumable, and data
parallelism over processes (gloo on CPU, the same code on GPUs).

Speed comes from doing only the work that teaches something: batches are length-bucketed and carry no
attention mask (right padding under a causal mask is exact), a prefix every row of a batch shares is
computed once, and the output layer, a 49k-way softmax on small models, runs only on the positions
that are trained on instead of on every token.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tertulia.errors import TertuliaError
from tertulia.train.batches import IGNORE, Batch, BatchPlan, TokenizedExample, collate, for_rank, plan

T = TypeVar("T")
CHECKPOINT_VERSION = 2  # 2: plain containers only, read with weights_only=True


class AssistantLoss(nn.Module):
    """Summed next-token loss and correct guesses over the trained positions of a batch."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.lm = causal_lm

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        if prefix is None:
            hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state
        else:
            # The shared prefix once; its keys and values (still in the graph) repeated for every row.
            from transformers import DynamicCache

            cache = DynamicCache()
            base.model(input_ids=prefix[None], use_cache=True, **{self._cache_argument(base): cache})
            rows, length = input_ids.shape
            cache.batch_repeat_interleave(rows)
            positions = torch.arange(len(prefix), len(prefix) + length, device=input_ids.device)
            positions = positions.expand(rows, length)
            hidden = base.model(
                input_ids=input_ids,
                use_cache=True,
                position_ids=positions,
                **{self._cache_argument(base): cache},
            ).last_hidden_state
        trained = targets != IGNORE
        logits = base.lm_head(hidden[trained]).float()
        wanted = targets[trained]
        nll = F.cross_entropy(logits, wanted, reduction="sum")
        return nll, (logits.argmax(-1) == wanted).sum()

    def _cache_argument(self, base: nn.Module) -> str:
        """transformers 5.24 renamed `past_key_values` to `cache`; both spellings are in use."""
        if not hasattr(self, "_cache_name"):
            parameters = inspect.signature(type(base.model).forward).parameters
            self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        return self._cache_name


@dataclass
class Schedule:
    epochs: int
    lr: float
    batch_tokens: int
    grad_accum: int
    warmup: float  # share of all steps
    weight_decay: float
    max_grad_norm: float
    patience: int  # epochs without a better validation loss before stopping
    seed: int
    save_every: float  # seconds between mid-epoch checkpoints
    max_steps: int | None = None  # stop here, mid-epoch if need be (pretraining's token budget)
    eval_every: int = 0  # also evaluate every this many steps (0: only at the end of each epoch)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's; pretraining from scratch takes (0.9, 0.95)


@dataclass
class StepReport:
    epoch: int
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_second: float


@dataclass
class History:
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (global step, loss)
    epochs: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)  # the periodic ones, mid-epoch
    tokens: int = 0  # real tokens trained on, all processes
    seconds: float = 0.0


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: training stopped after a whole step and its state was saved."""


@dataclass
class Distributed:
    """Which process this is; on GPU machines each process drives its own GPU (NCCL), else gloo."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


class Loop:
    def __init__(
        self,
        model: nn.Module,
        train: list[TokenizedExample],
        validation: list[TokenizedExample],
        schedule: Schedule,
        pad_id: int,
        checkpoint: Path,
        parallel: Distributed,
        on_step: Callable[[StepReport], None] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        on_eval: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.loss = AssistantLoss(model)
        self.train, self.validation, self.schedule = train, validation, schedule
        self.pad_id, self.checkpoint, self.parallel = pad_id, checkpoint, parallel
        self.on_step, self.on_epoch, self.on_eval = on_step, on_epoch, on_eval
        self.parameters = [p for p in self.loss.parameters() if p.requires_grad]
        self.wrapped: nn.Module = self.loss
        if parallel.world > 1:
            gpu = [parallel.device.index] if parallel.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.loss, device_ids=gpu)
        decay = [p for p in self.parameters if p.ndim >= 2]
        no_decay = [p for p in self.parameters if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": schedule.weight_decay},
                {"params": no_decay, "weight_decay": 0},
            ],
            lr=schedule.lr,
            betas=schedule.betas,
        )
        self.plan = _truncated(
            [
                self._steps(
                    for_rank(
                        plan(train, schedule.batch_tokens, self._rng(epoch)), parallel.rank, parallel.world
                    )
                )
                for epoch in range(schedule.epochs)
            ],
            schedule.max_steps,
        )
        self.total_steps = sum(len(p) for p in self.plan)
        self.warmup_steps = max(1, round(schedule.warmup * self.total_steps)) if schedule.warmup > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(self.warmup_steps, self.total_steps)
        )
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.history = History()
        self.best_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self.stopped_early = False
        self._stop_requested = False

    def _rng(self, epoch: int) -> random.Random:
        return random.Random(self.schedule.seed * 1_000_003 + epoch)

    def _steps(self, batches: list[BatchPlan]) -> list[list[BatchPlan]]:
        accum = self.schedule.grad_accum
        return [batches[i : i + accum] for i in range(0, len(batches), accum)]

    def retarget(self, total_steps: int) -> None:
        """End sooner than planned (a run found slower than it was timed): the plan is cut at
        `total_steps` and the learning rate's decay re-aimed to reach zero there."""
        total_steps = max(self.global_step + 1, min(total_steps, self.total_steps))
        self.plan = _truncated(self.plan, total_steps)
        self.total_steps = total_steps
        decay = _warmup_cosine(min(self.warmup_steps, total_steps), total_steps)
        self.scheduler.lr_lambdas = [decay] * len(self.scheduler.lr_lambdas)

    # --- running ---------------------------------------------------------------------------------
    def run(self) -> History:
        """Train to the end (or an early stop); raises Interrupted after saving on Ctrl-C/SIGTERM."""
        with self._interrupts():
            while self.epoch < len(self.plan) and not self.stopped_early:
                self._train_epoch()
                self._end_epoch()
        if self.best_state is not None:
            self._load_trainable(self.best_state)
        return self.history

    def _train_epoch(self) -> None:
        self.loss.train()
        last_save = time.monotonic()
        while self.step_in_epoch < len(self.plan[self.epoch]):  # read each step: `retarget` may cut it
            steps = self.plan[self.epoch]
            started = time.perf_counter()
            batches = [
                collate([self.train[i] for i in indices], self.pad_id, shared)
                for shared, indices in steps[self.step_in_epoch]
            ]
            loss, tokens = self._step(batches)
            seconds = time.perf_counter() - started
            self.step_in_epoch += 1
            self.global_step += 1
            self.history.train_loss.append((self.global_step, loss))
            self.history.tokens += int(tokens)
            self.history.seconds += seconds
            if self.on_step:
                self.on_step(
                    StepReport(
                        self.epoch + 1,
                        self.global_step,
                        self.total_steps,
                        loss,
                        self.scheduler.get_last_lr()[0],
                        tokens / seconds if seconds else 0.0,
                    )
                )
            if self.schedule.eval_every and self.global_step % self.schedule.eval_every == 0:
                self._periodic_eval()
            if self._stop_agreed():
                self.save()
                # No process leaves before the save is done: torchrun would kill the others mid-write.
                self.parallel.barrier()
                raise Interrupted
            if time.monotonic() - last_save > self.schedule.save_every:
                self.save()
                last_save = time.monotonic()

    def _step(self, batches: list[Batch]) -> tuple[float, float]:
        targets, tokens = self.parallel.sum(
            sum(b.target_count for b in batches), sum(b.tokens for b in batches)
        )
        scale = self.parallel.world / max(targets, 1)  # DDP averages gradients over processes
        total_nll = 0.0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.parallel.world == 1 else self.wrapped.no_sync()
            with sync:
                nll, _ = self.wrapped(*batch.to(self.parallel.device))
                (nll * scale).backward()
            total_nll += float(nll.detach())
        torch.nn.utils.clip_grad_norm_(self.parameters, self.schedule.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (total_nll,) = self.parallel.sum(total_nll)
        return total_nll / max(targets, 1), tokens

    @torch.inference_mode()
    def evaluate(self) -> tuple[float, float]:
        """Validation loss and mean token accuracy over the trained positions, all processes."""
        self.loss.eval()
        # A plain stride, not for_rank: evaluation takes no step, so shares may differ and none repeats.
        batches = plan(self.validation, self.schedule.batch_tokens, self._rng(-1))
        nll = correct = count = 0.0
        for shared, indices in batches[self.parallel.rank :: self.parallel.world]:
            batch = collate([self.validation[i] for i in indices], self.pad_id, shared)
            batch_nll, batch_correct = self.loss(*batch.to(self.parallel.device))
            nll, correct, count = (
                nll + float(batch_nll),
                correct + float(batch_correct),
                count + batch.target_count,
            )
        nll, correct, count = self.parallel.sum(nll, correct, count)
        self.loss.train()
        return nll / max(count, 1), correct / max(count, 1)

    def _periodic_eval(self) -> None:
        if not self.validation or self.step_in_epoch == len(self.plan[self.epoch]):
            return  # nothing to evaluate on, or the end of the epoch evaluates anyway
        val_loss, accuracy = self.evaluate()
        record = {"step": self.global_step, "val_loss": val_loss, "val_accuracy": accuracy}
        self.history.evals.append(record)
        if self.on_eval:
            self.on_eval(record)

    def _end_epoch(self) -> None:
        record: dict[str, float] = {"epoch": self.epoch + 1, "step": self.global_step}
        epoch_losses = [
            loss
            for step, loss in self.history.train_loss
            if step > self.global_step - len(self.plan[self.epoch])
        ]
        record["train_loss"] = sum(epoch_losses) / max(len(epoch_losses), 1)
        if self.validation:
            val_loss, accuracy = self.evaluate()
            record["val_loss"], record["val_accuracy"] = val_loss, accuracy
            if val_loss < self.best_loss - 1e-4:
                self.best_loss, self.bad_epochs = val_loss, 0
                self.best_state = self._trainable()
                record["best"] = 1
            else:
                self.bad_epochs += 1
                self.stopped_early = self.bad_epochs >= self.schedule.patience
        self.history.epochs.append(record)
        self.epoch += 1
        self.step_in_epoch = 0
        if self.on_epoch:
            self.on_epoch(record)
        self.save()

    # --- interruption --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _interrupts(self) -> Iterator[None]:
        """The first Ctrl-C (or SIGTERM) asks to stop after the current step; a second one stops now."""

        def request(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        try:
            previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no handlers, nothing to restore
            yield
            return
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def request_stop(self) -> None:
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        # Every process must stop at the same step, or the others would wait forever in all_reduce.
        return self.parallel.sum(float(self._stop_requested))[0] > 0

    # --- checkpoints ---------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.loss.named_parameters() if p.requires_grad}

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.loss.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def save(self) -> None:
        """Everything needed to continue exactly here, written atomically (a kill leaves the last one)."""
        if not self.parallel.main:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "trainable": self._trainable(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": asdict(self.history),
            "best_loss": self.best_loss,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "rng": torch.get_rng_state(),  # LoRA dropout's draws continue where they were
        }
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint.with_name(self.checkpoint.name + ".partial")
        torch.save(state, partial)
        partial.replace(self.checkpoint)

    def restore(self) -> None:
        unreadable = TertuliaError(
            f"The checkpoint {self.checkpoint} is unreadable or from another version of Tertulia.",
            "Start the run again without --resume (and with --force).",
        )
        try:
            # weights_only: a checkpoint is data; a file placed in --out must not be able to run code.
            state = torch.load(self.checkpoint, weights_only=True, map_location=self.parallel.device)
        except Exception:
            raise unreadable from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise unreadable
        self._load_trainable(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.history = state["global_step"], History(**state["history"])
        self.best_loss, self.best_state = state["best_loss"], state["best_state"]
        self.bad_epochs, self.stopped_early = state["bad_epochs"], state["stopped_early"]
        torch.set_rng_state(state["rng"].cpu())


def _truncated(epochs: list[list[T]], max_steps: int | None) -> list[list[T]]:
    """The epochs' steps cut after `max_steps` in all (empty epochs dropped)."""
    if max_steps is None:
        return epochs
    kept, left = [], max_steps
    for steps in epochs:
        if left <= 0:
            break
        kept.append(steps[:left])
        left -= len(kept[-1])
    return kept


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
