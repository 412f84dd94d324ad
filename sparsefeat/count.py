"""Count features honestly: the estimator, the held-out-loss stop, and the count table.

The rule (argued in docs/method.md):

1. A latent is *alive* if it fires on the test split (frequency > `alive_frequency`).
2. Within one dictionary, alive latents whose decoder atoms have cosine >= max(`merge_floor`, chance) are
   one *direction* (a feature split into near-duplicates counts once); chance = the `random_quantile`
   quantile of the best cosine between as many random unit atoms in as many dimensions as the atoms
   span (their participation ratio: atoms tiling a 3-D sphere agree by chance as in 3-D, not in d).
3. A direction is *reproduced* if a second seed of the same size has a direction matched to it one-to-one
   (Hungarian) with cosine >= tau = max(`match_floor`, chance). N(m) = reproduced directions at size m, averaged over seed pairs.
4. The estimate is the plateau of N(m): the first size after which N neither rises by more than
   `saturation_tolerance`·N + `saturation_slack` at any larger size nor falls below that band at the next
   size; the estimate is the largest N on the plateau. No plateau inside the sweep: no estimate, only the
   lower bound "> N(M)".

The headline of a dataset/site: among its sparsity settings, exclude the collapsed ones (every latent
dead, held-out FVU ~1 at every size, objective rising with size), then take the knee of the held-out
L0-vs-FVU frontier: the sparsest setting from which no denser one explains `knee_gain` of the variance per
doubling of L0. Its estimate is the headline; the other settings form the sensitivity table.

The held-out stop: the smallest size beyond which no step to a larger size lowers the test loss by more
than its noise (paired bootstrap over test rows), reported beside how much the train loss still falls.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, SparsefeatError
from .fit import CurveFit, Estimate, FitComparison, compare_fits, fit_loss_curve
from .metrics import hungarian_match
from .results import json_ready

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class CountConfig:
    match_floor: float = field(default=0.9, metadata={
        "help": "lowest decoder cosine at which latents of two seeds are the same direction"})
    merge_floor: float = field(default=0.8, metadata={
        "help": "lowest decoder cosine at which two latents of one dictionary are one split direction"})
    merge_opposite: bool = field(default=True, metadata={
        "help": "count a latent and its opposite (cosine <= -floor) as one direction: a pair of ReLU latents "
                "firing on the two sides of one axis encodes one signed variable, not two sparse features"})
    random_quantile: float = field(default=0.99, metadata={
        "help": "quantile of the best cosine between random atoms that the match threshold must exceed"})
    alive_frequency: float = field(default=0.0, metadata={
        "help": "a latent is alive if its firing frequency on the test split is above this"})
    saturation_tolerance: float = field(default=0.1, metadata={
        "help": "relative rise of the reproduced count that still counts as a plateau"})
    saturation_slack: float = field(default=2.0, metadata={
        "help": "absolute rise (latents) that still counts as a plateau"})
    chance_dimension: str = field(default="span", metadata={
        "help": "width at which chance agreement between atoms is computed: 'span' (the participation ratio "
                "of the atoms' second moment: atoms on a 3-D sphere agree by chance as in 3 dimensions) or "
                "'width' (d)", "choices": ("span", "width")})
    bootstrap: int = field(default=500, metadata={
        "help": "bootstrap resamples of the test rows for the held-out-loss noise"})
    confidence: float = field(default=0.95, metadata={
        "help": "a test-loss improvement counts if this share of bootstrap resamples shows one"})
    max_seed_pairs: int = field(default=3, metadata={"help": "seed pairs averaged per size"})
    undertrained_tolerance: float = field(default=0.05, metadata={
        "help": "warn when a larger dictionary ends with a training objective this much above a smaller one's"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})
    knee_gain: float = field(default=0.1, metadata={
        "help": "headline rule: the sparsest setting from which doubling the held-out L0 explains less than "
                "this share of the variance (see docs/method.md)"})
    collapse_fvu: float = field(default=0.99, metadata={
        "help": "a setting whose held-out FVU is at least this at every size collapsed: no headline from it"})

    def __post_init__(self):
        for name in ("match_floor", "merge_floor"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.random_quantile < 1.0:
            raise ConfigError(f"random_quantile must be in (0, 1), got {self.random_quantile}")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if not 0.0 < self.knee_gain < 1.0:
            raise ConfigError(f"knee_gain must be in (0, 1), got {self.knee_gain}")
        if not 0.0 < self.collapse_fvu:
            raise ConfigError(f"collapse_fvu must be positive, got {self.collapse_fvu}")
        if self.bootstrap < 10:
            raise ConfigError(f"bootstrap must be at least 10, got {self.bootstrap}")
        if self.chance_dimension not in ("span", "width"):
            raise ConfigError(f"chance_dimension must be 'span' or 'width', not {self.chance_dimension!r}")


# --------------------------------------------------------------------------------------------
# Matching directions (pure functions over decoder matrices, rows = unit atoms)
# --------------------------------------------------------------------------------------------


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=1024)
def random_match_threshold(d: float, m: int, quantile: float = 0.99) -> float:
    """The `quantile` of max_j cos(a, b_j) for a unit atom a and m independent random unit atoms b_j in d dims.

    A cosine this high arises by chance between unrelated atoms, so a match must beat it. Exact: for a
    fixed a, (cos(a, b_j) + 1)/2 ~ Beta((d−1)/2, (d−1)/2) independently over j, so the best of m has CDF
    F(t)^m and its quantile q is F⁻¹(q^(1/m)). The best cosine per atom (not the one-to-one matched
    one) is the stricter choice and also serves to merge near-duplicates within one dictionary.
    """
    from scipy.stats import beta
    if d < 2:
        return 1.0
    upper = -math.expm1(math.log(quantile) / max(m, 1))  # 1 − q^(1/m), accurate for large m
    half = (d - 1) / 2
    return float(2 * beta.isf(upper, half, half) - 1)


def span_dimension(*decoders: np.ndarray) -> float:
    """The number of dimensions the atoms actually use: the participation ratio (Σλ)²/Σλ² = 1/tr(M²) of
    the second-moment matrix M = UᵀU/n of the unit atoms U of all `decoders` stacked (d when they spread
    evenly over all d dimensions, 3 when they all lie in a 3-dimensional subspace)."""
    atoms = [_unit_rows(a) for a in decoders if np.asarray(a).shape[0] > 0]
    if not atoms:
        return 1.0
    u = np.concatenate(atoms)
    second = u.T @ u / u.shape[0]
    return float(1.0 / max(np.sum(second * second), 1e-12))


def chance_dimension(d: int, decoders, config: CountConfig) -> float:
    """The width at which chance agreement is computed: d, or the atoms' span (config.chance_dimension).
    Atoms confined to a few dimensions (a circle, a sphere, a low-rank Gaussian) agree by chance far more
    often than random atoms in d dimensions: 128 atoms tiling a 3-D sphere give every atom of a second
    seed a neighbour within 20 degrees."""
    if config.chance_dimension == "width":
        return float(d)
    return min(float(d), max(2.0, span_dimension(*decoders)))


def match_threshold(d: float, m: int, config: CountConfig) -> float:
    """tau = max(match_floor, random_match_threshold(d, m)): latents of two seeds are the same direction."""
    return max(config.match_floor, random_match_threshold(d, max(m, 1), config.random_quantile))


def merge_threshold(d: float, m: int, config: CountConfig) -> float:
    """max(merge_floor, random_match_threshold(d, m)): latents of one dictionary are one (split) direction."""
    return max(config.merge_floor, random_match_threshold(d, max(m, 1), config.random_quantile))


def distinct_directions(decoder: np.ndarray, threshold: float, frequency: np.ndarray | None = None,
                        opposite: bool = False) -> np.ndarray:
    """Indices of representative atoms after merging near-duplicates (cos >= threshold; with
    `opposite`, |cos| >= threshold, so an atom and its negative are one direction).

    Greedy in order of falling frequency: an atom joins the first representative it is that close to,
    else it becomes one. Returns the representatives' row indices.
    """
    dec = _unit_rows(decoder)
    if dec.shape[0] == 0:
        return np.zeros(0, dtype=int)
    order = np.argsort(-frequency, kind="stable") if frequency is not None else np.arange(dec.shape[0])
    reps: list[int] = []
    for i in order:
        if reps and _similarity(dec[reps] @ dec[i], opposite).max() >= threshold:
            continue
        reps.append(int(i))
    return np.array(reps, dtype=int)


def _similarity(cos: np.ndarray, opposite: bool) -> np.ndarray:
    return np.abs(cos) if opposite else cos


def reproduced_pairs(a: np.ndarray, b: np.ndarray, threshold: float, opposite: bool = False) -> np.ndarray:
    """Rows of `a` matched one-to-one (Hungarian on cosine, or on |cosine| with `opposite`) to rows of
    `b` with (absolute) cosine >= threshold."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros(0, dtype=int)
    if not opposite:
        pairs, cos = hungarian_match(a, b)
        return pairs[cos >= threshold, 0]
    from scipy.optimize import linear_sum_assignment
    score = np.abs(_unit_rows(a) @ _unit_rows(b).T)
    rows, cols = linear_sum_assignment(score, maximize=True)
    return rows[score[rows, cols] >= threshold]


