"""A sparsity grid per dataset from a short calibration run (what `run` sweeps by default).

A fixed penalty means different things on different data: on the same study, l1 = 1 killed every latent
of the unit square while l1 = 0.05 left MiniLM's null at L0 ≈ 75. So `run` first finds, per dataset, the
penalty at which a dictionary of about the width (`size`, default 1x) reaches a target L0 on the test
split after a few hundred steps, then sweeps a few settings spread on a log scale around it.

The rule (relu-l1):
1. **Target**: test L0 = `target_l0` when given, else `target_l0_per_width` · d (0.1: ≈ 3 at d = 32,
   ≈ 38 at d = 384), accepted within a factor `band` either side.
2. **Scan**: train one fused sweep of size `size`, one seed, the `scan` values of l1, for `steps` steps
   (the sweep's own lr and batch size), and read each member's test L0.
3. **Secant on log scales**: between the two neighbouring values whose L0 brackets the target, interpolate
   log l1 linearly in log L0 and train that value beside the bracket's midpoint (on a log scale: where L0
   falls off a cliff, the secant alone creeps towards it); repeat with every point measured so far until a
   measured L0 is inside the band or `rounds` runs were spent. Without a bracket the next round
   extends the scan by `spacing`² beyond its end.
4. **Grid**: the measured value whose L0 is closest to the target (in log), times
   `spacing`^(i − (settings − 1)/2), i = 0 … settings − 1: with 3 settings and spacing 3, ×{1/3, 1, 3}.

TopK needs no run: k is the L0, so the grid is the target L0 (rounded) times the same factors, as whole
numbers below the smallest size. Every tried value and its L0 is kept in `Calibration` (the study writes
it to calibration.json and the report).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

L0_FLOOR = 1e-3  # a setting with every latent dead has L0 = 0; its log is taken at this floor


@dataclass
class CalibrationConfig:
    """[calibration]: how `run` derives each dataset's sparsity grid (see the module docstring)."""
    toy: bool = field(default=True, metadata={
        "help": "calibrate the sparsity grid of toy sweeps (a fixed l1 or k list in [sweep.toy] turns this off)"})
    model: bool = field(default=True, metadata={
        "help": "calibrate the sparsity grid of model sweeps (a fixed l1 or k list in [sweep.model] turns this off)"})
    target_l0_per_width: float = field(default=0.1, metadata={
        "help": "target test L0 as a share of the width d (used when target_l0 is not given)"})
    target_l0: float | None = field(default=None, metadata={"help": "target test L0 in latents (overrides the share)"})
    band: float = field(default=1.5, metadata={
        "help": "an L0 within this factor of the target (either side) counts as reached"})
    settings: int = field(default=3, metadata={"help": "sparsity settings in the grid"})
    spacing: float = field(default=3.0, metadata={"help": "ratio between neighbouring settings of the grid"})
    size: str = field(default="1x", metadata={"help": "dictionary size of the calibration run (256 or 1x)"})
    steps: int = field(default=300, metadata={"help": "training steps of each calibration run"})
    scan: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], metadata={
        "help": "relu-l1 values of the first calibration run"})
    rounds: int = field(default=3, metadata={"help": "calibration runs at most (the scan is the first)"})

    def __post_init__(self):
        from .sweep_config import _size_value
        checks = [(0 < self.target_l0_per_width <= 1, f"target_l0_per_width must be in (0, 1], got {self.target_l0_per_width}"),
                  (self.target_l0 is None or self.target_l0 > 0, f"target_l0 must be positive, got {self.target_l0}"),
                  (self.band > 1, f"band must be above 1, got {self.band}"),
                  (self.settings >= 1, f"settings must be at least 1, got {self.settings}"),
                  (self.spacing > 1, f"spacing must be above 1, got {self.spacing}"),
                  (self.steps > 0, f"steps must be positive, got {self.steps}"),
                  (self.rounds >= 1, f"rounds must be at least 1, got {self.rounds}"),
                  (len(self.scan) >= 1 and all(v > 0 and math.isfinite(v) for v in self.scan),
                   f"scan must be positive numbers, got {self.scan}")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        _size_value(self.size)  # the form; the latents once d is known

    def target(self, d: int) -> float:
        return self.target_l0 if self.target_l0 is not None else self.target_l0_per_width * d


@dataclass
class Calibration:
    """What the calibration of one dataset tried and chose."""
    label: str
    arch: str
    sparsity_name: str  # "l1" or "k"
    d: int
    size: int | None            # latents of the calibration runs (None: no run, topk)
    steps: int | None
    target_l0: float
    band: float
    tried: list[dict]           # [{"round", "value", "l0", "fvu", "dead_fraction"}] in the order trained
    value: float                # the calibrated setting (the middle of the grid)
    reached: bool               # its L0 is inside the band
    grid: list[float]

    def text(self) -> str:
        runs = max((t["round"] for t in self.tried), default=0)
        how = (f"{len(self.tried)} {self.sparsity_name} values in {runs} run{'s' * (runs != 1)} of {self.steps} "
               f"steps at m={self.size}" if self.tried else "no run (k is the L0)")
        got = next((t["l0"] for t in self.tried if t["value"] == self.value), None)
        reached = "" if got is None else (f", L0 {got:.1f}" + ("" if self.reached else " (outside the band)"))
        grid = ", ".join(f"{v:g}" for v in self.grid)
        return (f"target L0 {self.target_l0:.1f} (×/÷{self.band:g}): {self.sparsity_name}={self.value:g}{reached}; "
                f"{how}; grid {grid}")


def _log_l0(l0: float) -> float:
    return math.log(max(l0, L0_FLOOR))


def next_values(points: list[tuple[float, float]], target: float, spacing: float) -> list[float]:
    """The l1 value(s) to try next, from (l1, L0) points measured so far (L0 falls as l1 grows).

    With a bracket (a value at or above the target L0 next to one below it): the secant point, log l1
    interpolated linearly in log L0. Without one: the scan extended by spacing² beyond its end."""
    pts = sorted(points)
    for (a, la), (b, lb) in zip(pts, pts[1:]):
        if la >= target > lb:
            t = (_log_l0(la) - math.log(target)) / (_log_l0(la) - _log_l0(lb))
            secant = math.exp(math.log(a) + t * (math.log(b) - math.log(a)))
            return [secant, math.sqrt(a * b)]  # the midpoint too: the bracket halves even where L0 falls off a cliff
    if all(l0 >= target for _, l0 in pts):  # too dense everywhere: stronger penalties
        return [pts[-1][0] * spacing ** 2, pts[-1][0] * spacing ** 4]
    return [pts[0][0] / spacing ** 2, pts[0][0] / spacing ** 4]  # too sparse everywhere: weaker ones


def closest(points: list[tuple[float, float]], target: float) -> tuple[float, float]:
    """The measured (value, L0) nearest the target on a log scale (ties: the smaller value)."""
    return min(points, key=lambda p: (abs(_log_l0(p[1]) - math.log(target)), p[0]))


def in_band(l0: float, target: float, band: float) -> bool:
    return target / band <= l0 <= target * band


def spread(value: float, settings: int, spacing: float) -> list[float]:
    """`settings` values around `value`, `spacing` apart on a log scale (3 significant digits)."""
    return [float(f"{value * spacing ** (i - (settings - 1) / 2):.3g}") for i in range(settings)]


def topk_grid(target: float, settings: int, spacing: float, smallest_size: int) -> list[float]:
    """Whole k around the target L0, each below the smallest dictionary (k ≥ m would keep every latent)."""
    if smallest_size < 2:
        raise ConfigError(f"topk needs dictionaries of at least 2 latents, the smallest has {smallest_size}")
    return [float(k) for k in sorted({min(max(1, round(v)), smallest_size - 1)
                                      for v in spread(target, settings, spacing)})]


def calibrate(store_path: str | os.PathLike, sweep, config: CalibrationConfig, *, label: str,
              progress: bool = False) -> Calibration:
    """Calibrate the sparsity grid of `sweep` (a SweepConfig) on one store (see the module docstring)."""
    from .sae import architecture
    from .store import ActivationStore
    from .sweep_config import parse_size
    with ActivationStore(store_path) as s:
        site = s.default_site() if sweep.site is None else sweep.site
        d = s.width(site)
    name = architecture(sweep.arch).sparsity_name
    target = config.target(d)
    common = dict(label=label, arch=sweep.arch, sparsity_name=name, d=d, target_l0=target, band=config.band)
    if name == "k":
        smallest = min(sweep.resolved_sizes(d))
        grid = topk_grid(target, config.settings, config.spacing, smallest)
        k = grid[len(grid) // 2]
        return Calibration(**common, size=None, steps=None, tried=[], value=k, reached=in_band(k, target, config.band),
                           grid=grid)
    size = parse_size(config.size, d)
    tried: list[dict] = []
    values = list(config.scan)
    for round_ in range(1, config.rounds + 1):
        tried += [dict(round=round_, **row) for row in _measure(store_path, sweep, size, values, config.steps,
                                                                 label, progress)]
        points = [(t["value"], t["l0"]) for t in tried]
        if any(in_band(l0, target, config.band) for _, l0 in points):
            break
        seen = {v for v, _ in points}
        values = [v for v in (float(f"{x:.4g}") for x in next_values(points, target, config.spacing)) if v not in seen]
        if not values:
            break
    value, l0 = closest([(t["value"], t["l0"]) for t in tried], target)
    return Calibration(**common, size=size, steps=config.steps, tried=tried, value=value,
                       reached=in_band(l0, target, config.band), grid=spread(value, config.settings, config.spacing))


def _measure(store_path, sweep, size: int, values: list[float], steps: int, label: str, progress: bool) -> list[dict]:
    """Test L0, FVU and dead fraction of one fused run: size `size`, the sweep's first seed, each l1 value."""
    from .results import load_results
    from .train import train_sweep
    # No resampling: a restart at (or near) the run's last step leaves fresh latents unsettled, and the L0
    # measured there said nothing about the penalty (a quick study calibrated a 128-feature toy to l1 = 3,
    # where every latent died, against 0.3 without)
    cfg = dataclasses.replace(sweep, sizes=[str(size)], l1=list(values), seeds=list(sweep.seeds[:1]), steps=steps,
                              epochs=None, checkpoint_every=0, test_curve_points=0, cooldown_steps=0,
                              resample_steps=[], label=f"{label} calibration")
    with tempfile.TemporaryDirectory(prefix="sparsefeat-calibration-") as tmp:
        path = train_sweep(store_path, cfg, Path(tmp) / "calibration.h5", force=True, progress=progress)
        with load_results(path) as r:
            test = {m.sparsity: m.metrics["test"] for m in r.members}
    return [dict(value=float(v), l0=float(test[float(v)]["l0"]), fvu=float(test[float(v)]["fvu"]),
                 dead_fraction=float(test[float(v)]["dead_fraction"])) for v in values]
