"""Train a sweep of sparse autoencoders in one pass over a store, evaluate them, write `sweep.h5`.

A sweep is every combination of dictionary sizes × sparsity settings × seeds (sweep_config.py). All
members train concurrently on the same batches: the store's train split is read once for the whole
sweep. Members of one size are stacked into batched weights (sae.py); stacking does not change any
member's arithmetic, so a member trained in a sweep equals the same member trained alone.

`Sweep(store, config, out)` is ready to train once constructed: the input scale and initial bias are
taken from a fixed sample of training rows (normalised units: E‖x‖² = 1 on the sample), the stacks
and one Adam are built, and a checkpoint is restored when resuming. `Sweep.run()` then
1. steps over the shuffled train stream (the host waits for the device only at logging intervals,
   where losses are averaged, checked for NaN/Inf and logged; test-loss curve points at a few steps;
   checkpoints every `checkpoint_every` steps and at the end, written atomically, carrying the step);
2. evaluates every member on the whole test split and on a train sample of the same size (evaluate.py);
3. compares members (signals.py) and writes the results file atomically, then removes the checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import math
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Collection

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import cpu_has_native_bf16, resolve_device
from .errors import SparsefeatError
from .evaluate import StackEvaluation, evaluate_stacks, take_rows
from .files import OutputError, WriterLock, atomic_path, check_free_space, check_output, human_bytes
from .memory import STACK_ELEMENTS, MemoryEstimate, available_memory, check_memory, memory_estimate
from .results import Member, MemberArrays, Results, ResultsError, write_results
from .sae import SAE, architecture, pre_bias
from .signals import SignalThresholds, cross_member_signals
from .store import ActivationStore, to_json
from .sweep_config import DEFAULT_STEPS, MemberSpec, SweepConfig, parse_size  # noqa: F401 (re-exported)

CHECKPOINT_VERSION = 4  # 4: one Adam parameter group per stack (cool-down); 3: stop state (steps=auto) and
                        # firing counters; 2: curves are float64 tensors
STOP_FIXED, STOP_CONVERGED, STOP_MAX = "fixed", "converged", "max_steps"  # why a size stopped training
# settings a resumed run may change (device_cache: the resumed run keeps the stream its checkpoint used)
RESUMABLE_CHANGES = ("device", "compile", "prefetch", "device_cache")
DEVICE_CACHE_SHARE = 0.5  # device_cache=auto: the train split may take this share of the device memory the sweep leaves
RESAMPLE_ROWS = 8192  # training rows whose reconstruction errors choose where dead latents restart


class TrainingError(SparsefeatError):
    """Training cannot start or cannot go on (bad settings, a diverged member)."""


def check_sweep_output(out, store_path, *, resume: bool, force: bool) -> Path:
    """The results path of a sweep, refused before any work: never the store itself (even with --force),
    and an existing file only with --force (a finished sweep has nothing to resume)."""
    out = check_output(out, force=True, inputs=[store_path])
    if out.exists() and not force:
        hint = "the sweep is already complete; nothing to resume (use --force to train again)" if resume else \
            "already exists; pass --force to overwrite it"
        raise ResultsError(f"{out}: {hint}")
    return out


def train_sweep(store_path: str | os.PathLike, config: SweepConfig, out: str | os.PathLike, *,
                resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Train every member of `config` on the store, evaluate, and write the results file `out`.

    `resume=True` continues from `<out>.ckpt` when it exists (same config and store, else a one-line
    error) and starts from scratch when it does not; `force=True` replaces an existing results file
    (and discards an old checkpoint unless resuming)."""
    out = check_sweep_output(out, store_path, resume=resume, force=force)
    with WriterLock(out, what="results file"):  # one sweep per results file (and its checkpoint)
        remove_stale_temporaries(out)
        with ActivationStore(store_path) as store:
            sweep = Sweep(store, config, out, resume=resume, force=force, progress=progress)
            return sweep.run()


def checkpoint_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".ckpt")


def remove_stale_temporaries(out: Path) -> None:
    """Delete the half-written temporaries a killed run left beside its results and checkpoint (they
    are never read: the checkpoint and results are complete files or absent)."""
    for target in (out, checkpoint_path(out)):
        for stale in [*target.parent.glob(f".{glob.escape(target.name)}.tmp-*"), Path(str(target) + ".tmp")]:
            stale.unlink(missing_ok=True)


