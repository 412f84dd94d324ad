"""Train a sweep of sparse autoencoders in one pass over a store, evaluate them, write `sweep.h5`.

A sweep is every combination of dictionary sizes × sparsity settings × seeds. All members train
concurrently on the same batches: the store's train split is read once for the whole sweep. Members
of one size are stacked into batched weights (sae.py); stacking does not change any member's
arithmetic, so a member trained in a sweep equals the same member trained alone.

Flow of `train_sweep`:
1. open the store; take a fixed sample of training rows for the input scale (normalised units:
   E‖x‖² = 1 on the sample) and the initial decoder bias;
2. build one stack per size, one Adam over all parameters;
3. step loop over the shuffled train stream (no host synchronisation except at logging intervals,
   where losses are averaged, checked for NaN/Inf and logged; test-loss curve points at a few steps;
   checkpoints every `checkpoint_every` steps, written atomically, carrying the stream position);
4. evaluate every member on the whole test split and on a train sample of the same size;
5. cross-member signals (next size, seeds, ground truth) with sparsefeat.metrics;
6. write the results file atomically and remove the checkpoint.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics
from .device import resolve_device
from .errors import SparsefeatError
from .files import OutputError, WriterLock, atomic_path, check_free_space, check_output
from .results import SIGNAL_KEYS, Member, MemberArrays, Results, ResultsError, write_results
from .sae import ARCHITECTURES, SAE, SAEOptions, architecture, pre_bias
from .store import ActivationStore, to_json

DEFAULT_STEPS = 3000
STACK_ELEMENTS = 1 << 26  # most code entries (members × batch × m) one stack holds at once (~256 MB)
SEED_THRESHOLD = 0.7  # cross-seed: shared if decoder and encoder cosines are both ≥ this (Paulo & Belrose)
MATCH_THRESHOLD = 0.9  # next size and ground truth: "same atom" if cosine ≥ this
CHECKPOINT_VERSION = 1
RESUMABLE_CHANGES = ("device", "compile", "prefetch")  # settings a resumed run may change


class TrainingError(SparsefeatError):
    """Training cannot start or cannot go on (bad settings, a diverged member)."""


@dataclass
class SweepConfig:
    """Everything that defines a sweep (the single source of its defaults)."""

    site: str | None = field(default=None, metadata={"help": "store site to train on (default: its only site)"})
    sizes: list[str] = field(default_factory=lambda: ["0.5x", "1x", "2x", "4x", "8x"], metadata={
        "help": "dictionary sizes: absolute (256) or ratios of the width d (0.5x, 2x)"})
    arch: str = field(default="relu-l1", metadata={
        "help": "architecture, a name in sparsefeat.sae.ARCHITECTURES (relu-l1, topk, or one you register)"})
    l1: list[float] = field(default_factory=lambda: [0.3], metadata={
        "help": "relu-l1: L1 coefficients α (see --l1-reduction)"})
    k: list[int] = field(default_factory=lambda: [16], metadata={"help": "topk: active latents per row"})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={
        "help": "initialisation seeds (two or more give the cross-seed agreement every count needs)"})
    steps: int | None = field(default=None, metadata={
        "help": f"training steps (default {DEFAULT_STEPS} when --epochs is not given)"})
    epochs: float | None = field(default=None, metadata={"help": "train for this many passes over the train split"})
    batch_size: int = field(default=256, metadata={"help": "rows per training step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "learning rate after warm-up: constant, or linear/cosine decay to 0 at the last step",
        "choices": ("constant", "linear", "cosine")})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear learning-rate warm-up from 0"})
    data_seed: int = field(default=0, metadata={"help": "seed of the batch order (shared by all members)"})
    normalise: bool = field(default=True, metadata={
        "help": "scale inputs by one factor so that E|x|^2 = 1 on the initial sample (metrics are in these units)"})
    sample_rows: int = field(default=65536, metadata={
        "help": "training rows sampled once for the input scale and the initial bias"})
    log_every: int = field(default=100, metadata={
        "help": "steps between loss logs (the only points where the host waits for the device)"})
    test_curve_points: int = field(default=5, metadata={"help": "test-loss evaluations during training"})
    test_curve_rows: int = field(default=4096, metadata={"help": "test rows used for each test-curve point"})
    checkpoint_every: int = field(default=1000, metadata={"help": "steps between checkpoints (0: none)"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda, cuda:1, ..."})
    bf16: bool = field(default=False, metadata={"help": "CUDA only: bfloat16 autocast for the matmuls"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training step (mainly for GPU)"})
    prefetch: int = field(default=2, metadata={
        "help": "CUDA: batches read ahead into pinned memory by a background thread (0: none); on CPU batches "
                "are read inline (a reader thread only competes with the step for the interpreter lock)"})
    label: str | None = field(default=None, metadata={
        "help": "name of this dataset in tables and plots (default: <store stem>:<site>)"})
    model: SAEOptions = field(default_factory=SAEOptions, metadata={"help": "architecture options"})

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = SAEOptions(**self.model)
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r} (known: {', '.join(sorted(ARCHITECTURES))})")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        for name in ("steps", "epochs"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        for name in ("batch_size", "sample_rows", "log_every", "test_curve_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "test_curve_points", "checkpoint_every", "prefetch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for s in self.sizes:
            _size_value(s)  # the form and sign now; whole latents once d is known
        if not self.sizes or not self.seeds or not self.sparsities:
            raise ValueError("a sweep needs at least one size, one seed and one sparsity setting")
        if any(not (math.isfinite(s) and s >= 0) for s in self.sparsities):
            raise ValueError(f"sparsity settings must be finite and >= 0, got {self.sparsities}")
        if self.arch == "topk" and any(int(k) != k or k < 1 for k in self.k):
            raise ValueError(f"k must be positive whole numbers, got {self.k}")

    @property
    def sparsities(self) -> list[float]:
        return [float(v) for v in (self.l1 if architecture(self.arch).sparsity_name == "l1" else self.k)]

    def resolved_sizes(self, d: int) -> list[int]:
        """Dictionary sizes in latents, sorted and without repeats ("2x" with d = 384 -> 768)."""
        return sorted({parse_size(s, d) for s in self.sizes})

    def members(self, d: int) -> list[MemberSpec]:
        """Every member of the sweep, ordered by sparsity, seed, then size."""
        return [MemberSpec(self.arch, m, s, seed)
                for s in dict.fromkeys(self.sparsities) for seed in dict.fromkeys(self.seeds)
                for m in self.resolved_sizes(d)]


def _size_value(text) -> tuple[float, bool]:
    """'256' -> (256, False); '2x' -> (2.0, True). Raises ValueError unless a positive number."""
    s = str(text).strip().lower()
    try:
        value, ratio = (float(s[:-1]), True) if s.endswith("x") else (int(s), False)
    except ValueError:
        raise ValueError(f"dictionary size {text!r} is neither a whole number nor a ratio like 2x") from None
    if not value > 0:
        raise ValueError(f"dictionary size must be positive, got {text!r}")
    return value, ratio


def parse_size(text, d: int) -> int:
    """'256' -> 256; '2x' -> 2·d; '0.5x' -> d/2 (rounded). Raises ValueError unless at least one latent."""
    value, ratio = _size_value(text)
    m = round(value * d) if ratio else int(value)
    if m <= 0:
        raise ValueError(f"dictionary size must be positive, got {text!r} (= {m} latents at d = {d})")
    return m


@dataclass(frozen=True)
class MemberSpec:
    arch: str
    size: int
    sparsity: float
    seed: int

    @property
    def sparsity_name(self) -> str:
        return architecture(self.arch).sparsity_name

    @property
    def id(self) -> str:
        return f"m={self.size},{self.sparsity_name}={self.sparsity:g},seed={self.seed}"


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


def train_sweep(store_path: str | os.PathLike, config: SweepConfig, out: str | os.PathLike, *,
                resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Train every member of `config` on the store, evaluate, and write the results file `out`.

    `resume=True` continues from `<out>.ckpt` when it exists (same config and store, else a one-line
    error) and starts from scratch when it does not; `force=True` replaces an existing results file
    (and discards an old checkpoint unless resuming)."""
    out = check_output(out, force=True, inputs=[store_path])  # never the store itself, even with --force
    if out.exists() and not force:
        hint = "the sweep is already complete; nothing to resume (use --force to train again)" if resume else \
            "already exists; pass --force to overwrite it"
        raise ResultsError(f"{out}: {hint}")
    with WriterLock(out, what="results file"):  # one sweep per results file (and its checkpoint)
        remove_stale_temporaries(out)
        with ActivationStore(store_path) as store:
            sweep = Sweep(store, config, out, progress=progress)
            if progress:
                print(sweep.startup_line(), file=sys.stderr)
            sweep.start(resume=resume, force=force)
            sweep.train()
            return sweep.finish(force=force)


