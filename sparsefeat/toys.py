"""Toy data with known structure: the ground-truth sparse generator and the false-positive controls.

Every generator is one `Toy` subclass with a `Params` dataclass; defining the class registers it in
`TOYS`. `write_toy` turns a generator into an activation store (site "x", kind "toy", per-row split).

Determinism: the fixed structure of a toy (features, means, embedding, ...) comes from the random
stream (seed, STRUCTURE); block b of rows comes from the stream (seed, ROWS, b). So a killed
`write_toy(..., resume=True)` regenerates exactly the blocks it lacks and the finished store equals
an uninterrupted run row for row. `block_rows` is part of the provenance for that reason.

Scale: generators with a `scale` parameter multiply their rows by one factor so that E‖x‖² = scale
(exactly in expectation where a closed form exists; from a fixed pilot sample otherwise), so curves
on toys and on real activations of the same width and scale can be overlaid. `like=(store, site)`
sets `d` and `scale` from an existing store.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from scipy.special import ndtri
from tqdm.auto import tqdm

from . import __version__
from .errors import ConfigError, SparsefeatError
from .files import OutputError, check_output
from .store import ActivationStore, AlreadyComplete, StoreError, StoreWriter, check_int, check_test_fraction, split_rows
from .store.writer import DTYPES

SITE = "x"

# Independent random streams derived from the seed (numpy SeedSequence entropy = [seed, stream, ...]).
STRUCTURE, ROWS, PILOT = 1, 2, 3
PILOT_ROWS = 1 << 15

TOYS: dict[str, type["Toy"]] = {}


class Toy:
    """A seeded generator of i.i.d. rows. Subclasses set `name`, `Params`, and implement `setup`,
    `draw` (unscaled rows), `natural_mean_squared_norm` and `ground_truth`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            if cls.name in TOYS:  # a silent overwrite would swap the generator every study uses
                raise ConfigError(f"toy {cls.name!r} is already registered ({TOYS[cls.name].__qualname__}); "
                                  "choose another name")
            TOYS[cls.name] = cls

    def __init__(self, params, seed: int):
        self.params = params
        self.seed = int(seed)
        self.setup(np.random.default_rng([self.seed, STRUCTURE]))
        target = getattr(params, "scale", None)
        self.factor = 1.0 if target is None else math.sqrt(target / self.natural_mean_squared_norm())

    @property
    def d(self) -> int:
        return int(self.params.d)

    def setup(self, rng: np.random.Generator) -> None:
        """Draw the fixed structure of the toy (called once, from the structure stream)."""

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n unscaled rows [n, d]."""
        raise NotImplementedError

    def natural_mean_squared_norm(self) -> float:
        """E‖x‖² of the unscaled rows."""
        raise NotImplementedError

    def ground_truth(self) -> dict[str, np.ndarray]:
        """What the generator knows, in the units of the stored (scaled) rows."""
        return {}

    def provenance(self) -> dict:
        """Extra provenance beyond the generator name and params (e.g. the matched source)."""
        return {}

    def block(self, index: int, n: int) -> np.ndarray:
        """Rows of block `index` (n of them), scaled; depends only on (seed, index, n)."""
        rows = self.draw(n, np.random.default_rng([self.seed, ROWS, index]))
        return rows * self.factor if self.factor != 1.0 else rows

    def pilot_mean_squared_norm(self) -> float:
        """E‖x‖² estimated on a fixed pilot sample (for generators without a closed form)."""
        rows = self.draw(PILOT_ROWS, np.random.default_rng([self.seed, PILOT]))
        return float(np.mean(np.einsum("ij,ij->i", rows, rows, dtype=np.float64)))


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not (value > 0 or (allow_zero and value == 0)) or not math.isfinite(value):
        raise SparsefeatError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def _random_orthonormal_rows(q: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """q orthonormal rows in d dims (uniformly random: QR of a Gaussian matrix, sign-fixed)."""
    a = rng.standard_normal((d, q))
    qmat, r = np.linalg.qr(a)
    return (qmat * np.sign(np.diag(r))).T


# --------------------------------------------------------------------------------------------
# sparse: the ground-truth generator
# --------------------------------------------------------------------------------------------


@dataclass
class SparseParams:
    n_features: int = field(default=512, metadata={"help": "number of ground-truth features"})
    d: int = field(default=256, metadata={"help": "width of the data"})
    mean_active: float = field(default=5.0, metadata={"help": "expected number of active features per row"})
    decay: float = field(default=0.99, metadata={
        "help": "feature i is active with probability proportional to decay**i (1 = all equally likely)"})
    correlated: bool = field(default=False, metadata={
        "help": "correlate which features fire together (Gaussian copula, per row)"})
    correlation: float = field(default=0.5, metadata={
        "help": "strength rho in [0, 1) of the shared factor when correlated"})
    correlation_rank: int = field(default=16, metadata={"help": "number of shared factors when correlated"})
    coefficients: str = field(default="uniform", metadata={
        "help": "distribution of an active feature's coefficient",
        "choices": ("uniform", "exponential", "constant")})
    noise: float = field(default=0.0, metadata={
        "help": "isotropic Gaussian noise, as a fraction of the signal's RMS norm"})
    scale: float | None = field(default=None, metadata={"help": "target mean squared norm E|x|^2 (None: natural)"})

    def __post_init__(self):
        _positive("n_features", self.n_features)
        _positive("d", self.d)
        _positive("mean_active", self.mean_active)
        if self.mean_active > self.n_features:
            raise SparsefeatError(f"mean_active ({self.mean_active}) cannot exceed n_features ({self.n_features})")
        if not 0 < self.decay <= 1:
            raise SparsefeatError(f"decay must be in (0, 1], got {self.decay}")
        if not 0 <= self.correlation < 1:
            raise SparsefeatError(f"correlation must be in [0, 1), got {self.correlation}")
        _positive("correlation_rank", self.correlation_rank)
        if self.coefficients not in COEFFICIENT_MOMENTS:
            raise SparsefeatError(f"coefficients must be one of {', '.join(COEFFICIENT_MOMENTS)}, "
                                  f"got {self.coefficients!r}")
        _positive("noise", self.noise, allow_zero=True)
        _positive("scale", self.scale)


# First and second moments E[c], E[c²] of each coefficient distribution (for the exact scale).
COEFFICIENT_MOMENTS = {"uniform": (0.5, 1 / 3), "exponential": (1.0, 2.0), "constant": (1.0, 1.0)}


def feature_probabilities(n: int, mean_active: float, decay: float) -> np.ndarray:
    """p_i ∝ decay**i, rescaled so that Σ p_i = mean_active with every p_i ≤ 1.

    Rescaling can push the most frequent features above 1; those are clipped to 1 and the rest
    rescaled again until the sum is met (at most n rounds)."""
    w = decay ** np.arange(n, dtype=np.float64)
    p = np.zeros(n)
    fixed = np.zeros(n, dtype=bool)
    for _ in range(n):
        free = ~fixed
        p[free] = w[free] * (mean_active - fixed.sum()) / w[free].sum()
        over = free & (p > 1)
        if not over.any():
            break
        p[over] = 1.0
        fixed |= over
    return p


class Sparse(Toy):
    """Sparse superposition of ground-truth features (the "Sharkey generator" of science.md).

    n_features unit vectors f_i (N(0, I_d), normalised). A row is x = Σ_i a_i c_i f_i + ε with
    a_i ∈ {0, 1} the activity of feature i, c_i its coefficient (`coefficients`: U[0, 1),
    Exp(1) or 1) and ε isotropic Gaussian noise.

    Variant chosen among the public definitions:
    - decay: P(a_i = 1) = p_i ∝ decay**i (λ^i · p form), rescaled so Σ p_i = mean_active exactly
      (clipped at 1), so the expected number of active features is exactly `mean_active`.
    - correlation, drawn per row (not per batch), as a Gaussian copula: z ~ N(0, Σ) with
      Σ = (1 − ρ) I + ρ A Aᵀ (A: `correlation_rank` random unit-norm rows) and a_i = [z_i < Φ⁻¹(p_i)].
      Each feature keeps its marginal probability p_i; features whose rows of A align fire together.
      Without correlation the a_i are independent.
    - noise: ε ~ N(0, σ² I) with σ² = noise² · E‖s‖² / d, i.e. `noise` is the noise-to-signal
      ratio of RMS norms, independent of d and scale.
    Ground truth: `features` [n_features, d] (unit rows) and `probabilities` [n_features].
    """

    name = "sparse"
    Params = SparseParams

    def setup(self, rng):
        p = self.params
        f = rng.standard_normal((p.n_features, p.d))
        self.features = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
        self.probabilities = feature_probabilities(p.n_features, p.mean_active, p.decay)
        self.thresholds = ndtri(self.probabilities)  # a_i = [z_i < Φ⁻¹(p_i)], z_i ~ N(0, 1)
        if p.correlated:
            a = rng.standard_normal((p.n_features, p.correlation_rank))
            self.loadings = a / np.linalg.norm(a, axis=1, keepdims=True)
        self.noise_std = 0.0
        self.signal_power = self._signal_power()
        self.noise_std = p.noise * math.sqrt(self.signal_power / p.d)

    def _signal_power(self) -> float:
        """E‖s‖² of the noiseless signal: exact for independent features, a pilot sample otherwise."""
        p = self.params
        if p.correlated:
            return self.pilot_mean_squared_norm()
        m1, m2 = COEFFICIENT_MOMENTS[p.coefficients]
        f = self.features.astype(np.float64)
        pf = self.probabilities @ f  # E‖s‖² = m2 Σ p_i + m1² Σ_{i≠j} p_i p_j f_i·f_j
        return float(m2 * self.probabilities.sum() + m1 ** 2 * (pf @ pf - (self.probabilities ** 2).sum()))

    def activity(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Which features are active in each of n rows: bool [n, n_features]."""
        p = self.params
        z = rng.standard_normal((n, p.n_features))
        if p.correlated:
            shared = rng.standard_normal((n, p.correlation_rank)) @ self.loadings.T
            z = math.sqrt(1 - p.correlation) * z + math.sqrt(p.correlation) * shared
        return z < self.thresholds

    def coefficients(self, n: int, rng: np.random.Generator) -> np.ndarray:
        shape = (n, self.params.n_features)
        kind = self.params.coefficients
        if kind == "uniform":
            return rng.random(shape, dtype=np.float32)
        if kind == "exponential":
            return rng.standard_exponential(shape, dtype=np.float32)
        return np.ones(shape, dtype=np.float32)

    def draw(self, n, rng):
        c = self.coefficients(n, rng) * self.activity(n, rng)
        x = c @ self.features
        if self.noise_std:
            x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(self.noise_std)
        return x

    def natural_mean_squared_norm(self):
        return self.signal_power * (1 + self.params.noise ** 2)

    def ground_truth(self):
        return {"features": self.features, "probabilities": self.probabilities}


