"""One trained member of a results file as a ready-to-use module: `load_sae(results, member_id)`.

The trainer feeds its dictionaries inputs scaled by the file's `normalisation_scale` (E‖x‖² = 1 on a
training sample). A loaded SAE takes and returns raw store rows and applies that scale itself, so

    sae = load_sae("sweep.h5", "m=64,l1=0.3,seed=0")
    codes = sae.encode(x)          # [B, m], x raw rows [B, d] of the store the sweep trained on
    x_hat = sae.decode(codes)      # [B, d], raw units
    x_hat, codes = sae(x)

reproduce exactly what the trainer computed (codes in the trainer's units; x̂ = trainer's x̂ / scale).
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch

from .results import Member, Results, load_results
from .sae import SAE, architecture


class LoadedSAE(torch.nn.Module):
    """One member of a sweep, on raw (unnormalised) rows. `stack` is the trained architecture module
    (a stack of one member, normalised units); `normalisation_scale` maps raw rows to its inputs."""

    def __init__(self, stack: SAE, normalisation_scale: float, member: Member, site: str):
        super().__init__()
        self.stack, self.member, self.site = stack, member, site
        self.normalisation_scale = float(normalisation_scale)

    @property
    def d(self) -> int:
        return self.stack.d

    @property
    def size(self) -> int:
        return self.stack.size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw rows [B, d] -> codes [B, m] (the trainer's codes)."""
        return self.stack.encode(torch.as_tensor(x, dtype=torch.float32) * self.normalisation_scale)[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, m] -> reconstructed raw rows [B, d]."""
        return self.stack.decode(torch.as_tensor(codes, dtype=torch.float32)[None])[0] / self.normalisation_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encode(x)
        return self.decode(codes), codes


def load_sae(results: str | os.PathLike | Results, member_id: str, *, device: str | torch.device = "cpu"
             ) -> LoadedSAE:
    """Member `member_id` of a results file (a path or an open `Results`) as a module in eval mode."""
    if isinstance(results, Results):
        return _build(results, member_id, device)
    with load_results(results) as r:
        return _build(r, member_id, device)


def _build(r: Results, member_id: str, device) -> LoadedSAE:
    m = r.member(member_id)
    cls = architecture(m.arch)
    saved = r.config.get("model") or {}
    options = {f.name: saved[f.name] for f in fields(cls.Options) if f.name in saved}  # v1 files held every arch's
    stack = cls(r.d, m.dictionary_size, [m.sparsity], [m.seed], options)
    with torch.no_grad():
        for name in ("encoder", "encoder_bias", "decoder", "decoder_bias"):
            getattr(stack, name).copy_(torch.from_numpy(getattr(r, name)(member_id))[None])
    return LoadedSAE(stack, r.normalisation_scale, m, r.site).to(device).eval()