def learning_rate(step: int, total: int, lr: float, schedule: str, warmup: int) -> float:
    """The learning rate of (0-based) `step`: linear warm-up over `warmup` steps, then constant or a
    linear/cosine decay reaching 0 after the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def store_fingerprint(store: ActivationStore, site: str) -> str:
    """A cheap hash that changes when the store's content changes: its header, split mask and up to 16
    evenly spaced chunks of the site's activations (sha256, first 16 hex digits)."""
    h = hashlib.sha256()
    attrs = store.attrs
    h.update(to_json({k: attrs.get(k) for k in ("format", "format_version", "created", "kind", "provenance",
                                                 "split_unit", "test_fraction", "split_seed")}).encode())
    h.update(np.packbits(store.split_mask("test")).tobytes())
    ds = store.f["activations"][site]
    h.update(f"{ds.shape}{ds.dtype}{store.committed}".encode())
    rows = ds.chunks[0] if ds.chunks else 4096
    n_blocks = math.ceil(store.committed / rows)
    for i in sorted({round(j * (n_blocks - 1) / 15) for j in range(16)} if n_blocks else []):
        h.update(np.ascontiguousarray(ds[i * rows:min((i + 1) * rows, store.committed)]).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


class Sweep:
    """One run of a sweep over one store, ready to train once constructed; `run()` does the rest."""

    latent_shards = 1  # processes that each hold a slice of every dictionary (distributed.LatentShardSweep)

    def __init__(self, store: ActivationStore, config: SweepConfig, out: str | os.PathLike, *,
                 resume: bool = False, force: bool = False, progress: bool = True,
                 members: Collection[str] | None = None, checkpoint: str | os.PathLike | None = None):
        self.store, self.config, self.out, self.progress = store, config, Path(out), progress
        self.ckpt = checkpoint_path(self.out) if checkpoint is None else Path(checkpoint)
        self._check_store()
        self.site = store.default_site() if config.site is None else config.site
        self.d = store.width(self.site)  # raises a one-line StoreError for an unknown site
        self.n_train, self.n_test = store.n_rows("train"), store.n_rows("test")
        self._check_splits()
        try:
            self.specs = config.members(self.d)
        except ValueError as e:
            raise TrainingError(f"{store.path}: {e}") from None
        # `members` (distributed.py): this process trains only these members (a rank's share); `specs`
        # stays the whole sweep, which names the run and the results file.
        self.trained = self.specs if members is None else [s for s in self.specs if s.id in set(members)]
        self.batches_per_epoch = self.n_train // config.batch_size
        self.auto = config.auto_steps
        self.total_steps = (config.max_steps if self.auto else config.steps if config.steps is not None else
                            max(1, math.ceil(config.epochs * self.batches_per_epoch)) if config.epochs is not None
                            else DEFAULT_STEPS)
        # steps=auto: a size that stops at step s trains on to s + cooldown with a learning rate falling to 0
        self.cooldown = int(config.cooldown_steps) if self.auto else 0
        self.end_step = self.total_steps + self.cooldown
        self.device = resolve_device(config.device)
        if config.bf16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            print(f"warning: {self.out}: --bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): its "
                  "matmuls are emulated, slower than float32", file=sys.stderr)
        self.label = config.label or f"{Path(store.path).stem}:{self.site}"
        self.memory: MemoryEstimate = memory_estimate(self.trained, self.d, config.batch_size, self.n_test,
                                                      config.sample_rows, latent_shards=self.latent_shards)
        check_memory(self.memory, self.device, self.out)  # before anything large is allocated
        self.store_hash = store_fingerprint(store, self.site)
        state = self._checkpoint_to_resume(resume, force)

        self.step = 0
        self.checkpoint_step: int | None = None  # step of the checkpoint on disk that this run wrote or resumed
        self.curves = {s.id: {"train": [], "test": []} for s in self.specs}
        self.stopped: dict[int, tuple[int, str]] = {}  # size -> (step it stopped at, why); its cool-down follows
        self.resampled: list[list[int]] = []  # [step, stack, member, latents re-initialised] per resampling
        if state is None:
            self.scale, self.bias = self._sample_statistics()
        else:
            self.scale, self.bias = float(state["scale"]), state["bias"]
        self.stacks, self.stack_specs = self._build_stacks()
        self.optimizer = _adam([{"params": list(st.parameters())} for st in self.stacks], config.lr)  # a group a stack
        if state is not None:
            self._restore(state)
        self.resample_steps = set(config.resample_steps)
        self.curve_steps = set() if self.auto else {round(self.total_steps * (i + 1) / config.test_curve_points)
                                                     for i in range(config.test_curve_points)}
        self.curve_batches = list(take_rows(  # the first test rows, in store order, for every curve point
            store.batches(self.site, "test", config.batch_size, shuffle=False, epochs=1, device=self.device),
            config.test_curve_rows))
        self._step_fns = [torch.compile(st.training_loss) if config.compile else st.training_loss
                          for st in self.stacks]
        self.device_cache = self._device_cache_choice(state)
        self.cached_rows: torch.Tensor | None = None  # the train split on the device, loaded by _stream
        self.stream = self._stream()  # the training batches from the current step on

    def startup_line(self) -> str:
        sizes = ", ".join(str(m) for m in sorted({s.size for s in self.specs}))
        cooldown = f" + a cool-down of {self.cooldown}" if self.cooldown else ""
        steps = (f"steps until converged ({self.config.min_steps}..{self.total_steps}){cooldown}" if self.auto
                 else f"{self.total_steps} steps")
        return (f"sweep {self.label}: {len(self.specs)} members (sizes {sizes}), {steps} on "
                f"{self.device}; memory {self.memory.describe()}")

    # -- the run, top to bottom ---------------------------------------------------------------------

    def run(self) -> Path:
        """Train to the last step, evaluate every member, write the results file; returns its path."""
        if self.progress:
            print(self.startup_line(), file=sys.stderr)
        self.train()
        evaluations = self.evaluate()
        path = self.write_results(evaluations)
        self.ckpt.unlink(missing_ok=True)  # the results hold everything the checkpoint did
        return path

    @property
    def finished(self) -> bool:
        """Every size has stopped (steps=auto: converged or at max_steps; fixed: at the last step)."""
        # only the sizes this process trains: under torchrun a rank with its own members stops when they have
        if self.step >= self.end_step:
            return True
        sizes = {s.size for s in self.trained}
        return len(self.stopped) == len(sizes) and all(self.step >= step + self.cooldown
                                                       for step, _ in self.stopped.values())

    def active(self, i: int) -> bool:
        """Whether stack i still trains (its size has not stopped, or is in its cool-down)."""
        stop = self.stopped.get(self.stack_specs[i][0].size)
        return stop is None or self.step < stop[0] + self.cooldown

    def lr_factor(self, i: int) -> float:
        """Stack i's share of the learning rate: 1, then from its stop a linear fall to 0 over the cool-down."""
        stop = self.stopped.get(self.stack_specs[i][0].size)
        if stop is None or not self.cooldown:
            return 1.0
        return max(0.0, 1.0 - (self.step - stop[0]) / self.cooldown)

    def train(self, until: int | None = None) -> None:
        """Train up to step `until` (default: the end), logging at every `log_every` steps and at `until`.
        With steps=auto a size stops at a held-out check once converged; training ends when all have."""
        cfg = self.config
        until = self.end_step if until is None else min(until, self.end_step)
        pending = []  # per step since the last log: each stack's per-member losses, still on the device
        bar = tqdm(total=self.end_step, initial=self.step, disable=not self.progress, desc=f"sweep {self.label}",
                   unit="step", dynamic_ncols=True)
        try:
            while self.step < until and not self.finished:
                pending.append(self.step_on(next(self.stream)))
                if self.step in self.resample_steps:
                    self.resample_dead_latents()
                if self.step in self.curve_steps or (self.auto and self.step % cfg.converge_every == 0):
                    self._test_curve_point()
                    if self.auto:
                        self._stop_converged_sizes()
                if self.step == self.total_steps:
                    self._stop_remaining(STOP_MAX if self.auto else STOP_FIXED)
                checkpoint_now = cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.finished)
                if self.step % cfg.log_every == 0 or self.step == until or checkpoint_now or self.finished:
                    self._log(pending, bar)
                    pending = []
                if checkpoint_now:  # the last one spares the training when the final write is killed
                    self.save_checkpoint()
        finally:
            bar.close()

    def _stop_converged_sizes(self) -> None:
        """At a held-out check (steps=auto): stop every size all of whose members have converged.

        Members of one size stop together, so every member of a size trains the same steps and seeds
        stay comparable; a member that converged first trains on with the others (the cost is measured
        in the report of issue 10: a few percent of member-steps on the toys)."""
        for size in sorted({s.size for s in self.trained} - set(self.stopped)):
            members = [s for s in self.trained if s.size == size]
            if all(self._member_converged(s, self.step) for s in members):
                self.stopped[size] = (self.step, STOP_CONVERGED)

    @torch.no_grad()
    def resample_dead_latents(self) -> None:
        """Re-initialise the latents of every training member that did not fire in the last
        `resample_window` steps (Anthropic 2023, "Towards monosemanticity", update of early 2023): each
        restarts at a training row drawn with probability ∝ its squared error² under the member (rows the
        dictionary reconstructs worst), minus the decoder bias, as a unit decoder row; encoder row = that
        direction × 0.2 × the mean norm of the member's alive encoder rows; encoder bias 0; the latent's
        Adam moments are zeroed. The rows and draws depend only on the step and the member's seed."""
        cfg = self.config
        n = min(RESAMPLE_ROWS, self.n_train)
        stream = self.store.batches(self.site, "train", batch_size=n, seed=cfg.data_seed + 15485863 + self.step,
                                    epochs=1)
        x = next(iter(stream)).to(self.device) * self.scale
        for i, (st, specs) in enumerate(zip(self.stacks, self.stack_specs)):
            if not self.active(i):
                continue
            dead = st.last_fired <= self.step - cfg.resample_window  # [G, m]
            if not dead.any():
                continue
            x_hat, _ = st(x)
            weight = (x_hat.float() - x).pow(2).sum(-1).pow(2).double().cpu()  # [G, n]: squared error, squared
            for g, spec in enumerate(specs):
                latents = torch.nonzero(dead[g]).flatten()
                if len(latents) == 0:
                    continue
                gen = torch.Generator().manual_seed(int(spec.seed) * 1_000_003 + self.step)
                rows = torch.multinomial(weight[g] + 1e-30, len(latents), replacement=len(latents) > n, generator=gen)
                alive = ~dead[g]
                norm = float(st.encoder[g][alive].norm(dim=1).mean()) if alive.any() else 1.0
                st.reinitialise(g, latents, x[rows.to(self.device)] - st.decoder_bias[g], 0.2 * norm)
                for p in (st.encoder, st.encoder_bias, st.decoder):
                    for moment in ("exp_avg", "exp_avg_sq"):
                        if moment in self.optimizer.state.get(p, {}):
                            self.optimizer.state[p][moment][g, latents] = 0.0
                self.resampled.append([int(self.step), i, g, len(latents)])

    def _stop_remaining(self, reason: str) -> None:
        for size in {s.size for s in self.trained} - set(self.stopped):
            self.stopped[size] = (self.step, reason)

    def stop_record(self, spec: MemberSpec) -> dict:
        """How member `spec` stopped: steps trained, whether it converged (None: fixed steps, not checked).

        Convergence is the member's own: a size stops at max_steps when any of its members (often the
        weakest sparsity setting, whose loss falls longest) is still improving, and a sibling whose held-out
        curve had met the rule by then has converged all the same (it only trained longer)."""
        step, reason = self.stopped.get(spec.size, (self.step, STOP_FIXED))
        converged = None if reason == STOP_FIXED else reason == STOP_CONVERGED or self._member_converged(spec, step)
        # judged where it stopped (the cool-down lowers the loss once more); trained to the cool-down's end
        trained = min(step + self.cooldown, self.step) if reason != STOP_FIXED else step
        return dict(steps_trained=int(trained), stop_reason=reason, converged=converged)

    def _member_converged(self, spec: MemberSpec, step: int) -> bool:
        """Whether member `spec`'s held-out curve meets the convergence rule at `step` (steps=auto)."""
        cfg = self.config
        resampled = [s for s in self.resample_steps if s <= step]
        if step < cfg.min_steps or (resampled and step < max(resampled) + cfg.converge_window):
            return False  # a resampling step disturbs the loss: judge only a whole window after the last one
        return held_out_converged(self.curves[spec.id]["test"], step, cfg.converge_window, cfg.converge_tolerance)

    def last_fired(self) -> dict[str, np.ndarray]:
        """Per member id: [m] the training step on which each latent last fired (0: never)."""
        return {spec.id: st.last_fired[g].cpu().numpy().astype(np.int64)
                for st, specs in zip(self.stacks, self.stack_specs) for g, spec in enumerate(specs)}

    def step_on(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """One optimiser step of every member on a batch of raw rows [B, d] (scaled here); returns each
        stack's per-member objective, on the device (nothing here waits for the device).

        `train` feeds it the store's stream; callers with their own batches may call it directly
        (the peers benchmark does).
        """
        cfg = self.config
        x = batch.to(self.device, non_blocking=True)
        if self.scale != 1.0:
            x = x * self.scale
        if cfg.lr_schedule != "constant" or self.step < cfg.warmup_steps or (self.cooldown and self.stopped):
            lr = learning_rate(self.step, self.total_steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
            for i, group in enumerate(self.optimizer.param_groups):
                group["lr"] = lr * self.lr_factor(i)
        losses = []
        for i, (st, fn) in enumerate(zip(self.stacks, self._step_fns)):
            if self.stopped and not self.active(i):  # a stopped size: no gradient, so Adam leaves it as it is
                losses.append(None)
                continue
            with self._autocast():
                loss, per_member = fn(x)
            loss.backward()
            st.after_backward()
            losses.append(per_member)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for i, st in enumerate(self.stacks):
            if losses[i] is not None:
                st.after_step()
        self.step += 1
        return losses

    def evaluate(self) -> dict[str, dict[str, dict]]:
        """Per member id and split: metrics, row_sse and firing frequency."""
        return self._evaluate_members(self.stacks, self.stack_specs)

    def _evaluate_members(self, stacks: list[SAE], stack_specs: list[list[MemberSpec]]) -> dict[str, dict[str, dict]]:
        evals: dict[str, dict] = {spec.id: {} for specs in stack_specs for spec in specs}
        for split in ("train", "test"):
            for specs, e in zip(stack_specs, self._evaluate(self._eval_stream(split), stacks)):
                for g, spec in enumerate(specs):
                    values = {k: float(v[g]) for k, v in e.metrics.items()}
                    evals[spec.id][split] = dict(metrics=dict(values, rows=int(e.rows)), row_sse=e.row_sse[g],
                                                 frequency=e.frequency[g])
        return evals

    def copy_smaller_where_worse(self, evals: dict, weights: dict, training: dict, last_fired: dict) -> list[str]:
        """Give every member whose training objective (on the evaluated train rows) ends above a smaller
        member's of its seed and setting the best such member's dictionary, its extra latents switched off
        (encoder rows 0, bias -1: they never fire, so codes, x̂ and penalty are the smaller member's), and
        evaluate it again. Updates the four per-member tables in place; returns the ids changed.

        A larger dictionary can copy a smaller one, so ending above it is a failure of training from
        scratch (an unlucky start, or a setting at which large dictionaries lose their latents); the copy is
        the best dictionary of that size training found. Its training record keeps how it stopped, and
        gains `copied_from` and `objective_from_scratch`. Done on the whole sweep's tables where the
        results file is written, so torchrun sweeps copy as a single process does."""
        copies = []
        runs: dict[tuple, list[MemberSpec]] = {}
        for spec in self.specs:
            runs.setdefault((spec.sparsity, spec.seed), []).append(spec)
        for specs in runs.values():
            best, best_loss = None, math.inf
            for spec in sorted(specs, key=lambda s: s.size):
                loss = evals[spec.id]["train"]["metrics"]["loss"]
                if best is not None and loss > best_loss:
                    copies.append((spec, best, loss))
                elif loss < best_loss:
                    best, best_loss = spec, loss
        if not copies:
            return []
        stacks = []
        for spec, source, _ in copies:
            weights[spec.id] = padded_weights(weights[source.id], weights[spec.id])
            last_fired[spec.id] = np.concatenate([last_fired[source.id],
                                                  np.zeros(spec.size - source.size, dtype=np.int64)])
            stacks.append(self._member_stack(spec, weights[spec.id]))
        evals.update(self._evaluate_members(stacks, [[spec] for spec, _, _ in copies]))
        for spec, source, loss in copies:
            training[spec.id] = dict(training[spec.id], copied_from=source.size, objective_from_scratch=float(loss),
                                     **dead_latents(evals[spec.id]["test"]["frequency"], last_fired[spec.id]))
        return [spec.id for spec, _, _ in copies]

    def _member_stack(self, spec: MemberSpec, weights: dict[str, np.ndarray]) -> SAE:
        """A stack of one member holding `weights` (for evaluating a member no training stack holds)."""
        st = architecture(spec.arch)(self.d, spec.size, [spec.sparsity], [spec.seed], self.config.model)
        with torch.no_grad():
            for name in ("encoder", "encoder_bias", "decoder", "decoder_bias"):
                getattr(st, name)[0] = torch.from_numpy(np.asarray(weights[name]))
        return st.to(self.device)

    def member_weights(self) -> dict[str, dict[str, np.ndarray]]:
        """The trained members' final weights, by member id."""
        return {spec.id: st.member_weights(g) for st, specs in zip(self.stacks, self.stack_specs)
                for g, spec in enumerate(specs)}

    def training_records(self, evals: dict[str, dict[str, dict]]) -> dict[str, dict]:
        """Per trained member id: how it stopped, its dead latents (never alive / died later), resamplings."""
        last_fired, records = self.last_fired(), {}
        for spec in self.trained:
            records[spec.id] = dict(
                self.stop_record(spec), **dead_latents(evals[spec.id]["test"]["frequency"], last_fired[spec.id]),
                resampled=sum(n for _, i, g, n in self.resampled if self.stack_specs[i][g] == spec),
                copied_from=None, objective_from_scratch=None)  # set by copy_smaller_where_worse
        return records

    def write_results(self, evals: dict[str, dict[str, dict]],
                      weights: dict[str, dict[str, np.ndarray]] | None = None,
                      training: dict[str, dict] | None = None, last_fired: dict[str, np.ndarray] | None = None) -> Path:
        """The results file: every member's record and arrays, the cross-member signals, the run.
        `weights`, `training` and `last_fired` (a distributed sweep: every rank's members) replace this
        process's own."""
        weights = self.member_weights() if weights is None else weights
        training = self.training_records(evals) if training is None else training
        last_fired = self.last_fired() if last_fired is None else last_fired
        if self.config.copy_smaller_when_worse:
            self.copy_smaller_where_worse(evals, weights, training, last_fired)
        gt = self.store.ground_truth.get("features")
        alive = {sid: e["test"]["frequency"] > 0 for sid, e in evals.items()}
        thresholds = signal_thresholds()
        signals, per_member = cross_member_signals(self.specs, weights, gt, alive, thresholds)
        members, arrays = [], {}
        for spec in self.specs:
            e = evals[spec.id]
            curves = {k: np.asarray(v, dtype=np.float64).reshape(-1, 2) for k, v in self.curves[spec.id].items()}
            members.append(Member(id=spec.id, arch=spec.arch, dictionary_size=spec.size,
                                  sparsity_name=spec.sparsity_name, sparsity=spec.sparsity, seed=spec.seed,
                                  metrics={k: v["metrics"] for k, v in e.items()},
                                  signals=per_member[spec.id], curves=curves, training=training[spec.id]))
            arrays[spec.id] = MemberArrays(row_sse={k: v["row_sse"] for k, v in e.items()},
                                           frequency={k: v["frequency"] for k, v in e.items()},
                                           last_fired=last_fired[spec.id], **weights[spec.id])
        config = asdict(self.config)
        config["run"] = dict(sizes=sorted({s.size for s in self.specs}), total_steps=self.step,
                             batches_per_epoch=self.batches_per_epoch, train_rows=self.n_train,
                             test_rows=self.n_test, device=str(self.device), d=self.d)
        results = Results(path=self.out, label=self.label, site=self.site, d=self.d,
                          store_path=str(Path(self.store.path).resolve()), store_kind=self.store.kind or "",
                          store_provenance=self.store.provenance, store_hash=self.store_hash, config=config,
                          members=members, ground_truth=gt, signals=signals, normalisation_scale=self.scale,
                          signal_thresholds=thresholds.to_dict(), test_documents=self._test_documents())
        return write_results(self.out, results, arrays, force=True, resumable=self.ckpt.exists())

    # -- set-up ----------------------------------------------------------------------------------

    def _check_store(self) -> None:
        if not self.store.complete:
            raise TrainingError(f"{self.store.path}: is an unfinished store (its writer stopped before the end); "
                                "resume the store first (its command with --resume), then sweep the finished file")

    def _check_splits(self) -> None:
        if self.n_test == 0:
            raise TrainingError(f"{self.store.path}: has no test split; sweeps report train and test loss, so "
                                "rebuild the store with a test fraction > 0")
        if self.n_train < self.config.batch_size:
            raise TrainingError(f"{self.store.path}: the train split has {self.n_train} rows, fewer than one "
                                f"batch ({self.config.batch_size}); lower --batch-size")

    def _sample_statistics(self) -> tuple[float, torch.Tensor]:
        """Input scale and initial bias from a fixed sample of training rows (shared by all members)."""
        opts = self.config.model
        if not self.config.normalise and opts.pre_bias == "none":
            return 1.0, torch.zeros(self.d)
        n = min(self.config.sample_rows, self.n_train)
        stream = self.store.batches(self.site, "train", batch_size=n, seed=self.config.data_seed + 7919, epochs=1)
        sample = next(iter(stream)).double()
        if not torch.isfinite(sample).all():
            raise TrainingError(f"{self.store.path}: the train split of site {self.site!r} holds NaN or Inf values")
        scale = 1.0
        if self.config.normalise:
            msn = float(sample.pow(2).sum(1).mean())
            if msn <= 0:
                raise TrainingError(f"{self.store.path}: the sampled training rows are all zero; cannot normalise")
            scale = 1.0 / math.sqrt(msn)
        return scale, pre_bias((sample * scale).float(), opts.pre_bias)

    def _build_stacks(self) -> tuple[list[SAE], list[list[MemberSpec]]]:
        """One stack per size (split further when the codes of a stack would not fit STACK_ELEMENTS), and
        the members of each stack in its order."""
        cls = architecture(self.config.arch)
        stacks, specs = [], []
        for size in sorted({s.size for s in self.trained}):
            group = [s for s in self.trained if s.size == size]
            per_stack = max(1, STACK_ELEMENTS // (self.config.batch_size * size))
            for i in range(0, len(group), per_stack):
                part = group[i:i + per_stack]
                st = cls(self.d, size, [s.sparsity for s in part], [s.seed for s in part], self.config.model, self.bias)
                stacks.append(st.to(self.device))
                specs.append(part)
        return stacks, specs

    def _device_cache_choice(self, state: dict | None) -> bool:
        """Whether the train split is held on the device (SweepConfig.device_cache). A resumed run keeps its
        checkpoint's choice: the two streams order batches differently."""
        if state is not None:
            return bool(state.get("device_cache", False))
        if self.config.device_cache == "on":
            free, need = available_memory(self.device), self._train_split_bytes() + self.memory.total
            if free is not None and need > free:
                raise TrainingError(f"{self.out}: --device-cache on holds the train split "
                                    f"({human_bytes(self._train_split_bytes())}) on {self.device}, which has "
                                    f"{human_bytes(free)} available for it and the sweep; use --device-cache off")
            return True
        if self.config.device_cache == "off":
            return False
        if self.device.type != "cuda":
            return False
        # the device's total memory, not what is free now: under torchrun every rank must choose alike
        total = torch.cuda.get_device_properties(self.device).total_memory
        return self._train_split_bytes() < DEVICE_CACHE_SHARE * (total - self.memory.total)

    def _train_split_bytes(self) -> int:
        return self.n_train * self.d * self.store._dataset(self.site).dtype.itemsize

    def _cached_stream(self):
        """Batches drawn from the train split held on the device, from the current step on. Epoch e is a
        permutation seeded by (data_seed, e), cut into whole batches (the rest of a permutation is left out,
        as the store stream's drop_last does), so skipping to a step costs nothing."""
        if self.cached_rows is None:  # stored dtype (float16 halves it), every block checked as it is read
            parts = self.store.batches(self.site, "train", 1 << 16, shuffle=False, epochs=1, device=self.device,
                                       dtype=self._stored_dtype())
            self.cached_rows = torch.cat(list(parts))
        n, size = self.cached_rows.shape[0], self.config.batch_size
        per_epoch = n // size
        epoch, first = divmod(self.step, per_epoch)
        while True:
            gen = torch.Generator().manual_seed(self.config.data_seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen).to(self.device)
            for i in range(first, per_epoch):
                yield self.cached_rows[order[i * size:(i + 1) * size]].float()
            epoch, first = epoch + 1, 0

    def _stored_dtype(self) -> torch.dtype:
        stored = self.store._dataset(self.site).dtype
        return torch.float16 if stored == np.float16 else torch.float32

    def _stream(self):
        """The training batches from the current step on: the deterministic stream, skipped ahead."""
        if self.device_cache:
            return self._cached_stream()
        cuda = self.device.type == "cuda"
        stream = self.store.batches(self.site, "train", self.config.batch_size, seed=self.config.data_seed,
                                    epochs=None, drop_last=True, device=self.device, pin_memory=cuda,
                                    prefetch=self.config.prefetch if cuda else 0)
        return itertools.islice(stream, self.step, None)

    def _test_documents(self) -> np.ndarray | None:
        """Document ids of the evaluated test rows, in their order (stores with token metadata)."""
        tokens = self.store.tokens()
        if tokens is None or "doc" not in tokens:
            return None
        return np.asarray(tokens["doc"])[self.store.split_mask("test")]

    # -- checkpoints -----------------------------------------------------------------------------

    def _checkpoint_config(self) -> dict:
        cfg = asdict(self.config)
        for k in RESUMABLE_CHANGES:
            cfg.pop(k)
        return cfg

    def _checkpoint_to_resume(self, resume: bool, force: bool) -> dict | None:
        """The checkpoint state to continue from, or None to start afresh (an old one is deleted with --force)."""
        if not self.ckpt.exists():
            return None
        if resume:
            return self._load_checkpoint()
        if not force:
            raise TrainingError(f"{self.ckpt}: a checkpoint of an unfinished sweep exists; pass --resume to "
                                "continue it or --force to start again")
        self.ckpt.unlink()  # --force: start again, and never point at the old run's checkpoint
        return None

    def save_checkpoint(self) -> None:
        # Only tensors and plain Python values: `torch.load(weights_only=True)` refuses anything else
        # (a NumPy float64 in the test curve once made every default run unresumable).
        curves = {sid: {k: torch.tensor(v, dtype=torch.float64).reshape(-1, 2) for k, v in c.items()}
                  for sid, c in self.curves.items()}
        state = dict(version=CHECKPOINT_VERSION, config=self._checkpoint_config(), store_hash=self.store_hash,
                     step=self.step, scale=float(self.scale), bias=self.bias.cpu(), curves=curves,
                     stopped=[[int(size), int(step), reason] for size, (step, reason) in sorted(self.stopped.items())],
                     resampled=self.resampled, device_cache=bool(self.device_cache),
                     stacks=self._stack_states(), optimizer=self._optimizer_state())
        need = self.memory.checkpoint + (1 << 16)
        kept = "" if self.checkpoint_step is None else f"; the checkpoint of step {self.checkpoint_step} is kept"
        try:
            check_free_space(self.ckpt, need, resumable=True)
            with atomic_path(self.ckpt, resumable=True) as tmp:
                torch.save(state, tmp)
        except RuntimeError:  # torch's zip writer reports a full disk as "unexpected pos"
            try:
                check_free_space(self.ckpt, need, resumable=True)
            except OutputError as e:
                raise OutputError(f"{e}{kept}") from None
            raise
        except OutputError as e:
            raise OutputError(f"{e}{kept}") from None
        self.checkpoint_step = self.step

    # what a checkpoint holds of the weights and of Adam (distributed.LatentShardSweep joins its slices)
    def _stack_states(self) -> list[dict]:
        return [{k: _to_cpu(v) for k, v in st.state_dict().items()} for st in self.stacks]

    def _optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def _load_checkpoint(self) -> dict:
        try:
            state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrainingError(f"{self.ckpt}: unreadable checkpoint ({one_line(e)}); "
                                "delete it or pass --force to start again") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise TrainingError(f"{self.ckpt}: checkpoint version {state.get('version')} is not supported by this "
                                "version of sparsefeat; pass --force to start again")
        if state["store_hash"] != self.store_hash:
            raise TrainingError(f"{self.ckpt}: was written for other data (store hash {state['store_hash']}, "
                                f"this store {self.store_hash}); pass --force to start again")
        mine = self._checkpoint_config()
        diff = [k for k in mine if to_json(mine[k]) != to_json(state["config"].get(k))]
        if diff:
            k = diff[0]
            raise TrainingError(f"{self.ckpt}: cannot resume with a different {k} ({state['config'].get(k)!r} "
                                f"in the checkpoint, {mine[k]!r} now); pass --force to start again")
        return state

    def _restore(self, state: dict) -> None:
        for st, sd in zip(self.stacks, state["stacks"]):
            st.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.checkpoint_step = int(state["step"])
        self.curves = {sid: {k: [[float(a), float(b)] for a, b in v.tolist()] for k, v in c.items()}
                       for sid, c in state["curves"].items()}
        self.stopped = {int(size): (int(step), str(reason)) for size, step, reason in state["stopped"]}
        self.resampled = [[int(v) for v in row] for row in state["resampled"]]

    # -- inside the loop ---------------------------------------------------------------------------

    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _log(self, pending: list[list[torch.Tensor]], bar) -> None:
        """At a logging interval (the host waits for the device here only): stop at the first NaN/Inf
        loss, append each member's mean loss over the interval to its curve, update the bar."""
        first_step = self.step - len(pending)  # 0-based index of pending[0]
        means = []
        for i, specs in enumerate(self.stack_specs):
            steps = [(row, p[i]) for row, p in enumerate(pending) if p[i] is not None]  # a stopped size has none
            if not steps:
                means.append(None)
                continue
            losses = torch.stack([loss for _, loss in steps]).cpu()  # [steps, G]
            bad = ~torch.isfinite(losses)
            if bad.any():
                row, g = (int(v) for v in torch.nonzero(bad)[0])
                self._diverged(specs[g], first_step + steps[row][0])
            means.append(losses.double().mean(0).tolist())
        for st, specs, mean in zip(self.stacks, self.stack_specs, means):
            if mean is None:
                continue
            for spec, v in zip(specs, mean):
                self.curves[spec.id]["train"].append([float(self.step), v])
            st.on_log()
        flat = [v for mean in means if mean is not None for v in mean] or [math.nan]
        bar.update(self.step - bar.n)
        bar.set_postfix(loss=f"{np.mean(flat):.4g}", worst=f"{max(flat):.4g}", refresh=False)

    def _diverged(self, spec: MemberSpec, step: int):
        kept = (f"the last good checkpoint {self.ckpt} (step {self.checkpoint_step}) is kept"
                if self.checkpoint_step is not None else "no checkpoint was written yet")
        raise TrainingError(f"{self.out}: member {spec.id} got a NaN/Inf loss at step {step + 1}; training stopped "
                            f"and {kept}; try a lower --lr or check the data")

    def _test_curve_point(self) -> None:
        """The objective on the curve rows, for every stack still training (one pass over the rows)."""
        live = [i for i in range(len(self.stacks)) if self.active(i)]
        evals = evaluate_stacks([self.stacks[i] for i in live], self.curve_batches, self.scale, self._autocast,
                                keep_rows=False)
        for i, e in zip(live, evals):
            for g, spec in enumerate(self.stack_specs[i]):
                self.curves[spec.id]["test"].append([float(self.step), float(e.metrics["loss"][g])])

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluate(self, batches, stacks: list[SAE], keep_rows: bool = True) -> list[StackEvaluation]:
        return evaluate_stacks(stacks, batches, self.scale, self._autocast, keep_rows)

    def _eval_stream(self, split: str):
        """The evaluated rows: the whole test split in store order, or a fixed train sample of the same size."""
        cfg = self.config
        if split == "test":
            stream = self.store.batches(self.site, "test", cfg.batch_size, shuffle=False, epochs=1,
                                        device=self.device)
        else:
            stream = take_rows(self.store.batches(self.site, "train", cfg.batch_size, seed=cfg.data_seed + 104729,
                                                  epochs=1, device=self.device), self.n_test)
        rows = self.n_test if split == "test" else min(self.n_test, self.n_train)
        return tqdm(stream, total=math.ceil(rows / cfg.batch_size), desc=f"evaluate {split}", unit="batch",
                    disable=not self.progress, leave=False)


def dead_latents(frequency: np.ndarray, last_fired: np.ndarray) -> dict[str, int]:
    """Of the latents that never fire on the test split, those that never fired in training either and
    those that did (then died)."""
    dead = frequency <= 0
    return dict(dead_never_alive=int((dead & (last_fired == 0)).sum()),
                dead_died_later=int((dead & (last_fired > 0)).sum()))


def padded_weights(smaller: dict[str, np.ndarray], larger: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The larger member's weights replaced by the smaller one's, its extra latents switched off: encoder
    rows 0 and bias -1 (never firing), decoder rows its own (unit atoms, multiplied by zero codes)."""
    m = smaller["encoder"].shape[0]
    out = {name: np.array(larger[name], dtype=np.float32, copy=True) for name in larger}
    for name in ("encoder", "encoder_bias", "decoder"):
        out[name][:m] = smaller[name]
    out["encoder"][m:] = 0.0
    out["encoder_bias"][m:] = -1.0
    out["decoder_bias"][:] = smaller["decoder_bias"]
    return out


def held_out_converged(curve: list[list[float]], step: int, window: int, tolerance: float) -> bool:
    """Whether a held-out curve [(step, loss), ...] has converged at `step`: its best loss in the last
    `window` steps improved on the best before them by less than `tolerance` (relative). Taking the best
    of each span, not single points, keeps one noisy evaluation from stopping or prolonging training."""
    before = [loss for s, loss in curve if s <= step - window]
    recent = [loss for s, loss in curve if step - window < s <= step]
    if not before or not recent:
        return False
    best_before = min(before)
    return (best_before - min(recent)) <= tolerance * abs(best_before)


def signal_thresholds() -> SignalThresholds:
    """The count's matching thresholds (its defaults), so the stored signals use the count's cosines."""
    from .count import CountConfig
    return SignalThresholds.from_count_config(CountConfig())


def _adam(params, lr: float) -> torch.optim.Adam:
    """Fused Adam (on CPU about 3x the for-loop one), or the default where this torch lacks it."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # torch < 2.4 has no fused Adam on CPU
        return torch.optim.Adam(params, lr=lr)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, without terminal colour codes (torch adds them)."""
    text = ANSI_ESCAPE.sub("", str(e)).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def _to_cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v  # extra state (topk's AuxK switch) is a dict