# --------------------------------------------------------------------------------------------
# gmm: a mixture of Gaussians (few "features": the means)
# --------------------------------------------------------------------------------------------


@dataclass
class GmmParams:
    k: int = field(default=12, metadata={"help": "number of mixture components"})
    d: int = field(default=256, metadata={"help": "width of the data"})
    separation: float = field(default=1.0, metadata={
        "help": "typical norm of a component mean (means ~ N(0, separation^2/d I))"})
    spread: float = field(default=0.25, metadata={
        "help": "within-component RMS distance from the mean (isotropic std spread/sqrt(d))"})
    weight_concentration: float | None = field(default=None, metadata={
        "help": "None: equal weights; else weights ~ Dirichlet(this, ..., this)"})
    scale: float | None = field(default=None, metadata={"help": "target mean squared norm E|x|^2 (None: natural)"})

    def __post_init__(self):
        _positive("k", self.k)
        _positive("d", self.d)
        _positive("separation", self.separation, allow_zero=True)
        _positive("spread", self.spread, allow_zero=True)
        _positive("weight_concentration", self.weight_concentration)
        _positive("scale", self.scale)


class Gmm(Toy):
    """Mixture of k isotropic Gaussians (few "features": the k means).

    Pick component j with probability w_j, then x ~ N(μ_j, (spread²/d) I), with means
    μ_j ~ N(0, (separation²/d) I). Ground truth: `means` [k, d] (in stored units) and `weights` [k].
    """

    name = "gmm"
    Params = GmmParams

    def setup(self, rng):
        p = self.params
        self.means = rng.standard_normal((p.k, p.d)) * (p.separation / math.sqrt(p.d))
        if p.weight_concentration is None:
            self.weights = np.full(p.k, 1.0 / p.k)
        else:
            self.weights = rng.dirichlet(np.full(p.k, p.weight_concentration))

    def draw(self, n, rng):
        p = self.params
        component = rng.choice(p.k, size=n, p=self.weights)
        noise = rng.standard_normal((n, p.d)) * (p.spread / math.sqrt(p.d))
        return (self.means[component] + noise).astype(np.float32)

    def natural_mean_squared_norm(self):
        return float(self.weights @ (self.means ** 2).sum(1) + self.params.spread ** 2)

    def ground_truth(self):
        return {"means": self.means * self.factor, "weights": self.weights}