def reproduced_directions(dec_a: np.ndarray, dec_b: np.ndarray, threshold: float,
                          freq_a: np.ndarray | None = None, freq_b: np.ndarray | None = None,
                          alive_frequency: float = 0.0, merge: float | None = None,
                          opposite: bool = False) -> int:
    """Distinct alive directions of dictionary a that dictionary b reproduces (steps 1-3 of the rule):
    atoms within `merge` (default: `threshold`) of each other are merged, then matched at `threshold`;
    with `opposite`, an atom and its negative count as one direction at both steps."""
    merge = threshold if merge is None else merge
    a, fa = _alive(dec_a, freq_a, alive_frequency)
    b, fb = _alive(dec_b, freq_b, alive_frequency)
    ra = distinct_directions(a, merge, fa, opposite)
    rb = distinct_directions(b, merge, fb, opposite)
    return int(reproduced_pairs(a[ra], b[rb], threshold, opposite).shape[0])


def _alive(dec: np.ndarray, freq: np.ndarray | None, alive_frequency: float):
    if freq is None:
        return np.asarray(dec), None
    keep = np.asarray(freq) > alive_frequency
    return np.asarray(dec)[keep], np.asarray(freq)[keep]


# --------------------------------------------------------------------------------------------
# Saturation of the count curve
# --------------------------------------------------------------------------------------------


@dataclass
class Saturation:
    """Where N(m) stops growing; `estimate` is None when it never does inside the sweep."""
    estimate: float | None
    size: int | None          # first size of the plateau
    uncertainty: float | None  # half the spread of N on the plateau, or the seed-pair spread if larger
    lower_bound: float        # N at the largest size (what "no saturation up to M" can still claim)
    largest_size: int


def find_saturation(sizes, counts, tolerance: float = 0.1, slack: float = 2.0,
                    spreads=None) -> Saturation:
    """First k such that no later N_j exceeds N_k + tolerance·N_k + slack; estimate = max_{j>=k} N_j.

    A fall after the plateau (large dictionaries that train less well, or more latents dying) still
    counts as "stopped growing". Needs a larger size to confirm a plateau, so the largest size alone
    never saturates.
    """
    sizes = [int(s) for s in sizes]
    counts = [float(c) for c in counts]
    spreads = [0.0] * len(counts) if spreads is None else [float(s) for s in spreads]
    if not counts:
        raise ValueError("no sizes to look for saturation in")
    for k in range(len(counts) - 1):
        band = tolerance * counts[k] + slack
        later = counts[k + 1:]
        if max(later) <= counts[k] + band:
            tail, tail_spread = counts[k:], spreads[k:]
            half_range = (max(tail) - min(tail)) / 2
            return Saturation(estimate=max(tail), size=sizes[k],
                              uncertainty=max(half_range, max(tail_spread), 1.0),
                              lower_bound=counts[-1], largest_size=sizes[-1])
    return Saturation(None, None, None, counts[-1], sizes[-1])


# --------------------------------------------------------------------------------------------
# Where more latents stop helping on held-out data
# --------------------------------------------------------------------------------------------


