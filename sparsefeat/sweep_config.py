"""What a sweep is: its settings (`SweepConfig`, the single source of their defaults), dictionary sizes
("256", "2x") and the members they expand to (`MemberSpec`: architecture, size, sparsity, seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ConfigError
from .sae import ARCHITECTURES, SAEOptions, architecture

DEFAULT_STEPS = 3000


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
    steps: int | str | None = field(default=None, metadata={
        "help": f"training steps (default {DEFAULT_STEPS} when --epochs is not given), or 'auto': each size "
                "trains until its held-out loss stops improving (see --converge-tolerance), within "
                "--min-steps..--max-steps"})
    max_steps: int = field(default=20000, metadata={"help": "steps=auto: the most steps any size trains"})
    min_steps: int = field(default=1000, metadata={"help": "steps=auto: the fewest steps any size trains"})
    converge_every: int = field(default=250, metadata={
        "help": "steps=auto: steps between held-out checks (test-curve points on the first --test-curve-rows "
                "test rows)"})
    converge_window: int = field(default=1000, metadata={
        "help": "steps=auto: a size has converged when its best held-out loss improved by less than "
                "--converge-tolerance over the last this many steps (a multiple of --converge-every)"})
    converge_tolerance: float = field(default=0.01, metadata={
        "help": "steps=auto: relative improvement of the held-out loss over the window below which a size stops"})
    cooldown_steps: int = field(default=0, metadata={
        "help": "steps=auto (ignored with a step count, where --lr-schedule linear or cosine decays): once a "
                "size stops (converged, or at --max-steps) its learning rate falls linearly "
                "to 0 over this many more steps (warm-stable-decay), so its final weights sit below the noise "
                "of a constant step: a larger dictionary then does not end above a smaller one by that noise"})
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
    bf16: bool = field(default=False, metadata={
        "help": "bfloat16 autocast for the matmuls of training and evaluation (weights and Adam stay float32): on "
                "a CUDA device, or a CPU with native bf16 (AVX512-BF16 or AMX), where the dense step ran 2-3x faster"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training step (mainly for GPU)"})
    prefetch: int = field(default=2, metadata={
        "help": "CUDA: batches read ahead into pinned memory by a background thread (0: none); on CPU batches "
                "are read inline (a reader thread only competes with the step for the interpreter lock)"})
    device_cache: str = field(default="auto", metadata={
        "help": "hold the train split in device memory and draw each batch there (no host reads or copies "
                "in the step loop): auto = on a CUDA device when the split takes under half of the device memory "
                "the sweep leaves. Its batch order differs from the store stream's (each the same for a seed); "
                "a resumed run keeps the stream its checkpoint used",
        "choices": ("auto", "on", "off")})
    resample_steps: list[int] = field(default_factory=list, metadata={
        "help": "relu-l1: steps at which dead latents are re-initialised toward the worst-reconstructed "
                "training rows, their Adam state reset (Anthropic 2023); empty (the default): never"})
    resample_window: int = field(default=250, metadata={
        "help": "a latent is dead at a resampling step when it has not fired in this many training steps"})
    copy_smaller_when_worse: bool = field(default=True, metadata={
        "help": "after training, a member whose training objective (on the evaluated train rows) ends above a "
                "smaller member's of its seed and setting takes that member's dictionary, its extra latents "
                "switched off: a larger dictionary can copy a smaller one, so from scratch it failed to train. "
                "Its own objective stays in its training record (objective_from_scratch), and the count judges "
                "training failures by it"})
    label: str | None = field(default=None, metadata={
        "help": "name of this dataset in tables and plots (default: <store stem>:<site>)"})
    model: SAEOptions | dict | None = field(default=None, metadata={
        "help": "the architecture's options: its `Options` dataclass, or a dict of its fields (default: defaults)"})

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.arch!r} (known: {', '.join(sorted(ARCHITECTURES))})")
        self.model = architecture(self.arch).build_options(self.model)
        self.steps = _steps_value(self.steps)
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give --steps or --epochs, not both")
        if self.auto_steps:
            self._check_auto()  # with a step count the cool-down does not apply: --lr-schedule decays instead
        for name in ("epochs",) if self.auto_steps else ("steps", "epochs"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be positive, got {v}")
        for name in ("batch_size", "sample_rows", "log_every", "test_curve_rows"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "test_curve_points", "checkpoint_every", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for s in self.sizes:
            _size_value(s)  # the form and sign now; whole latents once d is known
        if not self.sizes or not self.seeds or not self.sparsities:
            raise ConfigError("a sweep needs at least one size, one seed and one sparsity setting")
        if any(not (math.isfinite(s) and s >= 0) for s in self.sparsities):
            raise ConfigError(f"sparsity settings must be finite and >= 0, got {self.sparsities}")
        if self.resample_steps and architecture(self.arch).sparsity_name != "l1":
            raise ConfigError(f"--resample-steps is for relu-l1 (topk has AuxK), not {self.arch}")
        if any(int(s) != s or s <= 0 for s in self.resample_steps) or self.resample_window <= 0:
            raise ConfigError(f"resample steps and window must be positive whole numbers, got "
                              f"{self.resample_steps} and {self.resample_window}")
        early = [s for s in self.resample_steps if s < self.resample_window]
        if early:  # dead = no firing in the last window steps: before that many steps no latent can be
            raise ConfigError(f"resample step {early[0]} comes before any latent can be dead: a latent is dead "
                              f"after --resample-window {self.resample_window} steps without firing; resample "
                              "at that step or later, or shorten the window")
        if self.device_cache not in ("auto", "on", "off"):
            raise ConfigError(f"device-cache must be auto, on or off, got {self.device_cache!r}")
        if self.arch == "topk" and any(int(k) != k or k < 1 for k in self.k):
            raise ConfigError(f"k must be positive whole numbers, got {self.k}")

    @property
    def auto_steps(self) -> bool:
        """Whether each size trains until its held-out loss converges (steps="auto")."""
        return self.steps == "auto"

    def _check_auto(self) -> None:
        for name in ("max_steps", "min_steps", "converge_every", "converge_window"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive whole number, got {getattr(self, name)}")
        if self.min_steps > self.max_steps:
            raise ConfigError(f"min-steps ({self.min_steps}) is above max-steps ({self.max_steps})")
        if self.converge_window % self.converge_every:
            raise ConfigError(f"converge-window ({self.converge_window}) must be a multiple of converge-every "
                              f"({self.converge_every})")
        if not (math.isfinite(self.converge_tolerance) and self.converge_tolerance >= 0):
            raise ConfigError(f"converge-tolerance must be finite and >= 0, got {self.converge_tolerance}")
        if int(self.cooldown_steps) != self.cooldown_steps or self.cooldown_steps < 0:
            raise ConfigError(f"cooldown-steps must be a whole number >= 0, got {self.cooldown_steps}")
        if self.lr_schedule != "constant":  # a decay needs to know the last step in advance
            raise ConfigError(f"--steps auto needs --lr-schedule constant (a {self.lr_schedule} decay ends at a "
                              "fixed last step); give a step count for a decaying schedule")

    @property
    def sparsities(self) -> list[float]:
        return [float(v) for v in (self.l1 if architecture(self.arch).sparsity_name == "l1" else self.k)]

    def resolved_sizes(self, d: int) -> list[int]:
        """Dictionary sizes in latents, sorted and without repeats ("2x" with d = 384 -> 768)."""
        return sorted({parse_size(s, d) for s in self.sizes})

    def members(self, d: int) -> list[MemberSpec]:
        """Every member of the sweep, ordered by sparsity, seed, then size."""
        specs = [MemberSpec(self.arch, m, s, seed)
                 for s in dict.fromkeys(self.sparsities) for seed in dict.fromkeys(self.seeds)
                 for m in self.resolved_sizes(d)]
        for s in specs:
            if s.sparsity_name == "k" and s.sparsity >= s.size:
                raise ConfigError(f"topk with k={s.sparsity:g} needs dictionaries larger than k, but one has "
                                  f"{s.size} latents (every latent would fire: no sparsity); use a smaller --k "
                                  "or larger --sizes")
        return specs


def _steps_value(steps):
    """None, a whole number of steps, or "auto" (the command line passes text: "3000", "auto")."""
    if steps is None or isinstance(steps, int) and not isinstance(steps, bool):
        return steps
    text = str(steps).strip().lower()
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value)):
        raise ConfigError(f"steps must be a whole number or 'auto', got {steps!r}")
    return int(value)


def _size_value(text) -> tuple[float, bool]:
    """'256' -> (256, False); '2x' -> (2.0, True). Raises ValueError unless a positive number."""
    s = str(text).strip().lower()
    try:
        value, ratio = (float(s[:-1]), True) if s.endswith("x") else (int(s), False)
    except ValueError:
        raise ConfigError(f"dictionary size {text!r} is neither a whole number nor a ratio like 2x") from None
    if not value > 0:
        raise ConfigError(f"dictionary size must be positive, got {text!r}")
    return value, ratio


def parse_size(text, d: int) -> int:
    """'256' -> 256; '2x' -> 2·d; '0.5x' -> d/2 (rounded). Raises ValueError unless at least one latent."""
    value, ratio = _size_value(text)
    m = round(value * d) if ratio else int(value)
    if m <= 0:
        raise ConfigError(f"dictionary size must be positive, got {text!r} (= {m} latents at d = {d})")
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