# --------------------------------------------------------------------------------------------
# hypercube / square: a continuous manifold with no sparse structure
# --------------------------------------------------------------------------------------------


@dataclass
class HypercubeParams:
    q: int = field(default=3, metadata={"help": "dimension of the cube"})
    d: int = field(default=256, metadata={"help": "width of the data"})
    noise: float = field(default=0.0, metadata={"help": "std of isotropic Gaussian noise per data dimension, "
                                                        "in cube units (before scaling)"})
    scale: float | None = field(default=None, metadata={"help": "target mean squared norm E|x|^2 (None: natural)"})

    def __post_init__(self):
        _positive("q", self.q)
        _positive("d", self.d)
        if self.q > self.d:
            raise SparsefeatError(f"q ({self.q}) cannot exceed d ({self.d})")
        _positive("noise", self.noise, allow_zero=True)
        _positive("scale", self.scale)


@dataclass
class SquareParams(HypercubeParams):
    q: int = field(default=2, metadata={"help": "dimension of the cube (2: the unit square)"})


class Hypercube(Toy):
    """Uniform points in the unit cube [0, 1]^q, embedded in d dims (a manifold, no sparse structure).

    x = u M + ε with u ~ U[0, 1]^q and M [q, d] = factor · (random orthonormal rows); ε is isotropic
    Gaussian noise. Ground truth: `embedding` M, so u = x Mᵀ / factor² (= x Mᵀ (M Mᵀ)⁻¹) maps a
    noiseless row back into the cube."""

    name = "hypercube"
    Params = HypercubeParams

    def setup(self, rng):
        self.basis = _random_orthonormal_rows(self.params.q, self.params.d, rng)

    def draw(self, n, rng):
        p = self.params
        x = rng.random((n, p.q)) @ self.basis
        if p.noise:
            x += rng.standard_normal(x.shape) * p.noise
        return x.astype(np.float32)

    def natural_mean_squared_norm(self):
        return self.params.q / 3 + self.params.noise ** 2 * self.params.d  # E u_i² = 1/3

    def ground_truth(self):
        return {"embedding": self.basis * self.factor}


