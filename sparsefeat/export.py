"""Export trained members of a results file for other tools: a SAELens folder, or plain safetensors.

`--format saelens` writes what SAELens 6.x loads with `SAE.load_from_disk(DIR)`: `cfg.json` and
`sae_weights.safetensors` holding exactly W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d] (float32).

Folding the input normalisation. Our trainer feeds its dictionaries x_n = s·x (s = the results file's
`normalisation_scale`, raw rows x); SAELens has no constant input scale (its `normalize_activations`
options are per-row or a norm it estimates itself), so s goes into the weights, as SAELens's own
`fold_activation_norm_scaling_factor` does. With our weights E [m, d], b_e [m], D [m, d], b [d]:

    relu-l1:  c = ReLU(E·s·x + b_e),        x̂ = (Dᵀc + b)/s
              → W_enc = s·Eᵀ, b_enc = b_e, W_dec = D/s, b_dec = b/s, apply_b_dec_to_input = false
              (our relu-l1 encoder does not subtract the decoder bias)
    topk:     c = TopK(ReLU(E(s·x − b) + b_e)) = TopK(ReLU((s·E)(x − b/s) + b_e)),  x̂ = (Dᵀc + b)/s
              → the same tensors, apply_b_dec_to_input = true (SAELens encodes x − b_dec)

so SAELens's codes equal ours exactly and its x̂ is ours in raw units (what `load_sae` returns). Its
TopK takes the top k of the pre-activations then ReLU, ours ReLU then top k: the same kept values.

`--format safetensors` writes one file per member with our own tensors (encoder, encoder_bias,
decoder, decoder_bias; normalised units, as in the results file) and our config as JSON metadata.

Each folder is written to a hidden temporary sibling and renamed into place when complete; an
existing folder is replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import SparsefeatError
from .files import OutputError, check_folder_writable, describe_os_error, temporary_path
from .load import load_sae
from .results import Results, load_results
from .store import to_json

FORMATS = ("saelens", "safetensors")
SAELENS_ARCH = {"relu-l1": "standard", "topk": "topk"}
SAELENS_WEIGHTS, SAELENS_CFG = "sae_weights.safetensors", "cfg.json"


class ExportError(SparsefeatError):
    """A member cannot be exported (unknown member, architecture SAELens lacks, bad output)."""


def hook_of_site(site: str) -> tuple[str, int | None]:
    """(TransformerLens hook name, layer) of a site: resid_L is HF hidden_states[L], the residual stream
    entering block L (`blocks.L.hook_resid_pre`); other sites keep their own name and no layer."""
    found = re.fullmatch(r"resid_(\d+)", site or "")  # harvest.site_name's pattern
    return (site, None) if found is None else (f"blocks.{found[1]}.hook_resid_pre", int(found[1]))


def saelens_folder(r: Results, member_id: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json dict, tensors) of one member in SAELens's format, normalisation folded in."""
    sae = load_sae(r, member_id)
    m = sae.member
    if m.arch not in SAELENS_ARCH:
        raise ExportError(f"{r.path}: member {member_id!r} is a {m.arch} dictionary; SAELens export knows "
                          f"{', '.join(SAELENS_ARCH)}")
    s = sae.normalisation_scale
    st = sae.stack
    with torch.no_grad():
        tensors = {"W_enc": (st.encoder[0] * s).T.contiguous(), "b_enc": st.encoder_bias[0].clone(),
                   "W_dec": (st.decoder[0] / s).contiguous(), "b_dec": (st.decoder_bias[0] / s).contiguous()}
    tensors = {k: v.detach().float().cpu() for k, v in tensors.items()}
    hook_name, layer = hook_of_site(r.site)
    prov = r.store_provenance or {}
    cfg = {"d_in": int(r.d), "d_sae": int(m.dictionary_size), "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": m.arch == "topk", "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"hook_name": hook_name, "hook_layer": layer, "model_name": prov.get("model"),
                        "sparsefeat": _provenance(r, member_id)},
           "architecture": SAELENS_ARCH[m.arch]}
    if m.arch == "topk":
        cfg.update(k=min(int(m.sparsity), int(m.dictionary_size)), rescale_acts_by_decoder_norm=False)
    return cfg, tensors


def _provenance(r: Results, member_id: str) -> dict:
    """What a reader needs to trace an exported member back to its sweep."""
    m = r.member(member_id)
    from . import __version__
    return {"package_version": __version__, "results": str(Path(r.path).resolve()), "member": member_id,
            "arch": m.arch, "sparsity_name": m.sparsity_name, "sparsity": m.sparsity, "seed": m.seed,
            "site": r.site, "label": r.label, "store_path": r.store_path, "store_hash": r.store_hash,
            "normalisation_scale": r.normalisation_scale,
            "normalisation": "folded into W_enc (×scale), W_dec and b_dec (÷scale): the SAE takes raw rows",
            "model": (r.config or {}).get("model")}


def plain_tensors(r: Results, member_id: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of one member in our own layout (normalised units, as in the results file)."""
    tensors = {name: torch.from_numpy(np.ascontiguousarray(getattr(r, name)(member_id), dtype=np.float32))
               for name in ("encoder", "encoder_bias", "decoder", "decoder_bias")}
    meta = {"format": "sparsefeat.sae", "config": to_json(_provenance(r, member_id)),
            "d": str(r.d), "dictionary_size": str(r.member(member_id).dictionary_size)}
    return meta, tensors


def export(results: str | os.PathLike, member: str, out: str | os.PathLike, *, format: str = "saelens",
           force: bool = False) -> list[Path]:
    """Export `member` (an id, or "all") of a results file to the folder `out`; returns what was written.

    saelens: one member → `out` is the SAELens folder; all → one sub-folder per member id.
    safetensors: `out` holds one `<member id>.safetensors` per exported member."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r} (known: {', '.join(FORMATS)})")
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; give a folder")
    check_folder_writable(out.parent)
    with load_results(results) as r:
        ids = [m.id for m in r.members] if member == "all" else [r.member(member).id]
        with _atomic_folder(out) as tmp:
            written = []
            for mid in ids:
                if format == "saelens":
                    folder = tmp if member != "all" else tmp / _safe_name(mid)
                    folder.mkdir(exist_ok=True)
                    cfg, tensors = saelens_folder(r, mid)
                    _save(tensors, folder / SAELENS_WEIGHTS)
                    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
                    written.append(out / folder.relative_to(tmp))
                else:
                    meta, tensors = plain_tensors(r, mid)
                    _save(tensors, tmp / f"{_safe_name(mid)}.safetensors", meta)
                    written.append(out / f"{_safe_name(mid)}.safetensors")
    return written


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _safe_name(member_id: str) -> str:
    """A member id as a file name (ids hold `=` and `,`, which are fine; path separators are not)."""
    return member_id.replace(os.sep, "_")


@contextlib.contextmanager
def _atomic_folder(path: Path):
    """Yield a hidden temporary folder beside `path`; when the block succeeds it replaces `path` (the old
    folder is moved aside first and deleted only after the rename), otherwise it is removed."""
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous export back
        raise OutputError(describe_os_error(path, e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