def checkpoint_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".ckpt")


def remove_stale_temporaries(out: Path) -> None:
    """Delete the half-written temporaries a killed run left beside its results and checkpoint (they
    are never read: the checkpoint and results are complete files or absent)."""
    for target in (out, checkpoint_path(out)):
        for stale in [*target.parent.glob(f".{glob.escape(target.name)}.tmp-*"), Path(str(target) + ".tmp")]:
            stale.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


class Sweep:
    """One run of a sweep over one store: set-up, training loop, evaluation, results."""

    def __init__(self, store: ActivationStore, config: SweepConfig, out: Path, progress: bool = True):
        self.store, self.config, self.out, self.progress = store, config, out, progress
        self.ckpt = checkpoint_path(out)
        if not store.complete:
            raise TrainingError(f"{store.path}: is an unfinished store (its writer stopped before the end); "
                                "resume the store first (its command with --resume), then sweep the finished file")
        self.site = store.default_site() if config.site is None else config.site
        self.d = store.width(self.site)  # raises a one-line StoreError for an unknown site
        if store.n_rows("test") == 0:
            raise TrainingError(f"{store.path}: has no test split; sweeps report train and test loss, so "
                                "rebuild the store with a test fraction > 0")
        self.n_train = store.n_rows("train")
        if self.n_train < config.batch_size:
            raise TrainingError(f"{store.path}: the train split has {self.n_train} rows, fewer than one batch "
                                f"({config.batch_size}); lower --batch-size")
        try:
            self.specs = config.members(self.d)
        except ValueError as e:
            raise TrainingError(f"{store.path}: {e}") from None
        too_large = [(s.sparsity, s.size) for s in self.specs if s.sparsity_name == "k" and s.sparsity >= s.size]
        if too_large:
            k, m = too_large[0]
            raise TrainingError(f"{out}: topk with k={k:g} needs dictionaries larger than k, but one has {m} latents "
                                "(every latent would fire: no sparsity); use a smaller --k or larger --sizes")
        self.batches_per_epoch = self.n_train // config.batch_size
        self.total_steps = (config.steps if config.steps is not None else
                            max(1, math.ceil(config.epochs * self.batches_per_epoch)) if config.epochs is not None
                            else DEFAULT_STEPS)
        self.device = resolve_device(config.device)
        if config.bf16 and self.device.type != "cuda":
            raise TrainingError(f"{out}: --bf16 needs a CUDA device (this run uses {self.device})")
        self.label = config.label or f"{Path(store.path).stem}:{self.site}"
        self.memory = memory_estimate(self.specs, self.d, config.batch_size, store.n_rows("test"), config.sample_rows)
        check_memory(self.memory, self.device, out)
        self.step = 0
        self.curves = {s.id: {"train": [], "test": []} for s in self.specs}
        self._batches = None  # the training stream, opened at the first train() call
        self.checkpoint_step: int | None = None  # step of the checkpoint on disk that this run wrote or resumed

    def startup_line(self) -> str:
        sizes = ", ".join(str(m) for m in sorted({s.size for s in self.specs}))
        return (f"sweep {self.label}: {len(self.specs)} members (sizes {sizes}), {self.total_steps} steps on "
                f"{self.device}; memory {self.memory.describe()}")

    # -- set-up ----------------------------------------------------------------------------------

    def start(self, resume: bool, force: bool) -> None:
        self.store_hash = store_fingerprint(self.store, self.site)
        state = None
        if self.ckpt.exists():
            if resume:
                state = self._load_checkpoint()
            elif not force:
                raise TrainingError(f"{self.ckpt}: a checkpoint of an unfinished sweep exists; pass --resume to "
                                    "continue it or --force to start again")
            else:
                self.ckpt.unlink()  # --force: start again, and never point at the old run's checkpoint
        if state is None:
            self.scale, self.bias = self._sample_statistics()
        else:
            self.scale, self.bias = float(state["scale"]), state["bias"]
        self.stacks = self._build_stacks()
        params = [p for st in self.stacks for p in st.parameters()]
        self.optimizer = _adam(params, self.config.lr)
        if state is not None:
            self._restore(state)
        self.curve_steps = sorted({round(self.total_steps * (i + 1) / self.config.test_curve_points)
                                   for i in range(self.config.test_curve_points)})
        rows = _take_rows(self.store.batches(self.site, "test", self.config.batch_size, shuffle=False, epochs=1,
                                             device=self.device), self.config.test_curve_rows)
        self.curve_batches = list(rows)  # the first test rows, in store order, held for every curve point
        self._step_fns = [torch.compile(st.training_loss) if self.config.compile else st.training_loss
                          for st in self.stacks]

    def _sample_statistics(self) -> tuple[float, torch.Tensor]:
        """Input scale and initial bias from a fixed sample of training rows (shared by all members)."""
        if not self.config.normalise and self.config.model.pre_bias == "none":
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
        return scale, pre_bias((sample * scale).float(), self.config.model.pre_bias)

    def _build_stacks(self) -> list[SAE]:
        """One stack per size (split further when the codes of a stack would not fit STACK_ELEMENTS)."""
        cls = architecture(self.config.arch)
        stacks = []
        for size in sorted({s.size for s in self.specs}):
            group = [s for s in self.specs if s.size == size]
            per_stack = max(1, STACK_ELEMENTS // (self.config.batch_size * size))
            for i in range(0, len(group), per_stack):
                part = group[i:i + per_stack]
                st = cls(self.d, size, [s.sparsity for s in part], [s.seed for s in part], self.config.model, self.bias)
                st.specs = part
                stacks.append(st.to(self.device))
        return stacks

    # -- checkpoints -----------------------------------------------------------------------------

    def _checkpoint_config(self) -> dict:
        cfg = asdict(self.config)
        for k in RESUMABLE_CHANGES:
            cfg.pop(k)
        return cfg

    def _save_checkpoint(self) -> None:
        # Only tensors and plain Python values: `torch.load(weights_only=True)` refuses anything else
        # (a NumPy float64 in the test curve once made every default run unresumable).
        curves = {sid: {k: torch.tensor(v, dtype=torch.float64).reshape(-1, 2) for k, v in c.items()}
                  for sid, c in self.curves.items()}
        state = dict(version=CHECKPOINT_VERSION, config=self._checkpoint_config(), store_hash=self.store_hash,
                     step=self.step, scale=float(self.scale), bias=self.bias.cpu(), curves=curves,
                     stacks=[{k: _to_cpu(v) for k, v in st.state_dict().items()} for st in self.stacks],
                     optimizer=self.optimizer.state_dict())
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

    def _load_checkpoint(self) -> dict:
        try:
            state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrainingError(f"{self.ckpt}: unreadable checkpoint ({one_line(e)}); "
                                "delete it or pass --force to start again") from None
        if state.get("version") != CHECKPOINT_VERSION:
            raise TrainingError(f"{self.ckpt}: checkpoint version {state.get('version')} is not supported")
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

    # -- training --------------------------------------------------------------------------------

    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _stream(self):
        """The training batches from the current step on: the deterministic stream, skipped ahead."""
        cuda = self.device.type == "cuda"
        stream = self.store.batches(self.site, "train", self.config.batch_size, seed=self.config.data_seed,
                                    epochs=None, drop_last=True, device=self.device, pin_memory=cuda,
                                    prefetch=self.config.prefetch if cuda else 0)
        return itertools.islice(stream, self.step, None)

    def train(self, until: int | None = None) -> None:
        """Train up to step `until` (default: the end), logging at every `log_every` steps and at `until`."""
        cfg = self.config
        until = self.total_steps if until is None else min(until, self.total_steps)
        if self._batches is None:
            self._batches = self._stream()
        pending = []  # per step since the last log: each stack's per-member losses, still on the device
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc=f"sweep {self.label}",
                   unit="step", dynamic_ncols=True)
        try:
            while self.step < until:
                pending.append(self.step_on(next(self._batches)))
                checkpoint_now = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if self.step % cfg.log_every == 0 or self.step == until or checkpoint_now:
                    self._log(pending, bar)
                    pending = []
                if self.step in self.curve_steps:
                    self._test_curve_point()
                if checkpoint_now or (cfg.checkpoint_every and self.step == self.total_steps):
                    self._save_checkpoint()  # the last one spares the training if the final write is killed
        finally:
            bar.close()

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
        if cfg.lr_schedule != "constant" or self.step < cfg.warmup_steps:
            lr = learning_rate(self.step, self.total_steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        losses = []
        for st, fn in zip(self.stacks, self._step_fns):
            with self._autocast():
                loss, per_member = fn(x)
            loss.backward()
            st.after_backward()
            losses.append(per_member)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for st in self.stacks:
            st.after_step()
        self.step += 1
        return losses

    def _log(self, pending: list[list[torch.Tensor]], bar) -> None:
        """At a logging interval (the host waits for the device here only): stop at the first NaN/Inf
        loss, append each member's mean loss over the interval to its curve, update the bar."""
        first_step = self.step - len(pending)  # 0-based index of pending[0]
        means = []
        for i, st in enumerate(self.stacks):
            losses = torch.stack([p[i] for p in pending]).cpu()  # [steps, G]
            bad = ~torch.isfinite(losses)
            if bad.any():
                row, g = (int(v) for v in torch.nonzero(bad)[0])
                self._diverged(st.specs[g], first_step + row)
            means.append(losses.double().mean(0).tolist())
        for st, mean in zip(self.stacks, means):
            for spec, v in zip(st.specs, mean):
                self.curves[spec.id]["train"].append([float(self.step), v])
            st.on_log()
        flat = [v for mean in means for v in mean]
        bar.update(self.step - bar.n)
        bar.set_postfix(loss=f"{np.mean(flat):.4g}", worst=f"{max(flat):.4g}", refresh=False)

    def _diverged(self, spec: MemberSpec, step: int):
        kept = (f"the last good checkpoint {self.ckpt} (step {self.checkpoint_step}) is kept"
                if self.checkpoint_step is not None else "no checkpoint was written yet")
        raise TrainingError(f"{self.out}: member {spec.id} got a NaN/Inf loss at step {step + 1}; training stopped "
                            f"and {kept}; try a lower --lr or check the data")

    @torch.no_grad()
    def _test_curve_point(self) -> None:
        sums = self._evaluate_batches(self.curve_batches, keep_rows=False)
        for st, s in zip(self.stacks, sums):
            for g, spec in enumerate(st.specs):
                self.curves[spec.id]["test"].append([float(self.step), s["loss"][g] / s["rows"]])

    # -- evaluation ------------------------------------------------------------------------------

    def _eval_stream(self, split: str):
        """The evaluated rows: the whole test split in store order, or a fixed train sample of the same size."""
        cfg = self.config
        n_test = self.store.n_rows("test")
        if split == "test":
            stream = self.store.batches(self.site, "test", cfg.batch_size, shuffle=False, epochs=1,
                                        device=self.device)
        else:
            stream = _take_rows(self.store.batches(self.site, "train", cfg.batch_size, seed=cfg.data_seed + 104729,
                                                   epochs=1, device=self.device), n_test)
        rows = n_test if split == "test" else min(n_test, self.n_train)
        return tqdm(stream, total=math.ceil(rows / cfg.batch_size), desc=f"evaluate {split}", unit="batch",
                    disable=not self.progress, leave=False)

    @torch.no_grad()
    def _evaluate_batches(self, batches, keep_rows: bool = True) -> list[dict]:
        """Stream batches through every stack; per-member sums (float64) and per-row errors.

        Data sums (n, Σx, Σ‖x‖², Σ‖x‖) give FVU and shrinkage without holding the split in memory; the
        formulas are those of sparsefeat.metrics (tests check that both agree). The objective ("loss")
        is the row-weighted mean of each batch's mse + penalty (exact: both are means over rows).
        """
        sums = [dict(sse=0, loss=0, l1=0, norm_hat=0, fired=0, row_sse=[]) for _ in self.stacks]
        data = dict(n=0, x_sum=0, x_sq=0, x_norm=0)
        for x in batches:
            x = x * self.scale
            xd, n = x.double(), x.shape[0]
            data["n"] += n
            data["x_sum"] = data["x_sum"] + xd.sum(0)
            data["x_sq"] = data["x_sq"] + xd.pow(2).sum()
            data["x_norm"] = data["x_norm"] + torch.linalg.vector_norm(xd, dim=1).sum()
            for st, s in zip(self.stacks, sums):
                with self._autocast():
                    x_hat, codes = st(x)
                x_hat, codes = x_hat.float(), codes.float()
                err = (x_hat - x).pow(2).sum(-1)  # [G, B]
                s["sse"] = s["sse"] + err.sum(1, dtype=torch.float64)
                s["loss"] = s["loss"] + (err.mean(1) + st.penalty(codes)).double() * n
                s["l1"] = s["l1"] + codes.abs().sum((1, 2), dtype=torch.float64)
                s["fired"] = s["fired"] + torch.count_nonzero(codes, dim=1)  # [G, m]
                s["norm_hat"] = s["norm_hat"] + torch.linalg.vector_norm(x_hat, dim=-1).sum(1, dtype=torch.float64)
                if keep_rows:
                    s["row_sse"].append(err)
        out = []
        for s in sums:
            s["row_sse"] = torch.cat(s["row_sse"], dim=1).cpu().numpy() if s["row_sse"] else None
            s = {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            s["rows"] = data["n"]
            s["l0"] = s["fired"].sum(1).astype(np.float64)  # Σ over latents of rows fired = Σ over rows of L0
            s["data"] = {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
            out.append(s)
        return out

    def evaluate(self) -> dict[str, dict[str, dict]]:
        """Per member id and split: metrics, row_sse and firing frequency."""
        evals: dict[str, dict] = {s.id: {} for s in self.specs}
        for split in ("train", "test"):
            for st, s in zip(self.stacks, self._evaluate_batches(self._eval_stream(split))):
                n, data = s["rows"], s["data"]
                total_var = float(data["x_sq"] - (data["x_sum"] ** 2).sum() / n)
                row_sse = s["row_sse"]
                for g, spec in enumerate(st.specs):
                    evals[spec.id][split] = dict(
                        metrics=dict(mse=float(s["sse"][g] / n),
                                     fvu=float(s["sse"][g] / total_var) if total_var > 0 else math.nan,
                                     l1=float(s["l1"][g] / n), loss=float(s["loss"][g] / n), l0=float(s["l0"][g] / n),
                                     dead_fraction=metrics.dead_fraction(s["fired"][g]),
                                     shrinkage=float(s["norm_hat"][g] / data["x_norm"]), rows=int(n)),
                        row_sse=row_sse[g].astype(np.float32), frequency=(s["fired"][g] / n).astype(np.float32))
        return evals

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, force: bool = False) -> Path:
        evals = self.evaluate()
        weights = {spec.id: st.member_weights(g) for st in self.stacks for g, spec in enumerate(st.specs)}
        gt = self.store.ground_truth.get("features")
        alive = {sid: e["test"]["frequency"] > 0 for sid, e in evals.items()}
        signals, per_member = cross_member_signals(self.specs, weights, gt, alive)
        members, arrays = [], {}
        for spec in self.specs:
            curves = {k: np.asarray(v, dtype=np.float64).reshape(-1, 2) for k, v in self.curves[spec.id].items()}
            members.append(Member(id=spec.id, arch=spec.arch, dictionary_size=spec.size,
                                  sparsity_name=spec.sparsity_name, sparsity=spec.sparsity, seed=spec.seed,
                                  metrics={k: v["metrics"] for k, v in evals[spec.id].items()},
                                  signals=per_member[spec.id], curves=curves))
            w = weights[spec.id]
            arrays[spec.id] = MemberArrays(row_sse={k: v["row_sse"] for k, v in evals[spec.id].items()},
                                           frequency={k: v["frequency"] for k, v in evals[spec.id].items()}, **w)
        config = asdict(self.config)
        config["run"] = dict(sizes=sorted({s.size for s in self.specs}), total_steps=self.total_steps,
                             batches_per_epoch=self.batches_per_epoch, train_rows=self.n_train,
                             test_rows=self.store.n_rows("test"), device=str(self.device), d=self.d)
        results = Results(path=self.out, label=self.label, site=self.site, d=self.d,
                          store_path=str(Path(self.store.path).resolve()), store_kind=self.store.kind or "",
                          store_provenance=self.store.provenance, store_hash=self.store_hash, config=config,
                          members=members, ground_truth=gt, signals=signals, normalisation_scale=self.scale)
        path = write_results(self.out, results, arrays, force=force, resumable=self.ckpt.exists())
        if self.ckpt.exists():
            self.ckpt.unlink()
        return path


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a sweep needs at its peak, by part (an estimate from shapes, within tens of percent)."""

    weights: int  # parameters, gradients and Adam's two moments of every member
    codes: int  # the largest stack's activations and their gradients for one batch
    evaluation: int  # per-row errors of every member, the statistics sample, exported weights
    checkpoint: int  # size of one checkpoint file

    @property
    def total(self) -> int:
        return self.weights + self.codes + self.evaluation

    def describe(self) -> str:
        return (f"about {human_bytes(self.total)} (weights and Adam state {human_bytes(self.weights)}, codes per "
                f"batch {human_bytes(self.codes)}, evaluation {human_bytes(self.evaluation)})")


def memory_estimate(specs: list[MemberSpec], d: int, batch_size: int, test_rows: int, sample_rows: int
                    ) -> MemoryEstimate:
    """The memory of a sweep from its shapes (float32 everywhere, 4 bytes), before anything is allocated."""
    params = [2 * s.size * d + s.size + d for s in specs]
    by_size: dict[int, int] = {}
    for s in specs:
        by_size[s.size] = by_size.get(s.size, 0) + 1
    # per stack: pre-activations, codes and their gradients [G, B, m]; x̂ and its gradient [G, B, d];
    # a stack holds at most STACK_ELEMENTS codes, so a size's members may be split over several stacks
    codes = max(4 * min(g * batch_size * m, max(STACK_ELEMENTS, batch_size * m)) + 2 * g * batch_size * d
                for m, g in by_size.items()) * 4
    evaluation = (2 * len(specs) * test_rows + sum(params)) * 4 + 3 * sample_rows * d * 8
    return MemoryEstimate(weights=16 * sum(params), codes=codes, evaluation=evaluation,
                          checkpoint=12 * sum(params) + 8 * sum(s.size for s in specs))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on `device`: CUDA's free memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(estimate: MemoryEstimate, device: torch.device, out: Path) -> None:
    """Refuse a sweep that cannot fit, before allocating (the kernel's OOM killer says nothing)."""
    free = available_memory(device)
    if free is not None and estimate.total > free:
        raise TrainingError(f"{out}: this sweep needs {estimate.describe()} but {device} has "
                            f"{human_bytes(free)} available; use smaller --sizes, fewer members or a smaller "
                            "--batch-size")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


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


def _take_rows(stream, n: int):
    """The first n rows of a stream of batches."""
    left = n
    for b in stream:
        if left <= 0:
            return
        yield b[:left]
        left -= b.shape[0]


# --------------------------------------------------------------------------------------------
# Cross-member signals
# --------------------------------------------------------------------------------------------


def cross_member_signals(specs: list[MemberSpec], weights: dict[str, dict[str, np.ndarray]],
                         ground_truth: np.ndarray | None, alive: dict[str, np.ndarray] | None = None
                         ) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The tables comparing members, and each member's summary signals (NaN where not applicable).

    - next: each dictionary against the next larger size of the same sparsity and seed: MMCS
      (mean max cosine of its *alive* atoms, those that fired on the test split when `alive` is
      given, with the larger's atoms: a dead atom is a random direction and would pull MMCS down
      exactly where dead latents appear, past the true number of features), and one-to-one Hungarian matching (mean
      cosine of the pairs, share of its atoms whose pair has cosine ≥ 0.9).
    - seeds: each pair of seeds at the same size and sparsity: the shared fraction (Hungarian on
      decoder + encoder cosines, shared when both ≥ 0.7); a member's `shared_seed` is the mean over
      the other seeds.
    - ground_truth (toy stores): MMCS of the true features with the atoms, share recovered (≥ 0.9).
    """
    per = {s.id: {k: math.nan for k in SIGNAL_KEYS} for s in specs}
    tables: dict[str, list[dict]] = {"next": [], "seeds": []}
    groups: dict[tuple, list[MemberSpec]] = {}
    for s in specs:
        groups.setdefault((s.sparsity, s.seed), []).append(s)
    for group in groups.values():
        group = sorted(group, key=lambda s: s.size)
        for small, big in zip(group, group[1:]):
            a, b = weights[small.id]["decoder"], weights[big.id]["decoder"]
            live = a if alive is None else a[alive[small.id]]
            mm = metrics.mmcs(live, b) if len(live) else math.nan
            hung, share = metrics.hungarian_summary(a, b, threshold=MATCH_THRESHOLD)
            per[small.id].update(mmcs_next=mm, mmcs_next_hungarian=hung, share_next_0_9=share)
            tables["next"].append(dict(member=small.id, next_member=big.id, size=small.size, next_size=big.size,
                                       sparsity=small.sparsity, seed=small.seed, mmcs=mm,
                                       hungarian_mean_cos=hung, share_0_9=share))
    by_setting: dict[tuple, list[MemberSpec]] = {}
    for s in specs:
        by_setting.setdefault((s.size, s.sparsity), []).append(s)
    shared: dict[str, list[float]] = {s.id: [] for s in specs}
    for group in by_setting.values():
        for a, b in itertools.combinations(sorted(group, key=lambda s: s.seed), 2):
            wa, wb = weights[a.id], weights[b.id]
            frac = metrics.shared_fraction(wa["decoder"], wb["decoder"], wa["encoder"], wb["encoder"],
                                           threshold=SEED_THRESHOLD)
            shared[a.id].append(frac)
            shared[b.id].append(frac)
            tables["seeds"].append(dict(member_a=a.id, member_b=b.id, size=a.size, sparsity=a.sparsity,
                                        seed_a=a.seed, seed_b=b.seed, shared_fraction=frac,
                                        shared_count=frac * a.size))
    for sid, fracs in shared.items():
        if fracs:
            per[sid]["shared_seed"] = float(np.mean(fracs))
    if ground_truth is not None:
        tables["ground_truth"] = []
        for s in specs:
            dec = weights[s.id]["decoder"]
            mm, rec = metrics.mmcs(ground_truth, dec), metrics.recovered_fraction(ground_truth, dec, MATCH_THRESHOLD)
            per[s.id].update(mmcs_gt=mm, recovered_gt=rec)
            tables["ground_truth"].append(dict(member=s.id, size=s.size, sparsity=s.sparsity, seed=s.seed,
                                               features=int(ground_truth.shape[0]), mmcs=mm, recovered=rec))
    return tables, per