class Square(Hypercube):
    """The unit square (q = 2) embedded in d dims: the reviewer's "lots of room in the corners" control."""

    name = "square"
    Params = SquareParams


# --------------------------------------------------------------------------------------------
# gaussian / matched: nulls with no structure beyond second moments
# --------------------------------------------------------------------------------------------


@dataclass
class GaussianParams:
    d: int = field(default=256, metadata={"help": "width of the data"})
    scale: float | None = field(default=None, metadata={"help": "target mean squared norm E|x|^2 (None: d)"})

    def __post_init__(self):
        _positive("d", self.d)
        _positive("scale", self.scale)


class Gaussian(Toy):
    """Isotropic Gaussian N(0, I_d), scaled so E‖x‖² = scale."""

    name = "gaussian"
    Params = GaussianParams

    def draw(self, n, rng):
        return rng.standard_normal((n, self.params.d), dtype=np.float32)

    def natural_mean_squared_norm(self):
        return float(self.params.d)


@dataclass
class MatchedParams:
    source: str | None = field(default=None, metadata={"help": "store whose moments to match (required)"})
    site: str | None = field(default=None, metadata={"help": "site of the source store (default: its only site)"})
    split: str = field(default="train", metadata={"help": "split of the source whose moments are matched",
                                                  "choices": ("train", "test", "all")})

    def __post_init__(self):
        if not self.source:
            raise SparsefeatError("matched needs a source store (--source STORE)")
        self.source = str(Path(self.source).resolve())  # provenance must not depend on the cwd
        if self.split not in ("train", "test", "all"):
            raise SparsefeatError(f"split must be train, test or all, got {self.split!r}")


