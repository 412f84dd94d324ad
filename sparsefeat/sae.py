"""Sparse autoencoder architectures: a registry of classes, each training a stack of dictionaries.

A class holds G members of the same dictionary size m that see the same batches (the members of a
sweep that differ only in sparsity or seed). Every parameter has a leading member axis:

    encoder [G, m, d]   encoder_bias [G, m]   decoder [G, m, d] (rows = unit-norm atoms)   decoder_bias [G, d]

Stacking only batches independent computations: member g's numbers are computed with the same
operations whether it trains in a stack of one or of twenty (on CPU the results were bit-identical in
every case we measured; the tests check them to float tolerance), and its loss gradient touches only
its own slice. One `bmm` per product per step instead of G small ones is what makes a sweep of small
dictionaries fast; large float32 products on the CPU run one oneDNN call per member instead, 1.5-2.3x
faster than the BLAS `bmm` (products.py).

Conventions, for every architecture:
- Inputs are in normalised units (the trainer scales them; see train.py).
- MSE = (1/B) Σ_b ‖x_b − x̂_b‖² (summed over dimensions, averaged over rows).
- Decoder rows are held at unit norm: after backward the gradient component parallel to each row is
  removed (`after_backward`), and after the optimiser step rows are renormalised (`after_step`).
- A member's initial weights depend only on (seed, m, d): not on its sparsity setting nor its position
  in the sweep, so members that differ only in sparsity start from the same weights.

Adding an architecture: subclass `SAE`, set `name` and `sparsity_name`, implement `activation`
(pre-activations -> codes) and, if needed, `pre_activations`, `auxiliary_loss` and `penalty`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch

from .errors import ConfigError
from .kernels import SparseCodes, gather_linear, sparse_decode
from .products import stacked_linear

ARCHITECTURES: dict[str, type["SAE"]] = {}


@dataclass
class SAEOptions:
    """Options every architecture shares: how a member's weights start (the single source of their
    defaults). Each architecture's own options subclass this (`ReluL1Options`, `TopKOptions`), as each
    toy owns its `Params`."""

    decoder_init: str = field(default="normal", metadata={
        "help": "initial decoder atoms: 'normal' (Gaussian rows, normalised) or 'orthogonal' "
                "(rows of a random orthogonal matrix; for m > d a tight frame), always unit norm",
        "choices": ("normal", "orthogonal")})
    encoder_init: str = field(default="transpose", metadata={
        "help": "initial encoder: 'transpose' (the decoder's transpose, as Gao et al.) or 'random' "
                "(uniform in ±1/sqrt(d), as torch.nn.Linear)", "choices": ("transpose", "random")})
    encoder_scale: float = field(default=1.0, metadata={
        "help": "the initial encoder rows are scaled by this. 0.1 starts codes near zero: at lr 1e-2 it keeps "
                "larger dictionaries of low-dimensional data from dying (the study's toy sweeps use it); at "
                "lr 3e-3 it left latents dead below the true count of a sparse toy, so 1.0 is the default"})
    pre_bias: str = field(default="median", metadata={
        "help": "initial decoder bias (topk: the bias b subtracted before encoding): 'none' (zeros), "
                "'mean' or 'median' (geometric median) of a sample of training rows",
        "choices": ("none", "mean", "median")})

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        if not self.encoder_scale > 0:
            raise ConfigError(f"encoder_scale must be positive, got {self.encoder_scale}")


@dataclass
class ReluL1Options(SAEOptions):
    """relu-l1's options."""

    decoder_bias: bool = field(default=True, metadata={
        "help": "relu-l1: learn a decoder bias (x̂ = W_d c + b); off gives the report's x̂ = W_d c"})
    l1_reduction: str = field(default="sum", metadata={
        "help": "relu-l1: the L1 term of a row is the 'sum' of |c| over latents (α·mean_b‖c_b‖₁), or the "
                "'mean' over latents (α·mean_b‖c_b‖₁/m, the public replication's choice)",
        "choices": ("sum", "mean")})