def paired_improvement(sse_small: np.ndarray, sse_large: np.ndarray, n_boot: int = 500,
                       seed: int = 0, groups: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Mean per-row loss improvement mean(sse_small − sse_large) and its bootstrap distribution.

    Rows are the same test rows for both sizes, so the difference is taken per row (paired) before
    resampling. With `groups` (document ids), whole documents are resampled, since tokens of a
    document are correlated.
    """
    diff = np.asarray(sse_small, dtype=np.float64) - np.asarray(sse_large, dtype=np.float64)
    if diff.shape[0] == 0:
        raise ValueError("no test rows to compare")
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, diff.shape[0], size=(n_boot, diff.shape[0]))
        return float(diff.mean()), diff[idx].mean(axis=1)
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=diff)
    counts = np.bincount(inverse).astype(np.float64)
    pick = rng.integers(0, sums.shape[0], size=(n_boot, sums.shape[0]))
    return float(diff.mean()), sums[pick].sum(axis=1) / counts[pick].sum(axis=1)


@dataclass
class HeldOutStop:
    """The held-out answer to "train or test loss?" for one sweep."""
    size: int | None             # smallest size beyond which test loss no longer improves; None: never
    improving_steps: list[bool]  # per step m_k -> m_{k+1}: a test improvement beyond bootstrap noise
    test_change: float | None    # relative test-loss change from `size` to the largest size
    train_change: float | None   # relative train-loss change over the same sizes (negative: still falls)

    @property
    def train_still_falls(self) -> bool:
        return self.train_change is not None and self.train_change < 0


def held_out_stop(sizes, test_sse: list[np.ndarray], train_loss, n_boot: int = 500, confidence: float = 0.95,
                  seed: int = 0, groups: np.ndarray | None = None) -> HeldOutStop:
    """The smallest size m_k such that no later step m_j -> m_{j+1} (j >= k) improves the test loss
    beyond noise (improvement counts if its bootstrap `1 − confidence` quantile is above 0).

    `test_sse[k]`: per-row squared errors of the test rows at size k (same rows at every size);
    `train_loss[k]`: the train loss at size k.
    """
    sizes = [int(s) for s in sizes]
    improving = []
    for k in range(len(sizes) - 1):
        _, boot = paired_improvement(test_sse[k], test_sse[k + 1], n_boot, seed + k, groups)
        improving.append(bool(np.quantile(boot, 1 - confidence) > 0))
    last = max([k + 1 for k, up in enumerate(improving) if up], default=0)
    if last == len(sizes) - 1:
        return HeldOutStop(None, improving, None, None)
    test_mean = [float(np.mean(s)) for s in test_sse]
    return HeldOutStop(size=sizes[last], improving_steps=improving,
                       test_change=_relative(test_mean[-1], test_mean[last]),
                       train_change=_relative(float(train_loss[-1]), float(train_loss[last])))


def _relative(new: float, old: float) -> float:
    return (new - old) / old if old else math.nan


# --------------------------------------------------------------------------------------------
# Assembling the count from results files
# --------------------------------------------------------------------------------------------


@dataclass
class SizeRow:
    """One dictionary size of one sweep (one sparsity setting), averaged over seeds."""
    size: int
    seeds: int
    train_mse: float
    test_mse: float
    train_fvu: float
    test_fvu: float
    train_objective: float  # the training loss (MSE + sparsity penalty) on the train sample
    gap: float            # test MSE − train MSE
    l0: float             # on the test split
    dead_fraction: float  # on the test split
    mmcs_next: float      # with the next larger dictionary (NaN at the largest)
    shared_seed: float    # the trainer's cross-seed shared fraction
    mmcs_gt: float        # with the ground truth (toys only, else NaN)
    threshold: float      # tau used for merging and matching at this size
    reproduced: float     # N(m): distinct alive directions reproduced across seeds (NaN: one seed)
    reproduced_spread: float  # std of N(m) over seed pairs
    all_dead: int = 0     # members of this size with every latent dead on the test split
    # members that took a smaller member's dictionary (SweepConfig.copy_smaller_when_worse), and the mean
    # training objective its members reached from scratch (what training-failure checks judge; NaN: as above)
    copied: int = 0
    objective_from_scratch: float = math.nan

    @property
    def scratch_objective(self) -> float:
        """The training objective the members reached from scratch, before any copy."""
        return self.train_objective if math.isnan(self.objective_from_scratch) else self.objective_from_scratch


@dataclass
class Comparison:
    """One estimate against a control's: the excess, or the bound on it when a side did not saturate."""
    against: str                # label of the control
    role: str                   # "null", "layer 0", "random init", "control"
    control_estimate: float | None
    control_lower_bound: float
    excess: float | None        # estimate − control estimate (both saturated)
    uncertainty: float | None   # sqrt(u_a² + u_b²)
    bound: str                  # "=", ">" (at least), "<" (at most) or "?" (neither saturated)
    common_size: int | None     # the largest size both sweeps trained
    excess_at_common_size: float | None  # N_a − N_b at that size

    @property
    def within_noise(self) -> bool | None:
        """|excess| <= 2·uncertainty; None when there is no excess to judge."""
        if self.excess is None or self.bound != "=":
            return None
        return abs(self.excess) <= 2 * self.uncertainty

    def text(self) -> str:
        if self.bound == "?":
            at = self.excess_at_common_size
            return "?" if at is None else f"? ({at:+.0f} at m={self.common_size})"
        if self.bound == "=":
            return f"{self.excess:+.0f}±{self.uncertainty:.0f}"
        return f"{self.bound}{self.excess:+.0f}"


@dataclass
class SweepCount:
    """One line of the count table: one dataset/site at one sparsity setting."""
    label: str
    results_path: str
    site: str
    d: int
    role: str             # toy, control, null, model, random-init, data
    arch: str
    sparsity_name: str
    sparsity: float
    expected: int | None  # the known number of features (toy ground truth; gmm components)
    sizes: list[SizeRow]
    saturation: Saturation
    held_out: HeldOutStop
    warnings: list[str] = field(default_factory=list)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    relations: dict[str, str] = field(default_factory=dict)  # role -> label of its null/layer 0/random init
    # per size: the seed-averaged per-row test squared errors (the same rows at every size), and each
    # test row's document when known; what the scaling fit resamples. Not written to JSON.
    test_sse: list[np.ndarray] = field(default_factory=list, repr=False)
    test_groups: np.ndarray | None = field(default=None, repr=False)

    @property
    def setting(self) -> str:
        return f"{self.arch} {self.sparsity_name}={self.sparsity:g}"

    def estimate_text(self) -> str:
        s = self.saturation
        mark = " *" if self.warnings else ""  # * = see warnings (undertrained sizes)
        if s.estimate is None:
            lower = "" if math.isnan(s.lower_bound) else f" (>{s.lower_bound:.0f})"
            return f"no saturation up to m={s.largest_size}{lower}{mark}"
        return f"{s.estimate:.0f}±{s.uncertainty:.0f} (m={s.size}){mark}"

    def held_out_text(self) -> str:
        h = self.held_out
        if len(self.sizes) < 2:
            return f"one size (m={self.sizes[0].size}): nothing to compare"
        if h.size is None:
            return f"improves to m={self.sizes[-1].size}"
        train = "" if h.train_change is None else f", train {h.train_change:+.1%}"
        return f"stops at m={h.size} (test {h.test_change:+.1%}{train})"


def count_results(paths, config: CountConfig | None = None, *, roles: dict[str, str] | None = None,
                  progress: bool = False) -> list[SweepCount]:
    """The count table for results files: per dataset/site and sparsity setting, by size, with the
    estimate, the held-out stop and the comparisons with the controls found among the same files.

    `roles` overrides the role inferred from a file's provenance, by label (e.g. {"gmm/x": "control"}).
    """
    from tqdm.auto import tqdm

    from .results import load_results
    config = config or CountConfig()
    loaded = [load_results(p) for p in paths]
    labels = _unique_labels(loaded)
    counts = []
    for r, label in tqdm(list(zip(loaded, labels)), desc="count", unit="file", disable=not progress):
        role = (roles or {}).get(label) or infer_role(r)
        for key, members in _sparsity_groups(r).items():
            counts.append(count_sweep(r, label, role, key, members, config))
    attach_comparisons(counts, loaded, labels)
    return counts


def _unique_labels(results) -> list[str]:
    labels = [r.label or Path(r.path).stem for r in results]
    seen = {x: labels.count(x) for x in labels}
    return [x if seen[x] == 1 else f"{x} [{Path(r.path).name}]" for x, r in zip(labels, results)]


def infer_role(r) -> str:
    """What a results file is, read from its store's provenance (`store_role`)."""
    return store_role(r.store_kind, r.store_provenance, r.ground_truth is not None)


def store_role(kind: str, provenance: dict | None, has_ground_truth: bool) -> str:
    """What a store is, from its kind and provenance: a matched null, a toy with ground truth, another
    toy (a false-positive control), a model site, a random-init model site, or data. `run` and `count`
    both use this rule, so a label never decides a role."""
    prov = provenance or {}
    if prov.get("generator") == "matched":
        return "null"
    if kind == "toy":
        return "toy" if has_ground_truth else "control"
    if kind == "model":
        return "random-init" if prov.get("random_init") else "model"
    return "data"


def _sparsity_groups(r) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for m in r.members:
        groups.setdefault((m.arch, m.sparsity_name, float(m.sparsity)), []).append(m)
    return groups


def expected_features(r) -> int | None:
    prov = r.store_provenance or {}
    params = prov.get("params") or {}
    key = {"sparse": "n_features", "gmm": "k"}.get(prov.get("generator"))
    return int(params[key]) if key and params.get(key) is not None else None


def count_sweep(r, label: str, role: str, key: tuple, members: list, config: CountConfig) -> SweepCount:
    """Everything the table says about one sparsity setting of one results file."""
    by_size: dict[int, list] = {}
    for m in members:
        by_size.setdefault(int(m.dictionary_size), []).append(m)
    sizes = sorted(by_size)
    rows, test_sse, train_loss = [], [], []
    for size in sizes:
        ms = sorted(by_size[size], key=lambda m: m.seed)
        rows.append(size_row(r, size, ms, config))
        test_sse.append(np.mean([r.row_sse(m.id, "test") for m in ms], axis=0))
        train_loss.append(rows[-1].train_mse)
    counts = [row.reproduced for row in rows]
    warnings = undertraining_warnings(rows, config.undertrained_tolerance)
    if any(math.isnan(c) for c in counts):
        saturation = Saturation(None, None, None, math.nan, sizes[-1])
        warnings.append("one seed at some size: N(m) needs two seeds per size (SweepConfig.seeds)")
    else:
        saturation = find_saturation(sizes, counts, config.saturation_tolerance, config.saturation_slack,
                                     [row.reproduced_spread for row in rows])
    # --- converge (issue 10.1): a size whose members did not converge (steps=auto) is no plateau ---
    unconverged = [s for s in sizes if any(getattr(m, "converged", None) is False for m in by_size[s])]
    for s in unconverged:
        steps = max(m.steps_trained or 0 for m in by_size[s])
        warnings.append(f"m={s} did not converge in {steps} steps; not read as a plateau")
    if saturation.estimate is not None and any(s >= saturation.size for s in unconverged):
        saturation = Saturation(None, None, None, saturation.estimate, sizes[-1])  # the plateau is a lower bound
    # --- end converge ---
    groups = test_documents(r, len(test_sse[0]))
    held = held_out_stop(sizes, test_sse, train_loss, config.bootstrap, config.confidence, config.seed,
                         groups=groups)
    arch, sparsity_name, sparsity = key
    return SweepCount(label=label, results_path=str(r.path), site=r.site, d=int(r.d), role=role, arch=arch,
                      sparsity_name=sparsity_name, sparsity=sparsity, expected=expected_features(r),
                      sizes=rows, saturation=saturation, held_out=held,
                      warnings=warnings, test_sse=test_sse, test_groups=groups)


def undertraining_warnings(rows: list[SizeRow], tolerance: float = 0.05) -> list[str]:
    """A larger dictionary can do whatever a smaller one does (extra latents at zero), so at convergence its
    training objective is no higher. One that ends more than `tolerance` above a smaller size's has not
    converged, and N(m) at that size undercounts: say so beside the estimate. Judged on the objectives
    reached from scratch: a member that then took a smaller one's dictionary still failed to train."""
    out = []
    for k in range(1, len(rows)):
        best = min(rows[:k], key=lambda r: r.scratch_objective)
        if rows[k].scratch_objective > best.scratch_objective * (1 + tolerance):
            out.append(f"undertrained: m={rows[k].size} ends with a training objective "
                       f"{rows[k].scratch_objective / best.scratch_objective - 1:+.0%} above m={best.size}'s "
                       "from scratch; train longer before reading N(m) there")
            break
    return out


def size_row(r, size: int, members: list, config: CountConfig) -> SizeRow:
    """Seed-averaged metrics of one size, and N(m) over seed pairs."""
    def mean(split, key):
        return float(np.mean([m.metrics[split][key] for m in members]))

    def signal(key):
        values = [m.signals.get(key, math.nan) for m in members]
        values = [v for v in values if v is not None and not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    pairs = list(itertools.combinations(members, 2))[:config.max_seed_pairs]
    found, taus = [], []
    for a, b in pairs:
        dec_a, dec_b = r.decoder(a.id), r.decoder(b.id)
        freq_a, freq_b = r.feature_frequency(a.id, "test"), r.feature_frequency(b.id, "test")
        width = chance_dimension(int(r.d), [_alive(dec_a, freq_a, config.alive_frequency)[0],
                                            _alive(dec_b, freq_b, config.alive_frequency)[0]], config)
        taus.append(match_threshold(width, size, config))
        found.append(reproduced_directions(dec_a, dec_b, taus[-1], freq_a, freq_b, config.alive_frequency,
                                           merge_threshold(width, size, config), config.merge_opposite))
    tau = float(np.mean(taus)) if taus else match_threshold(int(r.d), size, config)
    return SizeRow(size=size, seeds=len(members), train_mse=mean("train", "mse"), test_mse=mean("test", "mse"),
                   train_fvu=mean("train", "fvu"), test_fvu=mean("test", "fvu"),
                   train_objective=mean("train", "loss"),
                   gap=mean("test", "mse") - mean("train", "mse"), l0=mean("test", "l0"),
                   dead_fraction=mean("test", "dead_fraction"), mmcs_next=signal("mmcs_next"),
                   shared_seed=signal("shared_seed"), mmcs_gt=signal("mmcs_gt"), threshold=tau,
                   reproduced=float(np.mean(found)) if found else math.nan,
                   reproduced_spread=float(np.std(found)) if found else math.nan,
                   all_dead=sum(m.metrics["test"]["dead_fraction"] >= 1.0 for m in members),
                   copied=sum(m.training.get("copied_from") is not None for m in members),
                   objective_from_scratch=float(np.mean([_from_scratch(m) for m in members])))


def _from_scratch(member) -> float:
    """A member's training objective before any copy (SweepConfig.copy_smaller_when_worse)."""
    v = member.training.get("objective_from_scratch")
    return member.metrics["train"]["loss"] if v is None else float(v)


def test_documents(r, n_rows: int) -> np.ndarray | None:
    """Document ids of the evaluated test rows (model data: tokens of one document are correlated, so
    the bootstrap resamples documents). Stored in the results file since format version 2; older
    files are aligned with their store when it is still at its recorded path."""
    from .store import ActivationStore, StoreError
    if r.test_documents is not None:
        docs = np.asarray(r.test_documents)
        return docs if docs.shape[0] == n_rows else None
    if r.store_kind != "model":
        return None
    try:
        with ActivationStore(r.store_path) as s:
            tokens = s.tokens()
            if tokens is None:
                return None
            docs = tokens["doc"][s.split_mask("test")]
    except (StoreError, OSError):
        return None
    return docs if docs.shape[0] == n_rows else None


# --------------------------------------------------------------------------------------------
# Relations between sweeps: nulls, layer 0, random init, controls
# --------------------------------------------------------------------------------------------


def _store_key(path: str, site: str) -> tuple[str, str]:
    return str(Path(path).expanduser().resolve()), site


def layer_of_site(site: str) -> int | None:
    """The hidden-state index of a harvested site name, else None: `harvest.layer_of_site`, the
    inverse of `harvest.site_name` (imported here when used: harvest imports torch)."""
    from .harvest import layer_of_site as from_site_name
    return from_site_name(site)


def find_relations(results, labels) -> dict[str, dict[str, str]]:
    """For each label: the labels of its matched null, its model's layer 0 and its random-init twin.

    Read from provenance: a matched store records its source path and site; a harvested store records
    model, random_init and layers. Stores that moved are matched by file name when that is unique.
    """
    by_key = {_store_key(r.store_path, r.site): label for r, label in zip(results, labels)}
    by_name: dict[tuple, list[str]] = {}
    for r, label in zip(results, labels):
        by_name.setdefault((Path(r.store_path).name, r.site), []).append(label)
    relations: dict[str, dict[str, str]] = {label: {} for label in labels}
    for r, label in zip(results, labels):
        prov = r.store_provenance or {}
        if prov.get("generator") == "matched":
            src = prov.get("source") or {}
            path = src.get("path") or (prov.get("params") or {}).get("source")
            site = src.get("site") or (prov.get("params") or {}).get("site") or r.site
            if path:
                target = by_key.get(_store_key(path, site))
                named = by_name.get((Path(path).name, site), [])
                target = target or (named[0] if len(named) == 1 else None)
                if target and target != label:
                    relations[target]["null"] = label
    models = [(r, label, r.store_provenance or {}) for r, label in zip(results, labels) if r.store_kind == "model"]
    for r, label, prov in models:
        for r2, label2, prov2 in models:
            if label2 == label or prov2.get("model") != prov.get("model"):
                continue
            same_init = bool(prov2.get("random_init")) == bool(prov.get("random_init"))
            if same_init and layer_of_site(r2.site) == 0 and layer_of_site(r.site) not in (0, None):
                relations[label]["layer 0"] = label2
            if not prov.get("random_init") and prov2.get("random_init") and r2.site == r.site:
                relations[label]["random init"] = label2
    return relations


def compare(a: SweepCount, b: SweepCount, role: str) -> Comparison:
    """a's estimate against b's (see Comparison)."""
    sa, sb = a.saturation, b.saturation
    common = sorted({x.size for x in a.sizes} & {x.size for x in b.sizes})
    at = None
    if common:
        na = next(x.reproduced for x in a.sizes if x.size == common[-1])
        nb = next(x.reproduced for x in b.sizes if x.size == common[-1])
        at = None if math.isnan(na) or math.isnan(nb) else na - nb
    if sa.estimate is not None and sb.estimate is not None:
        excess, unc, bound = sa.estimate - sb.estimate, math.hypot(sa.uncertainty, sb.uncertainty), "="
    elif sa.estimate is None and sb.estimate is not None and not math.isnan(sa.lower_bound):
        excess, unc, bound = sa.lower_bound - sb.estimate, None, ">"
    elif sa.estimate is not None and sb.estimate is None and not math.isnan(sb.lower_bound):
        excess, unc, bound = sa.estimate - sb.lower_bound, None, "<"
    else:
        excess, unc, bound = None, None, "?"
    return Comparison(against=b.label, role=role, control_estimate=sb.estimate, control_lower_bound=sb.lower_bound,
                      excess=excess, uncertainty=unc, bound=bound, common_size=common[-1] if common else None,
                      excess_at_common_size=at)


def _counterpart(counts: list[SweepCount], label: str, like: SweepCount) -> SweepCount | None:
    """The sweep of `label` at the same setting as `like` (or its only setting)."""
    mine = [c for c in counts if c.label == label]
    same = [c for c in mine if (c.arch, c.sparsity_name, c.sparsity) == (like.arch, like.sparsity_name, like.sparsity)]
    return same[0] if same else (mine[0] if len(mine) == 1 else None)


def attach_comparisons(counts: list[SweepCount], results, labels) -> None:
    """Fill each sweep's comparisons: its null, layer 0 and random-init twin, and, for toys and data,
    every control of the same width."""
    relations = find_relations(results, labels)
    for c in counts:
        c.relations = dict(relations.get(c.label, {}))
        for role, other in relations.get(c.label, {}).items():
            twin = _counterpart(counts, other, c)
            if twin is not None:
                c.comparisons[role] = compare(c, twin, role)
        if c.role in ("toy", "data"):
            for other in counts:
                if other.role == "control" and other.d == c.d and other.label != c.label:
                    twin = _counterpart(counts, other.label, c)
                    if twin is other:
                        c.comparisons[f"control {other.label}"] = compare(c, other, "control")


# --------------------------------------------------------------------------------------------
# One headline per dataset/site: the sparsity setting chosen on held-out data
# --------------------------------------------------------------------------------------------

RULE_KNEE = dict(name="held-out knee", description=(
    "the sparsest non-collapsed setting on the held-out L0-vs-FVU frontier from which no denser setting "
    "explains at least knee_gain of the variance per doubling of L0"))
RULE_ONLY = dict(name="only setting", description="the sweep trained one sparsity setting; it is the headline")


@dataclass
class SettingScore:
    """One sparsity setting as a headline candidate: its held-out frontier point and its verdict."""
    sparsity: dict               # {"arch", "name", "value"}
    size: int                    # the size whose held-out point is used: the lowest test FVU
    l0: float                    # test L0 at that size (seed mean)
    fvu: float                   # test FVU at that size (seed mean)
    gain: float | None           # most variance a denser candidate explains per doubling of L0 from here
    status: str                  # "chosen", "candidate", "dominated" or "excluded"
    why: str = ""                # why excluded or dominated
    estimate: float | None = None


@dataclass
class Headline:
    """The one number of a dataset/site: the estimate at the sparsity setting chosen by `rule`."""
    label: str
    role: str
    d: int
    expected: int | None
    estimate: float | None
    uncertainty: float | None
    lower_bound: float | None      # N at the largest size of the chosen setting
    size: int | None               # first size of the plateau
    sparsity: dict | None          # the chosen setting, {"arch", "name", "value"}; None: none usable
    rule: dict                     # {"name", "description"}
    reason: str | None             # why there is no estimate (None when there is one)
    excluded: list[dict]           # [{"sparsity": {...}, "why": "..."}]
    scores: list[SettingScore]
    warnings: list[str] = field(default_factory=list)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    fit: CurveFit | None = None                # held-out FVU(m) = a·m^-b + c at the chosen setting
    fit_vs_null: FitComparison | None = None   # the same fit of the matched null (at its own chosen setting)
    null_label: str | None = None
    null_setting: str | None = None            # the null's setting that `fit_vs_null` used

    @property
    def setting(self) -> str:
        s = self.sparsity
        return "-" if s is None else f"{s['arch']} {s['name']}={s['value']:g}"

    def fit_text(self) -> str:
        """One line: the exponent and floor of the held-out fit with their intervals, beside the null's."""
        f = self.fit
        if f is None or not f.ok:
            return f"fit of test FVU: none ({'no setting chosen' if f is None else f.reason})"
        m5 = f.size_within_5pct.value
        line = (f"fit of test FVU = a·m^-b + c: b {estimate_text(f.exponent, '.2f')}, floor c {estimate_text(f.floor, '.3f')}, "
                f"within 5% of floor at m={'∞' if m5 is None else f'{m5:.3g}'}")
        v = self.fit_vs_null
        if v is not None and v.null.ok:
            at = "" if self.null_setting == self.setting else f" at {self.null_setting}"
            line += (f"; null {self.null_label}{at}: b {estimate_text(v.null.exponent, '.2f')}, "
                     f"c {estimate_text(v.null.floor, '.3f')}")
            if v.exponent_difference is not None:
                line += (f"; data−null b {estimate_text(v.exponent_difference, '+.2f')}, "
                         f"c {estimate_text(v.floor_difference, '+.3f')}")
        elif v is not None:
            line += f"; null {self.null_label}: no fit ({v.null.reason})"
        warnings = len(f.warnings) + (len(v.null.warnings) if v is not None else 0)
        return line + (f" ({warnings} fit warning{'s' * (warnings > 1)}, see --json)" if warnings else "")

    def text(self) -> str:
        """One line: the number (or why there is none), the chosen setting and the rule."""
        if self.estimate is not None:
            number = f"{self.estimate:.0f}±{self.uncertainty:.0f} features (plateau from m={self.size})"
        else:
            bound = "" if self.lower_bound is None or math.isnan(self.lower_bound) else f"; >{self.lower_bound:.0f}"
            number = f"no estimate ({self.reason}{bound})"
        expected = "" if self.expected is None else f", expected {self.expected}"
        comps = "".join(f", vs {role} {c.text()}" for role, c in self.comparisons.items()
                        if role in ("null", "layer 0", "random init"))
        return f"{self.label} [{self.role}]: {number} at {self.setting} by {self.rule['name']}{expected}{comps}"


def _sparsity_of(c: SweepCount) -> dict:
    return {"arch": c.arch, "name": c.sparsity_name, "value": c.sparsity}


def collapse_reason(c: SweepCount, config: CountConfig) -> str | None:
    """Why a setting's members describe the optimiser rather than the data, or None.

    Every latent dead (some member reconstructs nothing), a held-out FVU at the level of predicting the
    mean at every size, or a training objective that rises with size (a larger dictionary can copy a smaller one, so
    that is a training failure): the count of such a setting is not an answer about the data."""
    dead = [s.size for s in c.sizes if s.all_dead]
    if dead:
        return f"every latent dead at m={','.join(map(str, dead))}"
    best = min(s.test_fvu for s in c.sizes)
    if best >= config.collapse_fvu:  # at every size: a small dictionary alone may honestly explain little
        return f"held-out FVU >= {config.collapse_fvu:g} at every size (best {best:.2f})"
    undertrained = [w for w in c.warnings if w.startswith("undertrained")]
    if undertrained:
        return "loss rises with size: " + undertrained[0].split(";")[0]
    return None


def frontier_point(c: SweepCount) -> SizeRow:
    """The size of a setting that reconstructs held-out rows best (lowest test FVU; ties: the smaller)."""
    return min(c.sizes, key=lambda s: (s.test_fvu, s.size))


def choose_setting(points: list[tuple[float, float]], gain: float) -> tuple[int, list[float | None], set[int]]:
    """The knee of a held-out (L0, FVU) frontier.

    `points`: one (L0, FVU) per candidate. Candidates that another beats on both (lower or equal L0 and
    FVU, one strictly) are dominated. Along the rest, sorted by L0, the choice is the sparsest point i from
    which no denser point j explains `gain` or more of the variance per doubling of L0:
    (FVU_i − FVU_j) / log2(L0_j / L0_i) < gain. Returns (index chosen, gain per point, dominated indices).
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    dominated = {i for i in order for j in order if j != i and points[j][0] <= points[i][0]
                 and points[j][1] <= points[i][1] and points[j] != points[i]}
    front = [i for i in order if i not in dominated]
    gains: list[float | None] = [None] * len(points)
    for a, i in enumerate(front):
        rates = [(points[i][1] - points[j][1]) / math.log2(points[j][0] / points[i][0])
                 if points[j][0] > points[i][0] > 0 else math.inf for j in front[a + 1:]]
        gains[i] = max(rates) if rates else 0.0
    chosen = next((i for i in front if gains[i] < gain), front[-1])
    return chosen, gains, dominated


def headline(sweeps: list[SweepCount], config: CountConfig) -> Headline:
    """The headline of one dataset/site from its sweeps (one per sparsity setting); see docs/method.md."""
    first = sweeps[0]
    excluded, scores, candidates = [], [], []
    for c in sweeps:
        row = frontier_point(c)
        why = collapse_reason(c, config)
        scores.append(SettingScore(_sparsity_of(c), row.size, row.l0, row.test_fvu, None,
                                   "excluded" if why else "candidate", why or "", c.saturation.estimate))
        if why:
            excluded.append({"sparsity": _sparsity_of(c), "why": why})
        else:
            candidates.append(len(scores) - 1)
    rule = RULE_ONLY if len(sweeps) == 1 else RULE_KNEE
    empty = dict(label=first.label, role=first.role, d=first.d, expected=first.expected, rule=rule,
                 excluded=excluded, scores=scores)
    if not candidates:
        what = excluded[0]["why"] if len(sweeps) == 1 else "every setting collapsed"
        return Headline(**empty, estimate=None, uncertainty=None, lower_bound=None, size=None, sparsity=None,
                        reason=what)
    points = [(scores[i].l0, scores[i].fvu) for i in candidates]
    pick, gains, dominated = choose_setting(points, config.knee_gain)
    for k, i in enumerate(candidates):
        scores[i].gain = gains[k]
        if k in dominated:
            scores[i].status, scores[i].why = "dominated", "another setting has lower held-out L0 and FVU"
    scores[candidates[pick]].status = "chosen"
    chosen = sweeps[candidates[pick]]
    sat = chosen.saturation
    reason = None
    if sat.estimate is None:
        reason = ("one seed: N(m) needs two seeds per size" if math.isnan(sat.lower_bound)
                  else f"no plateau up to m={sat.largest_size}")
    return Headline(**empty, estimate=sat.estimate, uncertainty=sat.uncertainty,
                    lower_bound=None if math.isnan(sat.lower_bound) else sat.lower_bound, size=sat.size,
                    sparsity=_sparsity_of(chosen), reason=reason, warnings=list(chosen.warnings))


def headlines(counts: list[SweepCount], config: CountConfig | None = None) -> list[Headline]:
    """One headline per dataset/site (label), in the order of the count table, each compared with its
    controls' headlines (the relations `attach_comparisons` found)."""
    config = config or CountConfig()
    by_label: dict[str, list[SweepCount]] = {}
    for c in counts:
        by_label.setdefault(c.label, []).append(c)
    out = [headline(group, config) for group in by_label.values()]
    relations = {label: group[0].relations for label, group in by_label.items()}
    attach_headline_comparisons(out, counts, relations)
    attach_fits(out, counts, relations, config)
    return out


def chosen_sweep(h: Headline, counts: list[SweepCount]) -> SweepCount | None:
    """The sweep of a headline's chosen setting."""
    if h.sparsity is None:
        return None
    return next((c for c in counts if c.label == h.label and _sparsity_of(c) == h.sparsity), None)


def attach_headline_comparisons(hs: list[Headline], counts: list[SweepCount],
                                relations: dict[str, dict[str, str]]) -> None:
    """Each headline against its null, layer 0, random-init twin and (toys, data) the controls of the same
    width, each side at its own chosen setting: every dataset's sparsity is chosen on its own data."""
    by_label = {h.label: h for h in hs}
    for h in hs:
        mine = chosen_sweep(h, counts)
        if mine is None:
            continue
        others = dict(relations.get(h.label, {}))
        if h.role in ("toy", "data"):
            others.update({f"control {o.label}": o.label for o in hs if o.role == "control" and o.d == h.d
                           and o.label != h.label})
        for key, other in others.items():
            theirs = chosen_sweep(by_label[other], counts) if other in by_label else None
            if theirs is not None:
                h.comparisons[key] = compare(mine, theirs, "control" if key.startswith("control") else key)


def estimate_text(e: Estimate | None, spec: str) -> str:
    if e is None or e.value is None:
        return "-"
    if e.low is None or e.high is None:
        return format(e.value, spec)
    return f"{format(e.value, spec)} [{format(e.low, spec)}, {format(e.high, spec)}]"


def fit_sweep(c: SweepCount, config: CountConfig) -> CurveFit:
    """The held-out FVU(m) = a·m^-b + c of one sweep (seed-mean test FVU by size), with bootstrap
    intervals over its test rows (whole documents when known). The bootstrap seed depends on the label,
    so that a dataset's and its null's replicates are independent, as `compare_fits` assumes."""
    import zlib
    rows = c.test_sse if len(c.test_sse) == len(c.sizes) else None
    return fit_loss_curve([s.size for s in c.sizes], [s.test_fvu for s in c.sizes], row_errors=rows,
                          groups=c.test_groups if rows is not None else None, n_boot=config.bootstrap,
                          confidence=config.confidence, seed=config.seed + zlib.crc32(c.label.encode()) % 100_000)


def attach_fits(hs: list[Headline], counts: list[SweepCount], relations: dict[str, dict[str, str]],
                config: CountConfig) -> None:
    """Each headline's held-out fit at its chosen setting, and beside it its matched null's: a power law
    alone says nothing, a Gaussian's curve falls as one too. The null is fitted at the *same* setting
    when it was trained there (the same penalty on data of the same mean and covariance, so the curves
    differ by the sparse structure alone), else at its own chosen setting; `null_setting` says which.
    The null's own knee is usually its densest setting, where L0 reaches d and any dictionary
    reconstructs a Gaussian almost exactly: a floor near 0 that says nothing about features."""
    fits: dict[int, CurveFit] = {}

    def fit_of(c: SweepCount) -> CurveFit:
        if id(c) not in fits:
            fits[id(c)] = fit_sweep(c, config)
        return fits[id(c)]

    for h in hs:
        chosen = chosen_sweep(h, counts)
        h.fit = fit_of(chosen) if chosen is not None else None
    by_label = {h.label: h for h in hs}
    for h in hs:
        null = by_label.get(relations.get(h.label, {}).get("null"))
        if h.fit is None or null is None:
            continue
        same = next((c for c in counts if c.label == null.label and _sparsity_of(c) == h.sparsity), None)
        theirs = same or chosen_sweep(null, counts)
        if theirs is None:
            continue
        h.null_label, h.null_setting = null.label, theirs.setting
        h.fit_vs_null = compare_fits(h.fit, fit_of(theirs), config.confidence)


@dataclass
class Count:
    """The whole count of some results files: the sensitivity table (one SweepCount per dataset/site and
    setting) and one headline per dataset/site."""
    sweeps: list[SweepCount]
    headlines: list[Headline]


def count_study(paths, config: CountConfig | None = None, *, roles: dict[str, str] | None = None,
                progress: bool = False) -> Count:
    """`count_results` plus the headline of each dataset/site."""
    config = config or CountConfig()
    sweeps = count_results(paths, config, roles=roles, progress=progress)
    return Count(sweeps, headlines(sweeps, config))


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("dataset/site", "role", "d", "setting", "sizes", "features", "expected", "vs null",
                 "vs layer 0", "vs random init", "held-out loss")


def table_rows(counts: list[SweepCount]) -> list[list[str]]:
    rows = []
    for c in counts:
        def cmp(role):
            return c.comparisons[role].text() if role in c.comparisons else "-"
        rows.append([c.label, c.role, str(c.d), c.setting, f"{c.sizes[0].size}..{c.sizes[-1].size}",
                     c.estimate_text(), "-" if c.expected is None else str(c.expected), cmp("null"),
                     cmp("layer 0"), cmp("random init"), c.held_out_text()])
    return rows


def format_table(columns, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [columns, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


SIZE_COLUMNS = ("m", "seeds", "train mse", "test mse", "gap", "train fvu", "test fvu", "L0", "dead",
                "mmcs next", "shared", "mmcs gt", "tau", "N(m)")


def size_table(c: SweepCount) -> str:
    def f(x, spec=".4f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
    rows = [[str(s.size), str(s.seeds), f(s.train_mse), f(s.test_mse), f(s.gap, "+.4f"), f(s.train_fvu),
             f(s.test_fvu), f(s.l0, ".1f"), f(s.dead_fraction, ".2f"), f(s.mmcs_next, ".3f"), f(s.shared_seed, ".2f"),
             f(s.mmcs_gt, ".3f"), f(s.threshold, ".2f"),
             f(s.reproduced, ".1f") + ("" if not s.reproduced_spread else f"±{s.reproduced_spread:.1f}")]
            for s in c.sizes]
    return format_table(SIZE_COLUMNS, rows)


def headline_json(h: Headline) -> dict:
    """A headline as a JSON-ready dict, with its one-line text and the within-noise verdicts."""
    d = asdict(h)
    for key in ("fit", "fit_vs_null", "null_label", "null_setting"):
        d.pop(key)
    d["fit"] = fit_json(h)
    d["setting"] = h.setting
    d["text"] = h.text()
    for key, comp in h.comparisons.items():
        d["comparisons"][key]["within_noise"] = comp.within_noise
        d["comparisons"][key]["text"] = comp.text()
    return json_ready(d)


def _curve_json(f: CurveFit) -> dict:
    d = f.to_json()
    d["size_within_5pct_of_floor"] = d.pop("size_within_5pct")
    return d


def fit_json(h: Headline) -> dict:
    """The `fit` object of a headline: its curve fit (`exponent`, `floor`, `amplitude`,
    `size_within_5pct_of_floor`, each {value, low, high}; `warnings`), and `null`: the matched null's fit
    with the differences data − null (None when the dataset has no null among the files)."""
    if h.fit is None:
        return json_ready(dict(ok=False, reason="no setting chosen: " + (h.reason or "none"), exponent=None,
                               floor=None, amplitude=None, size_within_5pct_of_floor=None, warnings=[], null=None))
    d = _curve_json(h.fit)
    v = h.fit_vs_null
    d["null"] = None if v is None else json_ready(dict(
        label=h.null_label, setting=h.null_setting, same_setting=h.null_setting == h.setting,
        fit=_curve_json(v.null),
        exponent_difference=None if v.exponent_difference is None else v.exponent_difference.to_json(),
        floor_difference=None if v.floor_difference is None else v.floor_difference.to_json(),
        reason=v.reason, warnings=v.warnings))
    d["text"] = h.fit_text()
    return d


def to_json(counts: list[SweepCount], hs: list[Headline] | None = None) -> list[dict]:
    """JSON-ready dicts (NaN -> None), one per dataset/site and setting (the sensitivity table), with the
    within-noise verdict of each comparison. Each carries `headline`, the headline of its dataset/site
    (the same object for every setting of it; `hs` default: `headlines(counts)` with the default rule),
    and `chosen`, whether it is the headline's setting."""
    hs = headlines(counts) if hs is None else hs
    by_label = {h.label: headline_json(h) for h in hs}
    chosen = {(h.label, tuple(sorted(h.sparsity.items()))) for h in hs if h.sparsity is not None}
    out = []
    for c in counts:
        d = asdict(c)
        for key in ("test_sse", "test_groups"):  # per-row arrays: the fit's input, not a result
            d.pop(key)
        d["estimate_text"] = c.estimate_text()
        d["held_out_text"] = c.held_out_text()
        d["held_out"]["train_still_falls"] = c.held_out.train_still_falls
        for key, comp in c.comparisons.items():
            d["comparisons"][key]["within_noise"] = comp.within_noise
            d["comparisons"][key]["text"] = comp.text()
        d = json_ready(d)
        d["chosen"] = (c.label, tuple(sorted(_sparsity_of(c).items()))) in chosen
        d["headline"] = by_label.get(c.label)
        out.append(d)
    return out


def headline_lines(hs: list[Headline]) -> list[str]:
    """The text output's lead: per dataset/site, its headline and, indented, its held-out fit."""
    return [line for h in hs for line in (h.text(), "  " + h.fit_text())]
