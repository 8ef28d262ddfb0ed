"""The training loop every method runs in.

The loop knows nothing method-specific: it asks the method what it needs,
feeds it the student's (and, when asked, the teachers') outputs, and steps.
It checkpoints atomically, resumes a killed run to the same weights, and stops
on a non-finite loss naming the step, the loss terms and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.record import describe, identity_difference
from ..methods import Method, StudentOutput
from ..models import forward_with_taps, unwrap
from . import checkpoint as ckpt
from .. import distributed, precision
from .runs import MetricsLog
from .schedule import build_optimizer, build_scheduler
from .signals import on_stop_signals
from .seeding import cuda_rng_by_rank, rng_state, seed_everything, set_rng_state


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # batches done in this epoch
    step: int = 0  # optimizer steps done in total


class Trainer:
    """Trains `model` with `method` on `loader`, writing into `out_dir`."""

    def __init__(self, model: nn.Module, method: Method, loader, train: TrainConfig, out_dir: str | Path,
                 *, device: torch.device, seed: int = 0, teachers=None, val_loader=None,
                 progress=None, description: str = "train", is_main: bool = True, perturbation=None,
                 dataset: dict | None = None):
        if method.needs.teachers and teachers is None:
            raise ValueError(f"method '{getattr(method, 'name', method)}' needs teachers, and none were given")
        self.perturbation = perturbation if perturbation is not None and perturbation.kind != "none" else None
        if self.perturbation is not None and teachers is None:
            raise ValueError("input perturbations need teachers (and a method that distils from them)")
        self.model, self.method, self.loader, self.cfg = model, method, loader, train
        self.teachers = teachers
        self.world = distributed.world()
        # Under torchrun each rank validates its shard of the split, and the sums are added up.
        self.val_loader = (val_loader.shard(self.world.rank, self.world.size)
                           if val_loader is not None and self.world.distributed else val_loader)
        # A teacher cache holds E epochs of views; epoch e then trains on the views of view_epoch(e) = e % E.
        self.view_epoch = getattr(teachers, "view_epoch", None) if method.needs.teachers else None
        # Its rows then come with each batch, gathered by the loader's workers (or its thread) from the
        # batch's host indices: the step neither waits for the indices nor reads the memory maps.
        self.cache_rows = (teachers.row_source() if method.needs.teacher_logits and self.perturbation is None
                           and hasattr(teachers, "row_source") and getattr(loader, "ships_teacher_rows", False)
                           else None)
        self.device, self.seed = device, seed
        self.dataset = dataset  # data.dataset_record of the training data: saved with every checkpoint
        self.is_main = is_main and self.world.is_main  # only rank 0 logs and writes checkpoints
        self.out_dir = Path(out_dir)
        self.state_path = self.out_dir / "last.pt"
        self.log = MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.is_main)
        self.progress, self.description = (progress if self.is_main else None), description
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training set is smaller than one batch; lower data.batch_size")
        self.total_steps = train.epochs * self.steps_per_epoch
        # bf16 autocast (fp16 before Ampere) and channels_last where they pay (CUDA); fp32 on the CPU unless asked.
        self.autocast_dtype = precision.autocast_dtype(train.precision, device)
        # fp16's range underflows small gradients: its losses are scaled (bf16's and fp32's need not be)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        if device.type == "cuda":  # fixed input shapes: cuDNN's fastest kernels, chosen once per shape
            torch.backends.cudnn.benchmark = True
        self.channels_last = device.type == "cuda" if train.channels_last is None else train.channels_last
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        # A method may build parameters whose shapes depend on the models (regressors, discriminators).
        method.bind(model, teachers, next(iter(loader.batches(0))).x)
        method.to(device)
        self.forward_model = self._wrap_distributed(model)
        if train.compile:  # the step's forward compiled; the weights, checkpoints and evaluation stay the module's
            self.forward_model = torch.compile(self.forward_model)
        no_decay = getattr(unwrap(model), "no_weight_decay", lambda: ())()
        self.optimizer = build_optimizer(list(model.parameters()), train.optim, method.param_groups(), no_decay)
        self.scheduler = build_scheduler(self.optimizer, train.optim, self.total_steps, self.steps_per_epoch)
        self.pos = Position()
        self._pending: list[tuple[int, torch.Tensor, dict]] = []  # steps not yet checked for NaN
        self._saved_at: tuple[int, int, int] | None = None
        self._stop_requested = False
        # Seconds spent in fit, summed over every process of a resumed run (kept in the training state).
        self.clock = time.perf_counter
        self._time_before, self._fit_started, self._epoch_started_s = 0.0, None, 0.0

    @property
    def train_time_s(self) -> float:
        """Training seconds up to now: earlier processes' (to their last checkpoint) plus this one's."""
        return self._time_before + self._running_s()

    # ------------------------------------------------------------------ state
    def state_dict(self, cuda_by_rank: list | None = None) -> dict:
        """The training state; `cuda_by_rank`: every rank's CUDA RNG state (gathered by save())."""
        return {
            "format": ckpt.FORMAT,
            "model_spec": getattr(self.model, "spec", None),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "extra_optimizers": [o.state_dict() for o in self.method.extra_optimizers()],
            "rng": rng_state(cuda_by_rank),
            "scaler": self.scaler.state_dict(),
            "epoch": self.pos.epoch, "batch": self.pos.batch, "step": self.pos.step,
            "train_time_s": self.train_time_s, "epoch_started_s": self._epoch_started_s,
            "data": self.dataset,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for opt, s in zip(self.method.extra_optimizers(), state["extra_optimizers"]):
            opt.load_state_dict(s)
        set_rng_state(state["rng"], self.world.rank)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.pos = Position(state["epoch"], state["batch"], state["step"])
        self._time_before = state.get("train_time_s", 0.0) - self._running_s()
        self._epoch_started_s = state.get("epoch_started_s", 0.0)

    def _running_s(self) -> float:
        return self.clock() - self._fit_started if self._fit_started is not None else 0.0

    def save(self) -> None:
        self._check_finite()  # never write a checkpoint after a NaN loss ...
        where = (self.pos.epoch, self.pos.batch, self.pos.step)  # an epoch's end is a new place
        if self._saved_at != where:
            self._check_finite_state()  # ... nor one whose weights or BatchNorm statistics overflowed
            cuda_by_rank = cuda_rng_by_rank()  # every rank's own (a collective): each resumes with its own
            if self.is_main:
                ckpt.atomic_save(self.state_dict(cuda_by_rank), self.state_path)
        self._saved_at = where

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> nn.Module:
        seed_everything(self.seed)
        self._fit_started = self.clock()
        if resume and self.state_path.is_file():
            try:
                state = ckpt.load_train_state(self.state_path, map_location=self.device)
            except ckpt.CheckpointError as err:  # e.g. truncated by a full disk outside our atomic writes
                raise ckpt.CheckpointError(f"cannot resume: {err}; delete it to train this run from its start, "
                                           f"or start a new run") from None
            if self.dataset is not None and identity_difference(state.get("data"), self.dataset):
                raise ckpt.CheckpointError(f"'{self.state_path}' was trained on {describe(state['data'])} but this "
                                           f"run's data is {describe(self.dataset)}; resume it on its own data")
            self.load_state_dict(state)
            bad = self._non_finite_state()
            if bad is not None:  # written before the weights and buffers were checked
                raise ckpt.CheckpointError(f"'{self.state_path}' holds non-finite values ({bad}) and cannot be "
                                           f"resumed; start the run afresh in a new directory")
            self._saved_at = (self.pos.epoch, self.pos.batch, self.pos.step)
        # Records past the checkpoint (a killed run's) are logged again from it: drop them first.
        at = self.pos
        self.log.rewind(lambda r: r.get("epoch", 0) <= at.epoch if r.get("kind") == "epoch"
                        else r.get("step", 0) <= at.step)
        task = self._progress_task()
        with self._graceful_stop():
            while self.pos.epoch < self.cfg.epochs:
                self._train_epoch(task)
        if self.progress is not None:
            self.progress.update(task, completed=self.total_steps)
        return self.model

    def _graceful_stop(self):
        """Ctrl-C or SIGTERM finish the current step, checkpoint, then stop; a second Ctrl-C stops at once."""
        def request():
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
        return on_stop_signals(request)

    def _train_epoch(self, task) -> None:
        self.model.train()
        self.method.train()
        epoch = self.pos.epoch
        if self.pos.batch == 0:
            self._epoch_started_s = self.train_time_s
        sums: dict[str, torch.Tensor] = {}
        ran = 0  # batches run by this call (a resumed epoch starts part-way)
        view_epoch = self.view_epoch(epoch) if self.view_epoch is not None else epoch
        rows = {"rows": self.cache_rows} if self.cache_rows is not None else {}
        for batch in self.loader.batches(epoch, start=self.pos.batch, view_epoch=view_epoch, **rows):
            loss, logs = self._step(batch)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            ran += 1
            self.pos.batch += 1
            self.pos.step += 1
            self._pending.append((self.pos.step, loss, logs))
            if self.pos.step % self.cfg.log_every == 0:
                self._log_step(task, loss, logs)
            if self.cfg.checkpoint_every and self.pos.step % self.cfg.checkpoint_every == 0:
                self.save()
            if self.progress is not None:
                self.progress.update(task, advance=1)  # no loss here: reading it would sync every step
            # Under torchrun a signal reaches the ranks at different steps, or only some of them:
            # they agree at every step boundary, so all save and stop at the same step (one that
            # went on alone would wait in the next gradient all-reduce for ever).
            if distributed.any_rank(self._stop_requested):
                self._stop_requested = True
                self.save()  # at a step boundary, so resuming repeats no work
                raise KeyboardInterrupt
        self._end_epoch(epoch, sums, ran)

    def _log_step(self, task, loss: torch.Tensor, logs: dict) -> None:
        """Every log_every steps: the one place a step reads values back from the device."""
        self._check_finite()
        if self.progress is not None:
            self.progress.update(task, status=f"loss {loss.item():.3f}")
        self.log.write({"kind": "step", "step": self.pos.step, "epoch": self.pos.step / self.steps_per_epoch,
                        **self._learning_rates(), **{k: v.item() for k, v in logs.items()}})

    def _end_epoch(self, epoch: int, sums: dict[str, torch.Tensor], ran: int) -> None:
        """The epoch's record (its mean logs, read from the device once), validation, checkpoint."""
        self._check_finite()
        self._sync_buffers()
        n = max(1, ran)
        now = self.train_time_s
        record = {"kind": "epoch", "epoch": epoch + 1, "step": self.pos.step, "seconds": now - self._epoch_started_s,
                  "train_time_s": now,
                  **self._learning_rates(),
                  **{f"train_{k}": (v / n).item() for k, v in sums.items()}}
        if self.val_loader is not None:
            record.update(self._validate())
        self.pos = Position(epoch + 1, 0, self.pos.step)
        self.log.write(record)
        self.save()

    def _step(self, batch) -> tuple[torch.Tensor, dict]:
        needs = self.method.needs
        if self.channels_last and batch.x.dim() == 4:
            batch = batch._replace(x=batch.x.contiguous(memory_format=torch.channels_last))
        teacher_out = None
        if self.perturbation is not None:  # before anyone sees the batch; the cache cannot serve it
            batch = self.perturbation(batch, self.teachers, self.model, step=self.pos.step, seed=self.seed)
            needs = dataclasses.replace(needs, perturbs_inputs=True)
        if needs.teachers:
            members = self.method.teacher_indices(self.pos.step, len(self.teachers), self.seed)
            rows = getattr(batch, "teacher_rows", None)
            teacher_out = self.teachers.outputs(batch.x, needs, index=batch.index, epoch=self.pos.epoch,
                                                members=members, **({"rows": rows} if rows is not None else {}))
        with self._autocast():
            if needs.student_taps:
                logits, taps = forward_with_taps(self.forward_model, batch.x, needs.student_taps)
                student_out = StudentOutput(logits, taps)
            else:
                student_out = StudentOutput(self.forward_model(batch.x), {})
            out = self.method.loss(batch, student_out, teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        for opt in self.method.extra_optimizers():
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.world.distributed:  # DDP syncs the student; the method's own parameters sync here, in one bucket
            grads = [p.grad for p in self.method.parameters() if p.grad is not None]
            if grads:
                flat = distributed.all_reduce_mean(torch.cat([g.flatten() for g in grads]))
                for g, synced in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(synced.view_as(g))
        # an optimizer none of whose parameters got a gradient has nothing to step (and the scaler refuses it)
        optimizers = [o for o in (self.optimizer, *self.method.extra_optimizers())
                      if any(p.grad is not None for g in o.param_groups for p in g["params"])]
        if self.cfg.grad_clip:
            for opt in optimizers:
                self.scaler.unscale_(opt)  # clip the true gradients (a no-op without fp16)
            nn.utils.clip_grad_norm_([*self.model.parameters(), *self.method.parameters()], self.cfg.grad_clip)
        for opt in optimizers:
            self.scaler.step(opt)  # fp16: skipped when a gradient overflowed, as the scaler then shrinks
        self.scaler.update()
        self.scheduler.step()
        logs = {k: v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in out.logs.items()}
        logs.setdefault("loss", out.loss.detach())
        return out.loss.detach(), logs

    def _learning_rates(self) -> dict[str, float]:
        """lr: the student's; lr_<name>: each named group a method adds (e.g. a discriminator's)."""
        groups = self.optimizer.param_groups
        return {"lr": groups[0]["lr"], **{f"lr_{g['name']}": g["lr"] for g in groups if "name" in g}}

    def _check_finite(self) -> None:
        """One host sync for all steps since the last check (not one per step)."""
        if not self._pending:
            return
        finite = torch.stack([torch.isfinite(loss) for _, loss, _ in self._pending]).cpu()
        if not bool(finite.all()):
            step, loss, logs = self._pending[int((~finite).nonzero()[0])]
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in logs.items())
            raise NonFiniteLossError(
                f"{self.description}: the loss became {loss.item()} at step {step} ({terms}); "
                f"the last good checkpoint is {self._last_good()}")
        self._pending.clear()

    def _last_good(self) -> str:
        """The checkpoint this process saved or resumed from: every one is checked finite first."""
        if self._saved_at is None:
            return "none (no checkpoint yet)"
        return f"{self.state_path} (step {self._saved_at[2]})"

    def _check_finite_state(self) -> None:
        bad = self._non_finite_state()
        flag = torch.tensor(float(bad is not None), device=self.device)
        # Every rank stops, or none (a rank left waiting would hang); ranks save at the same steps,
        # a signal's stop included (they agree on it first).
        if self.world.distributed:
            torch.distributed.all_reduce(flag)
        if flag.item():
            raise NonFiniteLossError(
                f"{self.description}: by step {self.pos.step} the loss was finite but "
                f"{bad or 'another rank’s state'} was not (try a lower learning rate or grad_clip); "
                f"the last good checkpoint is {self._last_good()}")

    def _non_finite_state(self) -> str | None:
        """The first non-finite weight, buffer (BatchNorm statistics) or optimizer state, or None.
        One host sync for all tensors."""
        named = [(f"model {k}", v) for k, v in self.model.state_dict().items()]
        named += [(f"method {k}", v) for k, v in self.method.state_dict().items()]
        for i, opt in enumerate([self.optimizer, *self.method.extra_optimizers()]):
            named += [(f"optimizer {i} {k}", v) for state in opt.state.values() for k, v in state.items()]
        named = [(k, v) for k, v in named if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not named:
            return None
        # one device for the stack: some optimizer state (AdamW's step counts) stays on the CPU
        finite = torch.stack([torch.isfinite(v).all().to(self.device) for _, v in named]).cpu()
        if bool(finite.all()):
            return None
        return named[int((~finite).nonzero()[0])][0]

    def _sync_buffers(self) -> None:
        """Average BatchNorm statistics over ranks: each rank's last forward updated its own."""
        if self.world.distributed:
            for buf in list(self.model.buffers()) + list(self.method.buffers()):
                if buf.is_floating_point():
                    distributed.all_reduce_mean(buf)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _wrap_distributed(self, model: nn.Module) -> nn.Module:
        if not self.world.distributed:
            return model
        for p in self.method.parameters():  # every rank starts from rank 0's method parameters
            torch.distributed.broadcast(p.data, src=0)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @torch.no_grad()
    def _validate(self) -> dict:
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nll, correct, count: one sync at the end
        for batch in self.val_loader.batches(0):
            logits = self.model(batch.x).float()
            if batch.y.dim() == 2:  # multi-hot labels: binary NLL summed over classes; acc = hit@1
                totals[0] += F.binary_cross_entropy_with_logits(logits, batch.y.float(), reduction="sum")
                totals[1] += batch.y.gather(1, logits.argmax(1, keepdim=True)).sum()
            else:
                totals[0] += F.cross_entropy(logits, batch.y, reduction="sum")
                totals[1] += (logits.argmax(1) == batch.y).sum()
            totals[2] += len(batch.y)
        self.model.train()
        if self.world.distributed:  # each rank held its shard
            torch.distributed.all_reduce(totals)
        nll, correct = (totals[:2] / totals[2].clamp_min(1)).tolist()
        return {"val_acc": correct, "val_nll": nll}

    def _progress_task(self):
        if self.progress is None:
            return None
        return self.progress.add_task(self.description, total=self.total_steps, completed=self.pos.step, status="",
                                      images_per_step=self._images_per_step())

    def _images_per_step(self) -> int | None:
        """Every rank steps together, each on its own batch: the run's images per step."""
        batch = getattr(self.loader, "batch_size", None)
        return batch * getattr(self.loader, "world_size", 1) if batch else None