class Matched(Toy):
    """Gaussian with the mean and covariance of a site of an existing store (the strictest null).

    No sparse structure at all, the same second moments as the source. Sampled as x = μ + g L with L = diag(√w) Vᵀ
    from the eigendecomposition Σ = V diag(w) Vᵀ (negative round-off eigenvalues clipped to 0), which
    works for singular covariances where Cholesky fails. Ground truth: `mean` [d], `covariance` [d, d].
    """

    name = "matched"
    Params = MatchedParams

    def setup(self, rng):
        p = self.params
        with ActivationStore(p.source) as src:
            self.site = p.site or src.default_site()
            self.mean, self.cov = src.moments(self.site, p.split)
            self.source_info = dict(path=p.source, site=self.site, split=p.split, kind=src.kind,
                                    provenance=src.provenance, rows=src.n_rows(p.split))
        w, v = np.linalg.eigh(self.cov)
        self.factor_matrix = (v * np.sqrt(np.clip(w, 0, None))).T  # [d, d]: rows scaled eigenvectors

    @property
    def d(self):
        return int(self.mean.shape[0])

    def draw(self, n, rng):
        g = rng.standard_normal((n, self.d))
        return (self.mean + g @ self.factor_matrix).astype(np.float32)

    def natural_mean_squared_norm(self):
        return float(np.trace(self.cov) + self.mean @ self.mean)

    def ground_truth(self):
        return {"mean": self.mean, "covariance": self.cov}

    def provenance(self):
        return {"source": self.source_info}


# --------------------------------------------------------------------------------------------
# Writing a toy store
# --------------------------------------------------------------------------------------------


def toy_class(kind: str) -> type[Toy]:
    if kind not in TOYS:
        raise SparsefeatError(f"unknown toy {kind!r} (known: {', '.join(TOYS)})")
    return TOYS[kind]


def make_params(kind: str, params: dict, like: dict | None = None):
    """Build a toy's Params from keyword values, refusing unknown keys with the list of valid ones.
    `like` (from `describe_like`) fills `d` and `scale`."""
    cls = toy_class(kind).Params
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise SparsefeatError(f"toy {kind!r} has no parameter {', '.join(unknown)} (valid: {', '.join(valid)})")
    params = dict(params)
    if like is not None:
        if "d" not in valid or "scale" not in valid:
            raise SparsefeatError(f"toy {kind!r} takes its width and scale from its source, not from --like")
        for key in ("d", "scale"):
            if params.get(key) is not None and params[key] != like[key]:
                raise SparsefeatError(f"--like {like['path']} sets {key}={like[key]}, "
                                      f"which conflicts with {key}={params[key]}")
            params[key] = like[key]
    try:
        return cls(**params)
    except TypeError as e:
        raise SparsefeatError(f"toy {kind!r}: {e}") from None