@dataclass
class TopKOptions(SAEOptions):
    """topk's options (AuxK, Gao et al. 2024)."""

    auxk_alpha: float = field(default=1 / 32, metadata={"help": "topk: weight of the AuxK loss on dead latents"})
    auxk_k: int = field(default=0, metadata={"help": "topk: latents used by AuxK (0: d/2, at most m)"})
    auxk_dead_rows: int = field(default=200_000, metadata={
        "help": "topk: a latent is dead (and trained by AuxK) after this many training rows without firing"})

    def __post_init__(self):
        super().__post_init__()
        if self.auxk_alpha < 0 or self.auxk_k < 0 or self.auxk_dead_rows <= 0:
            raise ConfigError("auxk_alpha and auxk_k must be >= 0 and auxk_dead_rows > 0")


def member_generator(seed: int, size: int, d: int) -> torch.Generator:
    """The CPU random generator of one member's initial weights: a function of (seed, m, d) only."""
    state = np.random.SeedSequence([int(seed), int(size), int(d)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def geometric_median(x: torch.Tensor, iterations: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising Σ_i ‖x_i − z‖ (Weiszfeld's algorithm in float64), shape [d]."""
    x = x.double()
    z = x.mean(0)
    for _ in range(iterations):
        w = 1.0 / (x - z).norm(dim=1).clamp_min(1e-12)
        z_new = (w[:, None] * x).sum(0) / w.sum()
        if (z_new - z).norm() <= tol * z.norm().clamp_min(1e-12):
            return z_new.float()
        z = z_new
    return z.float()


def pre_bias(sample: torch.Tensor, kind: str) -> torch.Tensor:
    """The initial decoder bias from a sample of (normalised) training rows."""
    if kind == "none":
        return torch.zeros(sample.shape[1])
    if kind == "mean":
        return sample.double().mean(0).float()
    return geometric_median(sample)


def initial_weights(d: int, size: int, seed: int, options: SAEOptions) -> dict[str, torch.Tensor]:
    """One member's initial encoder [m, d] and decoder [m, d] (unit rows), on CPU."""
    g = member_generator(seed, size, d)
    if options.decoder_init == "orthogonal":
        decoder = torch.nn.init.orthogonal_(torch.empty(size, d), generator=g)
    else:
        decoder = torch.randn(size, d, generator=g)
    decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if options.encoder_init == "transpose":
        encoder = decoder.clone()
    else:
        bound = 1.0 / d ** 0.5
        encoder = torch.empty(size, d).uniform_(-bound, bound, generator=g)
    return dict(encoder=encoder * options.encoder_scale, decoder=decoder)


class SAE(torch.nn.Module):
    """A stack of G same-size sparse autoencoders (see the module docstring)."""

    name: ClassVar[str] = ""
    sparsity_name: ClassVar[str] = ""  # what the per-member sparsity setting is: "l1" or "k"
    Options: ClassVar[type[SAEOptions]] = SAEOptions  # this architecture's options

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            if cls.name in ARCHITECTURES:  # a silent overwrite would swap the class every sweep uses
                raise ConfigError(f"architecture {cls.name!r} is already registered "
                                  f"({ARCHITECTURES[cls.name].__qualname__}); choose another name")
            ARCHITECTURES[cls.name] = cls

    @classmethod
    def build_options(cls, given: SAEOptions | dict | None = None) -> SAEOptions:
        """This architecture's options from a dict (unknown keys refused), from the shared base options
        (the rest at their defaults), or the defaults."""
        if isinstance(given, cls.Options):
            return given
        if isinstance(given, SAEOptions):
            given = {f.name: getattr(given, f.name) for f in fields(SAEOptions)}
        given = dict(given or {})
        known = {f.name for f in fields(cls.Options)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"{cls.name or cls.__name__} has no option {unknown[0]!r} (its options: "
                              f"{', '.join(sorted(known))})")
        return cls.Options(**given)

    def __init__(self, d: int, size: int, sparsities: list[float], seeds: list[int],
                 options: SAEOptions | dict | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        if len(sparsities) != len(seeds) or not seeds:
            raise ValueError("one sparsity setting per seed, at least one member")
        self.d, self.size, self.options = d, size, self.build_options(options)
        self.sparsities, self.seeds = [float(s) for s in sparsities], [int(s) for s in seeds]
        inits = [initial_weights(d, size, s, self.options) for s in seeds]
        G = len(seeds)
        self.encoder = torch.nn.Parameter(torch.stack([w["encoder"] for w in inits]))
        self.encoder_bias = torch.nn.Parameter(torch.zeros(G, size))
        self.decoder = torch.nn.Parameter(torch.stack([w["decoder"] for w in inits]))
        b = torch.zeros(G, d) if bias is None else bias.float().reshape(1, d).repeat(G, 1)
        if self.uses_decoder_bias():
            self.decoder_bias = torch.nn.Parameter(b)
        else:
            self.register_buffer("decoder_bias", torch.zeros(G, d))
        self.register_buffer("sparsity", torch.tensor(self.sparsities))
        # training steps this stack took, and the step (1-based) on which each latent last fired (0: never),
        # updated on the device inside the step: separates latents never alive from those that died later
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_fired", torch.zeros(G, size, dtype=torch.long))

    def uses_decoder_bias(self) -> bool:
        """Whether the decoder bias is learned (otherwise it is a zero buffer)."""
        return True

    @property
    def members(self) -> int:
        return self.encoder.shape[0]

    # -- the model -------------------------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [G, B, m]: W_e x + b_e for every member (products.py).

        (One [B, d] x [d, G·m] matmul is no faster on CPU, and its rounding depends on G for small m;
        a per-member product computes each member's slice exactly as a stack of one would.)"""
        return stacked_linear(x, self.encoder, self.encoder_bias)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """[G, B, m] pre-activations -> codes."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[G, B, m] -> [G, B, d]: x̂ = W_d c + b."""
        return stacked_linear(codes, self.decoder, self.decoder_bias, transposed=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encode(x)
        return self.decode(codes), codes

    # -- losses (all per member, shape [G]) --------------------------------------------------------

    def penalty(self, codes: torch.Tensor) -> torch.Tensor:
        """The sparsity term of the objective, per member; zero for architectures without one."""
        return torch.zeros(codes.shape[0], device=codes.device)

    def losses(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """mse, penalty and loss = mse + penalty, per member (the objective, without auxiliary terms)."""
        mse = (x_hat.float() - x).pow(2).sum(-1).mean(-1)
        penalty = self.penalty(codes)
        return dict(mse=mse, penalty=penalty, loss=mse + penalty)

    def auxiliary_loss(self, x, x_hat, fired, pre, pick) -> torch.Tensor | None:
        """Training-only extra terms (e.g. AuxK), per member; None when there are none. Called once per
        training step, so it may also update training-time state (topk's dead-latent counters).
        `fired` [G, m]: latents that fired in this batch; `pre` [G, B, m]: the pre-activations (without
        autograd on the sparse path); `pick(codes: SparseCodes)`: the pre-activations at those
        entries [N], differentiable in the encoder on either path."""
        return None

    # which path `training_loss` takes: "auto" (sparse where `sparse_pays` says so), "dense" or "sparse";
    # not an option, since both give the same numbers to float tolerance (tests/test_sae.py)
    kernel: str = "auto"

    def sparse_pays(self, bf16: bool) -> bool:
        """Whether the sparse training path (kernels.py) is faster here; False where there is none.
        `bf16`: the step runs under bfloat16 autocast, where the dense matmuls are 2-3x faster and the
        gathers of the sparse path are not, so it pays only at sparser codes."""
        return False

    # Below this many multiply-adds per member in one product (rows × m × d) a step is made of its fixed
    # costs, and the sparse path's extra operations lose: on 2 CPU cores, 6 members, batch 256, sparse was
    # 1.1-1.9x slower at d=32 (m=32..256, B·m·d up to 2.1M), tied at d=384, m=64 (6.3M) and won from
    # m=128 (12.6M: 1.4x) (RESULTS.md, 2026-12-02)
    SPARSE_MIN_WORK: ClassVar[int] = 2**23

    def use_sparse(self, rows: int | None = None) -> bool:
        """Whether `training_loss` takes the sparse path (on a batch of `rows` rows, if given)."""
        if self.kernel == "auto":
            if rows is not None and self.too_small_for_sparse(rows):
                return False
            # torch.compile traces the dense path: its graphs do not take sparse COO tensors
            return self.sparse_pays(self.under_bf16()) and not torch.compiler.is_compiling()
        return self.kernel == "sparse"

    def too_small_for_sparse(self, rows: int) -> bool:
        return rows * self.size * self.d < self.SPARSE_MIN_WORK

    def under_bf16(self) -> bool:
        device = self.encoder.device.type
        return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over members of the training loss, to backpropagate; detached objective per member)."""
        if self.use_sparse(x.shape[0]):
            return self.sparse_training_loss(x)
        return self.dense_training_loss(x, self.pre_activations(x))

    def dense_training_loss(self, x: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`training_loss` on the dense path, from the pre-activations (with autograd)."""
        codes, penalty = self.codes_and_penalty(pre)
        x_hat = self.decode(codes)
        with torch.no_grad():
            # the density only picks the path (`sparse_pays`), and a slice of rows tells it: counting all
            # [G, B, m] codes cast them to int64 first (14 ms of a 155 ms step at B=4096, m=1536)
            nonzero = codes[:, :512] > 0
            self.note_density(nonzero.sum(), nonzero.numel())
            fired = codes.amax(dim=1) > 0  # codes are ≥ 0 in every architecture
        return self.objective(x, x_hat, penalty, fired, pre, lambda at: at.gather(pre))

    def codes_and_penalty(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense path's codes [G, B, m] and sparsity term [G] from the pre-activations."""
        codes = self.activation(pre)
        return codes, self.penalty(codes)

    def sparse_training_loss(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`training_loss` on the sparse path; `pre`: the pre-activations if already computed (detached)."""
        raise NotImplementedError(f"{self.name} has no sparse training path")

    # fraction of the last training batch's codes that were non-zero: read every step where that costs
    # no wait (CPU), else at logging intervals (`on_log`); relu-l1 chooses its path by it
    density: float = 1.0

    def note_density(self, nonzero, total: int) -> None:
        self._density = nonzero
        self._density_total = total
        if isinstance(nonzero, int) or (nonzero.device.type == "cpu" and not torch.compiler.is_compiling()):
            self.density = int(nonzero) / total

    def objective(self, x, x_hat, penalty, fired, pre, pick) -> tuple[torch.Tensor, torch.Tensor]:
        """`training_loss`'s result from either path: `penalty` [G] the sparsity term, `fired` [G, m]
        which latents fired in this batch; `pre`, `pick` as `auxiliary_loss` takes them."""
        with torch.no_grad():
            self.train_steps.add_(1)
            self.last_fired.copy_(torch.where(fired, self.train_steps, self.last_fired))
        loss = (x_hat.float() - x).pow(2).sum(-1).mean(-1) + penalty  # as `losses`
        aux = self.auxiliary_loss(x, x_hat, fired, pre, pick)
        total = loss.sum() if aux is None else (loss + aux).sum()
        return total, loss.detach()

    # -- the unit-norm constraint ------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self) -> None:
        """Remove the gradient component parallel to each decoder row (it would only change its norm)."""
        g, w = self.decoder.grad, self.decoder
        if g is not None:
            g.sub_((g * w).sum(-1, keepdim=True) * w)

    @torch.no_grad()
    def after_step(self) -> None:
        """Renormalise decoder rows to unit norm after the optimiser step."""
        self.decoder.div_(self.decoder.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def reinitialise(self, g: int, latents: torch.Tensor, directions: torch.Tensor, encoder_scale: float) -> None:
        """Member g's `latents` start again (dead-latent resampling): decoder rows = the unit `directions`
        [k, d], encoder rows = the same directions × `encoder_scale`, encoder bias 0."""
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.decoder[g, latents] = directions
        self.encoder[g, latents] = directions * encoder_scale
        self.encoder_bias[g, latents] = 0.0

    def on_log(self) -> None:
        """Called at logging intervals (where the host may synchronise); for slow-changing state."""
        if getattr(self, "_density", None) is not None:
            self.density = int(self._density) / self._density_total

    # -- export ----------------------------------------------------------------------------------

    def member_weights(self, g: int) -> dict[str, np.ndarray]:
        """Member g's weights as float32 numpy arrays (decoder rows = unit-norm atoms)."""
        return {name: getattr(self, name)[g].detach().float().cpu().numpy()
                for name in ("encoder", "encoder_bias", "decoder", "decoder_bias")}


class ReluWithL1(torch.autograd.Function):
    """codes = ReLU(pre) [G, B, m] and l1 = Σ_b ‖codes_b‖₁ / B per member [G] (float32) together, so the
    backward is one pass, g_pre = (g_codes + g_l1 / B) · [pre > 0], where autograd would cast, expand and
    add the L1 term's gradient in passes of its own (2-4 ms each at B=4096, m=1536 on 2 cores)."""

    @staticmethod
    def forward(ctx, pre):
        codes = pre.relu()
        ctx.save_for_backward(codes)
        # per-row sums in the codes' dtype, then float32: a float32 sum of bf16 codes casts them all first
        return codes, codes.sum(-1).float().sum(-1) / pre.shape[1]

    @staticmethod
    def backward(ctx, g_codes, g_l1):
        (codes,) = ctx.saved_tensors
        if g_codes is None:
            g_codes = torch.zeros_like(codes)
        if g_l1 is None:
            return torch.ops.aten.threshold_backward(g_codes, codes, 0)  # zero where codes = 0, i.e. pre ≤ 0
        # the sum is a new tensor of our own, so the mask goes on in place: one [G, B, m] temporary, not
        # two (at m=6144, batch 4096, 100 MB less at the step's peak)
        g_pre = g_codes + (g_l1 / codes.shape[1]).to(g_codes.dtype)[:, None, None]
        return torch.ops.aten.threshold_backward.grad_input(g_pre, codes, 0, grad_input=g_pre)


class ReluL1(SAE):
    """The report's SAE: c = ReLU(W_e x + b_e), x̂ = W_d c (+ b if `decoder_bias`), untied weights.

    loss = MSE + α · L1, L1 = (1/B) Σ_b ‖c_b‖₁ (`l1_reduction="sum"`, the default) or that divided by
    m (`"mean"`, the public replication's choice). Decoder rows have unit norm, so ‖c‖₁ cannot shrink
    by growing atoms.

    Why "sum" is the default: what makes one α mean the same at every size is that both terms are in
    the units of the (normalised) data and independent of m. Once m exceeds the number of features,
    a sparse code of a row needs the same ‖c‖₁ whatever m is, so the per-row sum keeps the trade-off
    fixed; dividing by m weakens the penalty m-fold, and larger dictionaries become much denser. On
    the `sparse` toy (64 features in d = 32, 5 active; 5000 steps) with "sum" and α = 0.4 the test
    L0 was 4.1, 5.4, 6.3 at m = 64, 128, 256; with "mean" and α = 30 (the same penalty at m = 64),
    4.5, 11.7, 28 (2000 steps), and MMCS with the truth fell from 0.95 to 0.70 at m = 256.
    """

    name = "relu-l1"
    sparsity_name = "l1"
    Options = ReluL1Options

    def uses_decoder_bias(self) -> bool:
        return self.options.decoder_bias

    def activation(self, pre):
        return pre.relu()

    def penalty(self, codes):
        l1 = codes.float().sum(-1).mean(-1)  # codes ≥ 0 after ReLU, so Σ c = ‖c‖₁
        if self.options.l1_reduction == "mean":
            l1 = l1 / self.size
        return self.sparsity * l1

    def codes_and_penalty(self, pre):
        """As `penalty(activation(pre))`, with a backward of one pass over [G, B, m] (`ReluWithL1`)."""
        codes, l1 = ReluWithL1.apply(pre)
        if self.options.l1_reduction == "mean":
            l1 = l1 / self.size
        return codes, self.sparsity * l1

    # Measured on 2 quiet CPU cores (benchmarks/bench_sparse.py, d=384, batch 4096; RESULTS.md 2026-12-02):
    # float32, with the dense products on oneDNN (products.py), the sparse step is 1.2-1.4x the dense one
    # at L0/m = 0.06 and 0.9-1.1x at 0.09 (m=1536, 6144); under bf16 autocast (2026-12-01 late) 1.0-1.3x
    # at 0.02 and 0.8-1.1x at 0.03
    SPARSE_MAX_DENSITY: ClassVar[float] = 1 / 12
    SPARSE_MAX_DENSITY_BF16: ClassVar[float] = 1 / 48

    def sparse_pays(self, bf16):
        """Sparse once the codes are sparse enough (L0/m): early in training, with about half the
        latents on, the dense path is faster."""
        return self.density <= (self.SPARSE_MAX_DENSITY_BF16 if bf16 else self.SPARSE_MAX_DENSITY)

    def training_loss(self, x):
        """On the CPU the path follows this batch's own density, read from the pre-activations both paths
        start from: the choice is then a function of the weights and the batch, so a resumed run takes
        every step on the path the uninterrupted run took (and gets its numbers bit for bit). On a GPU
        reading it would make the host wait, so the density last read at a logging interval decides."""
        if (self.kernel != "auto" or x.device.type != "cpu" or torch.compiler.is_compiling()
                or self.too_small_for_sparse(x.shape[0])):
            return super().training_loss(x)
        pre = self.pre_activations(x)
        with torch.no_grad():
            nonzero = pre[:, :512] > 0  # a slice of rows tells the density (see the dense path)
            self.note_density(nonzero.sum(), nonzero.numel())
        if self.sparse_pays(self.under_bf16()):
            return self.sparse_training_loss(x, pre.detach())
        return self.dense_training_loss(x, pre)

    def sparse_training_loss(self, x, pre=None):
        """The training step on the positive codes only, after the dense encoder matmul (kernels.py)."""
        with torch.no_grad():
            pre = self.pre_activations(x) if pre is None else pre
            codes = SparseCodes.from_mask(pre > 0)
        self.note_density(codes.latents.numel(), pre.numel())

        def pick(at):
            return gather_linear(x[None], self.encoder, self.encoder_bias, pre, at)

        values = pick(codes)  # all positive: the ReLU passes them (and their gradient) unchanged
        x_hat = sparse_decode(values, codes, self.decoder, self.decoder_bias)
        l1 = codes.per_member_sum(values.float()) / x.shape[0]
        if self.options.l1_reduction == "mean":
            l1 = l1 / self.size
        return self.objective(x, x_hat, self.sparsity * l1, codes.fired(values.detach()), pre, pick)


class TopK(SAE):
    """Gao et al. (2024): z = TopK(ReLU(W_e (x − b) + b_e)), x̂ = W_d z + b, loss = MSE (+ AuxK).

    TopK keeps the k largest pre-activations of each row (ReLU applied, so codes are ≥ 0 and L0 ≤ k).
    AuxK: latents that have not fired for `auxk_dead_rows` training rows are dead; the k_aux largest
    dead pre-activations reconstruct the residual e = x − x̂ (detached):
    L_aux = mean_b ‖e_b − W_d z_aux,b‖² / mean_b ‖e_b‖², added with weight `auxk_alpha`.
    Whether any latent is dead is checked at logging intervals only, so the step loop never waits for
    the device; AuxK runs from the next interval on.
    """

    name = "topk"
    sparsity_name = "k"
    Options = TopKOptions

    def __init__(self, d, size, sparsities, seeds, options, bias=None):
        ks = [int(k) for k in sparsities]
        if any(k != s or k < 1 for k, s in zip(ks, sparsities)):
            raise ValueError(f"topk needs positive whole k, got {sparsities}")
        super().__init__(d, size, ks, seeds, options, bias)
        self.ks = [min(k, size) for k in ks]  # k ≥ m keeps every latent: no sparsity, but well defined
        self.k_max = max(self.ks)
        self.k_aux = min(self.options.auxk_k or max(1, d // 2), size)
        # rank r of member g's top-k list is kept iff r < k_g (members of one stack may differ in k)
        self.register_buffer("rank_mask", (torch.arange(self.k_max)[None, :] < torch.tensor(self.ks)[:, None])
                             .float()[:, None, :])
        self.register_buffer("rows_since_fired", torch.zeros(len(seeds), size, dtype=torch.long))
        self.auxk_active = False

    def pre_activations(self, x):
        centred = x[None] - self.decoder_bias[:, None, :]
        return stacked_linear(centred, self.encoder, self.encoder_bias)

    def activation(self, pre):
        values, index = self.top_latents(pre.relu())
        return torch.zeros_like(pre).scatter_(-1, index, values)

    def top_latents(self, pre_relu):
        """The kept (values, latents) [G, B, k_max] of ReLU'd pre-activations; ranks past a member's k
        hold value 0."""
        same_k = len(set(self.ks)) == 1
        values, index = pre_relu.topk(self.k_max, dim=-1, sorted=not same_k)
        if not same_k:
            values = values * self.rank_mask
        return values, index

    # Measured (benchmarks/bench_sparse.py, 2 quiet CPU cores, d=384, batch 4096; RESULTS.md 2026-12-02):
    # float32, with the dense products on oneDNN (products.py), the sparse step is 1.3x the dense one at
    # k/m = 1/12 and 0.95x at 1/8 (m=1536; at m=6144 2x at k/m = 1/24); under bf16 autocast (2026-12-01
    # late) 1.4x at k/m = 1/48 and 1.05x at 1/24 (m=1536; more at m=6144)
    SPARSE_MAX_FRACTION: ClassVar[float] = 1 / 10
    SPARSE_MAX_FRACTION_BF16: ClassVar[float] = 1 / 32

    def sparse_pays(self, bf16):
        return self.k_max <= (self.SPARSE_MAX_FRACTION_BF16 if bf16 else self.SPARSE_MAX_FRACTION) * self.size

    def sparse_training_loss(self, x, pre=None):
        """The training step on the kept latents only, after the dense encoder matmul (kernels.py)."""
        centred = x[None] - self.decoder_bias[:, None, :]
        with torch.no_grad():
            pre = stacked_linear(centred, self.encoder, self.encoder_bias) if pre is None else pre
            codes = SparseCodes.from_top(self.top_latents(pre.relu())[1], self.size)

        def pick(at):
            return gather_linear(centred, self.encoder, self.encoder_bias, pre, at)

        values = pick(codes).relu()
        if len(set(self.ks)) > 1:
            values = values * self.rank_mask.expand(-1, x.shape[0], -1).reshape(-1)
        x_hat = sparse_decode(values, codes, self.decoder, self.decoder_bias)
        penalty = torch.zeros(pre.shape[0], device=x.device)
        return self.objective(x, x_hat, penalty, codes.fired(values.detach()), pre, pick)

    def auxiliary_loss(self, x, x_hat, fired, pre, pick):
        with torch.no_grad():
            self.rows_since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
        if not self.auxk_active or self.options.auxk_alpha == 0:
            return None
        dead = (self.rows_since_fired >= self.options.auxk_dead_rows)[:, None, :]
        with torch.no_grad():
            index = (pre.detach().relu() * dead).topk(self.k_aux, dim=-1, sorted=False).indices
            alive = dead.expand(-1, x.shape[0], -1).gather(-1, index).reshape(-1)
        # the k_aux largest dead pre-activations (0 where fewer are positive), decoded without the bias
        at = SparseCodes.from_top(index, self.size)
        e_hat = sparse_decode(pick(at).relu() * alive, at, self.decoder)
        e = (x - x_hat).detach().float()
        aux = (e_hat.float() - e).pow(2).sum(-1).mean(-1) / e.pow(2).sum(-1).mean(-1).clamp_min(1e-12)
        return self.options.auxk_alpha * aux

    def on_log(self) -> None:
        super().on_log()
        self.auxk_active = bool((self.rows_since_fired >= self.options.auxk_dead_rows).any())

    def get_extra_state(self):
        return {"auxk_active": self.auxk_active}

    def set_extra_state(self, state):
        self.auxk_active = bool(state["auxk_active"])


def architecture(name: str) -> type[SAE]:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]
