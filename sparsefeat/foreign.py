"""SAEs trained elsewhere, read from their files and evaluated on a store's held-out rows.

Read directly (safetensors + JSON; neither library is imported):

- SAELens (`cfg.json` + `sae_weights.safetensors`; architectures standard, topk, jumprelu):
  W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d] (+ threshold [m] for jumprelu);
  z = (x − b_dec if apply_b_dec_to_input else x)·W_enc + b_enc, codes = ReLU(z) (standard),
  TopK(z) then ReLU (topk), ReLU(z)·[z > threshold] (jumprelu); x̂ = codes·W_dec + b_dec.
- sparsify (`cfg.json` + `sae.safetensors`, activation topk): encoder.weight [m, d], encoder.bias [m],
  W_dec [m, d], b_dec [d]; codes = TopK(ReLU(encoder(x − b_dec))), x̂ = codes·W_dec + b_dec.

Both libraries report their metrics on the rows they train on (SAELens #446, sparsify #100/#130);
`evaluate_foreign` reports ours (FVU, MSE, L0, dead fraction, shrinkage: `evaluate.evaluate_stacks`)
on the store's test split, and can write a one-member results file that `count` and `plot` read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import SparsefeatError
from .evaluate import evaluate_stacks, take_rows

SAELENS_ARCHS = ("standard", "topk", "jumprelu")
EVAL_SEED = 104729  # the fixed train sample evaluated beside the test split (as the sweep's)


class ForeignError(SparsefeatError):
    """A folder is not an SAE we can read (missing files, unknown architecture, bad config or tensors)."""


@dataclass
class ForeignSAE:
    """An SAE of another library on raw rows: encode [B, d] -> [B, m], decode [B, m] -> [B, d]."""

    path: Path
    library: str  # "saelens" or "sparsify"
    arch: str  # "standard", "topk" or "jumprelu"
    W_enc: torch.Tensor  # [d, m]
    b_enc: torch.Tensor  # [m]
    W_dec: torch.Tensor  # [m, d]
    b_dec: torch.Tensor  # [d]
    subtract_b_dec: bool = True
    k: int | None = None
    threshold: torch.Tensor | None = None  # [m], jumprelu
    relu_before_topk: bool = False  # sparsify: TopK(ReLU(z)); SAELens: ReLU(TopK(z)) (same kept values)
    cfg: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.W_enc.shape[0]

    @property
    def size(self) -> int:
        return self.W_enc.shape[1]

    @property
    def hook_name(self) -> str | None:
        return (self.cfg.get("metadata") or {}).get("hook_name") or self.cfg.get("hookpoint")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        z = (x - self.b_dec if self.subtract_b_dec else x) @ self.W_enc + self.b_enc
        if self.arch == "standard":
            return z.relu()
        if self.arch == "jumprelu":
            return z.relu() * (z > self.threshold).to(z.dtype)
        values, index = (z.relu() if self.relu_before_topk else z).topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(z).scatter_(-1, index, values.relu())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(codes, dtype=torch.float32) @ self.W_dec + self.b_dec

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encode(x)
        return self.decode(codes), codes

    def describe(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"{self.library} {self.arch} SAE, d={self.d}, m={self.size}{k}"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_foreign(folder: str | os.PathLike) -> ForeignSAE:
    """Read a SAELens or sparsify SAE folder (which one: by its weights file name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ForeignError(f"{folder}: not a folder (give the folder holding cfg.json and the weights)")
    cfg = _read_cfg(folder)
    if (folder / "sae_weights.safetensors").is_file():
        return _saelens(folder, cfg, _read_tensors(folder / "sae_weights.safetensors"))
    if (folder / "sae.safetensors").is_file():
        return _sparsify(folder, cfg, _read_tensors(folder / "sae.safetensors"))
    raise ForeignError(f"{folder}: has neither sae_weights.safetensors (SAELens) nor sae.safetensors (sparsify)")


def _read_cfg(folder: Path) -> dict:
    path = folder / "cfg.json"
    if not path.is_file():
        raise ForeignError(f"{path}: missing (a SAELens or sparsify SAE folder has cfg.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ForeignError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ForeignError(f"{path}: expected a JSON object")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ForeignError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return {k: v.float() for k, v in tensors.items()}


def _int(cfg: dict, key: str, path: Path) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ForeignError(f"{path / 'cfg.json'}: {key} must be a positive integer, got {v!r}")
    return v


def _tensors(path: Path, tensors: dict, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The named tensors with their expected shapes, finite; one line for the first that is not."""
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise ForeignError(f"{path}: has no tensor {missing[0]!r} (has: {', '.join(sorted(tensors))})")
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != shape:
            raise ForeignError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, expected {shape} (from cfg.json)")
        if not torch.isfinite(tensors[k]).all():
            raise ForeignError(f"{path}: {k} holds NaN or Inf values")
    return {k: tensors[k] for k in shapes}


def _saelens(folder: Path, cfg: dict, tensors: dict) -> ForeignSAE:
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_ARCHS:
        raise ForeignError(f"{folder / 'cfg.json'}: SAELens architecture {arch!r} is not supported "
                           f"(supported: {', '.join(SAELENS_ARCHS)})")
    d, m = _int(cfg, "d_in", folder), _int(cfg, "d_sae", folder)
    for key, ok in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, ok) != ok:
            raise ForeignError(f"{folder / 'cfg.json'}: {key}={cfg[key]!r} is not supported (only {ok!r}; "
                               "fold the normalisation into the weights before saving)")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ForeignError(f"{folder / 'cfg.json'}: rescale_acts_by_decoder_norm=true is not supported")
    shapes = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
    if arch == "jumprelu":
        shapes["threshold"] = (m,)
    t = _tensors(folder / "sae_weights.safetensors", tensors, shapes)
    k = _int(cfg, "k", folder) if arch == "topk" else None
    return ForeignSAE(path=folder, library="saelens", arch=arch, W_enc=t["W_enc"], b_enc=t["b_enc"],
                      W_dec=t["W_dec"], b_dec=t["b_dec"], subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
                      k=None if k is None else min(k, m), threshold=t.get("threshold"), cfg=cfg)


def _sparsify(folder: Path, cfg: dict, tensors: dict) -> ForeignSAE:
    where = folder / "cfg.json"
    if cfg.get("activation", "topk") != "topk":
        raise ForeignError(f"{where}: sparsify activation {cfg['activation']!r} is not supported (only 'topk')")
    for key in ("skip_connection", "transcode", "multi_topk"):
        if cfg.get(key):
            raise ForeignError(f"{where}: {key}=true is not supported")
    d, k = _int(cfg, "d_in", folder), _int(cfg, "k", folder)
    if "encoder.weight" not in tensors:
        raise ForeignError(f"{folder / 'sae.safetensors'}: has no tensor 'encoder.weight' "
                           f"(has: {', '.join(sorted(tensors))})")
    m = cfg.get("num_latents") or tensors["encoder.weight"].shape[0]
    t = _tensors(folder / "sae.safetensors", tensors,
                 {"encoder.weight": (m, d), "encoder.bias": (m,), "W_dec": (m, d), "b_dec": (d,)})
    return ForeignSAE(path=folder, library="sparsify", arch="topk", W_enc=t["encoder.weight"].T.contiguous(),
                      b_enc=t["encoder.bias"], W_dec=t["W_dec"], b_dec=t["b_dec"], subtract_b_dec=True,
                      k=min(k, m), relu_before_topk=True, cfg=cfg)


# --------------------------------------------------------------------------------------------
# Evaluating
# --------------------------------------------------------------------------------------------


class _NormalisedStack(torch.nn.Module):
    """A foreign SAE as a stack of one for `evaluate_stacks`: normalised rows in, normalised x̂ out."""

    members = 1

    def __init__(self, sae: ForeignSAE, scale: float):
        super().__init__()
        self.sae, self.scale = sae, scale

    def forward(self, x_n):
        x_hat, codes = self.sae(x_n / self.scale)
        return (x_hat * self.scale)[None], codes[None]

    def penalty(self, codes):
        return torch.zeros(1)  # the foreign objective's penalty is unknown: "loss" is the MSE


@dataclass
class ForeignEvaluation:
    sae: ForeignSAE
    site: str
    scale: float  # normalisation scale of the reported MSE (the sweep's with --against)
    metrics: dict[str, dict[str, float]]  # split -> metric name -> value
    row_sse: dict[str, np.ndarray]
    frequency: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)


def evaluate_foreign(sae: ForeignSAE | str | os.PathLike, store_path: str | os.PathLike, *,
                     site: str | None = None, scale: float | None = None, batch_size: int = 4096,
                     data_seed: int = 0) -> ForeignEvaluation:
    """Our metrics of a foreign SAE on the store's test split (and on a train sample of the same size)."""
    from .store import ActivationStore
    sae = sae if isinstance(sae, ForeignSAE) else load_foreign(sae)
    with ActivationStore(store_path) as store:
        site = site or store.default_site()
        d = store.width(site)
        if d != sae.d:
            raise ForeignError(f"{sae.path}: the SAE takes d={sae.d} but site {site!r} of {store_path} has d={d}")
        n_test = store.n_rows("test")
        if n_test == 0:
            raise ForeignError(f"{store_path}: has no test split to evaluate on")
        if scale is None:
            scale = 1.0 / math.sqrt(store.mean_squared_norm(site, "train"))
        stack = _NormalisedStack(sae, scale)
        out: dict[str, dict] = {"metrics": {}, "row_sse": {}, "frequency": {}}
        for split in ("train", "test"):
            if split == "test":
                stream = store.batches(site, "test", batch_size, shuffle=False, epochs=1)
            else:
                stream = take_rows(store.batches(site, "train", batch_size, seed=data_seed + EVAL_SEED, epochs=1),
                                   n_test)
            e = evaluate_stacks([stack], stream, scale)[0]
            out["metrics"][split] = dict({k: float(v[0]) for k, v in e.metrics.items()}, rows=int(e.rows))
            out["row_sse"][split], out["frequency"][split] = e.row_sse[0], e.frequency[0]
    return ForeignEvaluation(sae=sae, site=site, scale=float(scale), **out)


def write_foreign_results(ev: ForeignEvaluation, store_path: str | os.PathLike, out: str | os.PathLike, *,
                          force: bool = False) -> Path:
    """A one-member results file of a foreign SAE (format of docs/format.md), for `count` and `plot`.

    The member's arch is `<library>-<arch>` (e.g. saelens-topk; `load_sae` does not rebuild these), its
    seed 0 (it has no seed pair: `count` says N(m) needs two seeds). Weights in normalised units:
    decoder = the unit rows of W_dec, decoder_bias = b_dec·scale, encoder = W_encᵀ/scale (so that
    encoder·x_n = W_encᵀx), encoder_bias = b_enc."""
    from .results import Member, MemberArrays, Results, SIGNAL_KEYS, write_results
    from .store import ActivationStore
    from .train import store_fingerprint
    sae = ev.sae
    m = sae.size
    sparsity_name, sparsity = ("k", float(sae.k)) if sae.arch == "topk" else ("none", 0.0)
    member_id = f"m={m},{sparsity_name}={sparsity:g},seed=0"
    norms = sae.W_dec.norm(dim=1, keepdim=True)
    arrays = MemberArrays(encoder=(sae.W_enc.T / ev.scale).numpy(), encoder_bias=sae.b_enc.numpy(),
                          decoder=(sae.W_dec / norms.clamp_min(1e-12)).numpy(),
                          decoder_bias=(sae.b_dec * ev.scale).numpy(), row_sse=ev.row_sse, frequency=ev.frequency)
    member = Member(id=member_id, arch=f"{sae.library}-{sae.arch}", dictionary_size=m, sparsity_name=sparsity_name,
                    sparsity=sparsity, seed=0, metrics=ev.metrics, signals={k: math.nan for k in SIGNAL_KEYS})
    with ActivationStore(store_path) as store:
        tokens = store.tokens()
        docs = (np.asarray(tokens["doc"])[store.split_mask("test")]
                if tokens is not None and "doc" in tokens else None)
        r = Results(path=Path(out), label=f"{sae.path.name} ({sae.library} {sae.arch})", site=ev.site, d=sae.d,
                    store_path=str(Path(store.path).resolve()), store_kind=store.kind or "",
                    store_provenance=store.provenance, store_hash=store_fingerprint(store, ev.site),
                    config={"foreign": {"library": sae.library, "path": str(sae.path.resolve()), "cfg": sae.cfg},
                            "model": {}},
                    members=[member], ground_truth=store.ground_truth.get("features"),
                    normalisation_scale=ev.scale, test_documents=docs)
    return write_results(out, r, {member_id: arrays}, force=force)