def describe_like(store: str | os.PathLike, site: str | None = None) -> dict:
    """Path, site, width `d` and mean squared norm `scale` (train split) of a store's site: what a
    toy made `like` it copies (recorded in the toy's provenance)."""
    with ActivationStore(store) as s:
        site = site or s.default_site()
        return dict(path=str(Path(store).resolve()), site=site, d=s.width(site),
                    scale=s.mean_squared_norm(site, "train"))


@dataclass(frozen=True)
class ToyConfig:
    """How a toy store is written, whatever the toy (its own parameters are its `Params`): the one
    place `write_toy` and `sparsefeat toy` take their defaults from. Bad values raise `ConfigError`
    when the config is built."""

    n_samples: int = field(default=100_000, metadata={"help": "rows to generate"})
    seed: int = field(default=0, metadata={"help": "seed of the toy's structure, its rows and the train/test split"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of rows held out for the test split"})
    dtype: str = field(default="float32", metadata={"help": "stored dtype", "choices": DTYPES})
    block_rows: int = field(default=8192, metadata={
        "help": "rows generated per block (each block has its own random stream, so this changes the rows)"})

    def __post_init__(self):
        check_int("n_samples", self.n_samples, minimum=1)
        check_int("seed", self.seed)
        check_test_fraction(self.test_fraction)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be {' or '.join(DTYPES)}, not {self.dtype!r}")
        check_int("block_rows", self.block_rows, minimum=1)

    @classmethod
    def split(cls, options: dict, base: ToyConfig | None = None) -> tuple[ToyConfig, dict]:
        """`base` (default: ToyConfig()) with the options that are its fields replaced, and the rest
        (a toy's Params fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in options.items() if k in names}
        return dataclasses.replace(base or cls(), **mine), {k: v for k, v in options.items() if k not in names}


def write_toy(kind: str, out: str | os.PathLike, config: ToyConfig | None = None, *, like: tuple | None = None,
              force: bool = False, resume: bool = False, progress: bool = True, **options) -> Path:
    """Generate `config.n_samples` rows of toy `kind` into the store `out` (site "x"); returns its path.

    `options` are fields of `ToyConfig` (n_samples=..., seed=..., ...), applied on top of `config`,
    and of the toy's Params (e.g. n_features=64, d=32 for "sparse"). `resume=True` continues a
    killed run (same arguments) and gives exactly the rows of an uninterrupted one.
    `like=(store, site)` sets d and scale from an existing store.
    """
    out = Path(out)
    try:
        config, params = ToyConfig.split(options, config)
    except ConfigError as e:
        raise ConfigError(f"{out}: {e}") from None
    n_samples, seed, test_fraction, block_rows = config.n_samples, config.seed, config.test_fraction, config.block_rows
    inputs = [p for p in ((like or (None,))[0], params.get("source")) if p]
    try:  # the store a toy is made like (or matched to) is never the output, even with --force
        check_output(out, force=True, inputs=inputs, allow_existing=True)
    except OutputError as e:
        raise StoreError(str(e)) from None
    try:
        like = describe_like(*like) if like is not None else None
        p = make_params(kind, params, like)
        toy = toy_class(kind)(p, seed)
    except StoreError:
        raise
    except SparsefeatError as e:
        raise SparsefeatError(f"{out}: {e}") from None
    provenance = dict(generator=kind, params=dataclasses.asdict(p), seed=int(seed), n_samples=int(n_samples),
                      block_rows=int(block_rows), package_version=__version__, **toy.provenance())
    if like is not None:
        provenance["like"] = like
    try:
        writer = StoreWriter(out, sites={SITE: toy.d}, provenance=provenance, kind="toy", dtype=config.dtype,
                             split_unit="row", test_fraction=test_fraction, split_seed=seed,
                             resume=resume, force=force)
    except AlreadyComplete:  # killed after its final rename: the store is whole
        return out
    with writer, tqdm(total=n_samples, initial=writer.committed_rows, unit="row", disable=not progress,
                      desc=f"toy {kind}") as bar:
        start = writer.committed_rows
        for b in range(start // block_rows, math.ceil(n_samples / block_rows)):
            lo, hi = b * block_rows, min(n_samples, (b + 1) * block_rows)
            rows = toy.block(b, hi - lo)
            skip = max(0, start - lo)  # only if the committed prefix ends inside this block
            writer.append({SITE: rows[skip:]}, test=split_rows(hi - lo - skip, test_fraction, seed, lo + skip))
            bar.update(hi - lo - skip)
        return writer.close(ground_truth=toy.ground_truth(),
                            attrs=dict(generator=kind, scale_factor=float(toy.factor)))


# --------------------------------------------------------------------------------------------
# circle / sphere: smooth manifolds that SAEs tile (Michaud et al. 2025)
# --------------------------------------------------------------------------------------------


@dataclass
class CircleParams:
    frame: ClassVar[int] = 2  # dimension of the embedding frame (the circle lies in a plane)
    d: int = field(default=256, metadata={"help": "width of the data"})
    noise: float = field(default=0.05, metadata={
        "help": "isotropic Gaussian noise: its RMS norm as a fraction of the radius"})
    scale: float | None = field(default=None, metadata={
        "help": "target mean squared norm E|x|^2, i.e. radius^2 (1 + noise^2) (None: radius 1)"})

    def __post_init__(self):
        _positive("d", self.d)
        if self.d < self.frame:
            raise SparsefeatError(f"d ({self.d}) must be at least {self.frame} for this manifold")
        _positive("noise", self.noise, allow_zero=True)
        _positive("scale", self.scale)


@dataclass
class SphereParams(CircleParams):
    frame: ClassVar[int] = 3  # the 2-sphere spans a 3-frame


class Circle(Toy):
    """Points spread uniformly on a circle, embedded in d dims with small noise (a manifold control).

    x = r · u B + ε with u uniform on the unit circle, B [2, d] a random orthonormal 2-frame, and
    ε ~ N(0, (noise² r² / d) I) (noise = RMS norm of ε as a share of the radius r). `scale` sets
    E‖x‖² = r² (1 + noise²), so r = sqrt(scale / (1 + noise²)); without scale r = 1. There is no
    finite set of features: an SAE tiles the circle with as many latents as it is given (Michaud et
    al. 2025), so a count must not report the tiles as features. Ground truth: `embedding` r · B,
    whose rows span the plane and have the radius as norm."""

    name = "circle"
    Params = CircleParams

    def setup(self, rng):
        self.basis = _random_orthonormal_rows(self.params.frame, self.params.d, rng)

    def _directions(self, n: int, rng: np.random.Generator) -> np.ndarray:
        theta = rng.random(n) * (2 * math.pi)
        return np.stack([np.cos(theta), np.sin(theta)], axis=1)

    def draw(self, n, rng):
        p = self.params
        x = self._directions(n, rng) @ self.basis
        if p.noise:
            x += rng.standard_normal(x.shape) * (p.noise / math.sqrt(p.d))
        return x.astype(np.float32)

    def natural_mean_squared_norm(self):
        return 1.0 + self.params.noise ** 2

    def ground_truth(self):
        return {"embedding": self.basis * self.factor}


class Sphere(Circle):
    """Points spread uniformly on the 2-sphere, embedded in d dims with small noise (a manifold control).

    As `circle`, with u uniform on the unit sphere in a random orthonormal 3-frame B [3, d]."""

    name = "sphere"
    Params = SphereParams

    def _directions(self, n, rng):
        g = rng.standard_normal((n, 3))
        return g / np.linalg.norm(g, axis=1, keepdims=True)
