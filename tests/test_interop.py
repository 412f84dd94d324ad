"""Export to SAELens / safetensors, and evaluating SAEs saved by SAELens or sparsify (issue 12).

Real files throughout: a small toy store, small real sweeps, folders written by our exporter or by
hand in the peers' documented layouts (docs: /work/shared/formats/README.md), and, when the optional
`sae_lens` is importable, SAELens itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparsefeat.cli import main
from sparsefeat.export import export
from sparsefeat.foreign import evaluate_foreign, load_foreign
from sparsefeat.load import load_sae
from sparsefeat.results import load_results
from sparsefeat.store import ActivationStore
from sparsefeat.toys import write_toy
from sparsefeat.train import SweepConfig, train_sweep

D = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_toy("sparse", tmp_path_factory.mktemp("toy") / "toy.h5", n_samples=3000, seed=2, n_features=24,
                     d=D, mean_active=2.0, progress=False)


def _sweep(store, out, **kw):
    cfg = SweepConfig(sizes=["16", "32"], seeds=[0], steps=100, lr=3e-3, test_curve_points=0, checkpoint_every=0,
                      device="cpu", **kw)
    return train_sweep(store, cfg, out, progress=False)


@pytest.fixture(scope="module")
def sweeps(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweeps")
    return {"relu-l1": _sweep(store, folder / "relu.h5", l1=[0.3]),
            "topk": _sweep(store, folder / "topk.h5", arch="topk", k=[4])}


def _rows(store, n=500):
    with ActivationStore(store) as s:
        return s.load(split="test")[:n]


def _member(path, size):
    with load_results(path) as r:
        return next(m.id for m in r.members if m.dictionary_size == size)


@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_saelens_export_has_the_format_saelens_expects(sweeps, tmp_path, arch):
    mid = _member(sweeps[arch], 32)
    out = tmp_path / "sae"
    assert export(sweeps[arch], mid, out) == [out]
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    with safe_open(str(out / "sae_weights.safetensors"), "pt") as f:
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert shapes == {"W_enc": ((D, 32), "F32"), "b_enc": ((32,), "F32"), "W_dec": ((32, D), "F32"),
                      "b_dec": ((D,), "F32")}
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu-l1": "standard", "topk": "topk"}[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (D, 32, "float32", "none")
    assert cfg["apply_b_dec_to_input"] is (arch == "topk")
    assert cfg["metadata"]["hook_name"] == "x" and cfg["metadata"]["sparsefeat"]["member"] == mid
    if arch == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False


@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_export_then_read_back_reconstructs_what_load_sae_does(sweeps, store, tmp_path, arch):
    mid = _member(sweeps[arch], 32)
    export(sweeps[arch], mid, tmp_path / "sae")
    ours, theirs = load_sae(sweeps[arch], mid), load_foreign(tmp_path / "sae")
    x = _rows(store)
    with torch.no_grad():
        x_hat, codes = ours(x)
    f_hat, f_codes = theirs(x)
    assert torch.equal(f_codes != 0, codes != 0)  # the same latents fire
    torch.testing.assert_close(f_codes, codes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_hat, x_hat, rtol=1e-5, atol=1e-6)
    # and `evaluate` on the exported folder gives the sweep's own held-out metrics
    with load_results(sweeps[arch]) as r:
        want, scale = r.member(mid).metrics["test"], r.normalisation_scale
    got = evaluate_foreign(theirs, store, scale=scale).metrics["test"]
    for key in ("mse", "fvu", "l0", "dead_fraction", "shrinkage", "rows"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), key


def test_export_all_safetensors_and_refusals(sweeps, tmp_path, capsys):
    out = tmp_path / "plain"
    written = export(sweeps["relu-l1"], "all", out, format="safetensors")
    with load_results(sweeps["relu-l1"]) as r:
        assert len(written) == len(r.members)
        with safe_open(str(written[0]), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        mid = json.loads(meta["config"])["member"]
        assert meta["format"] == "sparsefeat.sae"
        np.testing.assert_array_equal(tensors["decoder"].numpy(), r.decoder(mid))
    assert main(["export", str(sweeps["relu-l1"]), "--member", "all", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(sweeps["relu-l1"]), "--member", "all", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in out.iterdir() if p.is_dir())
    assert not list(tmp_path.glob(".plain*"))  # no temporary left behind
    assert main(["export", str(sweeps["relu-l1"]), "--member", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "no member 'nope'" in capsys.readouterr().err


def _sparsify_folder(folder, d=D, m=24, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    w = torch.randn(m, d, generator=g)
    save_file({"encoder.weight": w / d ** 0.5, "encoder.bias": torch.randn(m, generator=g) * 0.01,
               "W_dec": w / w.norm(dim=1, keepdim=True), "b_dec": torch.randn(d, generator=g) * 0.1},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(
        {"activation": "topk", "expansion_factor": 1, "normalize_decoder": True, "num_latents": m, "k": k,
         "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}))
    return folder


def test_evaluate_sparsify_folder_by_hand(store, tmp_path):
    folder = _sparsify_folder(tmp_path / "sp")
    sae = load_foreign(folder)
    t = load_file(str(folder / "sae.safetensors"))
    x = _rows(store, 200)
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(3, dim=-1)
    want = torch.zeros_like(pre).scatter_(-1, idx, vals) @ t["W_dec"] + t["b_dec"]
    torch.testing.assert_close(sae(x)[0], want)
    ev = evaluate_foreign(folder, store)
    assert ev.metrics["test"]["l0"] <= 3 and ev.metrics["test"]["rows"] == ActivationStore(store).n_rows("test")
    assert 0 < ev.metrics["test"]["fvu"]


def test_evaluate_jumprelu_saelens_folder_by_hand(store, tmp_path):
    folder = tmp_path / "jr"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    m = 20
    w = torch.randn(D, m, generator=g)
    threshold = torch.full((m,), 0.5)
    save_file({"W_enc": w, "b_enc": torch.zeros(m), "W_dec": w.T.contiguous() / 4, "b_dec": torch.zeros(D),
               "threshold": threshold}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": m, "dtype": "float32", "architecture": "jumprelu",
                                                 "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    x = _rows(store, 200)
    z = x @ w
    codes = load_foreign(folder).encode(x)
    torch.testing.assert_close(codes, z * (z > 0.5))
    assert 0 < (codes != 0).float().sum(1).mean() < m


def test_evaluate_cli_against_and_out_then_count(sweeps, store, tmp_path, capsys):
    mid = _member(sweeps["topk"], 32)
    export(sweeps["topk"], mid, tmp_path / "sae")
    out = tmp_path / "foreign.h5"
    code = main(["evaluate", str(tmp_path / "sae"), str(store), "--against", str(sweeps["topk"]), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "saelens topk" in text and "sparsefeat topk" in text and "held-out" in text
    with load_results(out) as r, load_results(sweeps["topk"]) as s:
        (m,) = r.members
        assert m.arch == "saelens-topk" and m.metrics["test"]["mse"] == pytest.approx(
            s.member(mid).metrics["test"]["mse"], rel=1e-4)
    assert main(["count", str(out)]) == 0
    assert "N(m) needs two seeds" in capsys.readouterr().out
    assert main(["plot", str(out), "--out", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "loss_vs_l0.png").is_file()


@pytest.mark.parametrize("cfg, message", [
    ("{not json", "not valid JSON"),
    ('{"d_in": 16, "d_sae": 8, "architecture": "gated"}', "'gated' is not supported"),
    ('{"d_in": 16, "d_sae": 8, "architecture": "standard", "normalize_activations": "layer_norm"}', "layer_norm"),
    ('{"d_in": 16, "d_sae": 8, "architecture": "topk"}', "k must be a positive integer"),
    ('{"d_in": 16, "d_sae": 9, "architecture": "standard"}', "W_enc has shape (16, 8), expected (16, 9)"),
])
def test_evaluate_refuses_bad_folders_in_one_line(store, tmp_path, capsys, cfg, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file({"W_enc": torch.zeros(D, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, D), "b_dec": torch.zeros(D)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(cfg)
    assert main(["evaluate", str(folder), str(store)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_evaluate_refuses_a_folder_without_weights_and_a_wrong_width(store, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), str(store)]) == 2
    assert "cfg.json: missing" in capsys.readouterr().err
    folder = _sparsify_folder(tmp_path / "wide", d=D + 1)
    assert main(["evaluate", str(folder), str(store)]) == 2
    assert "takes d=17" in capsys.readouterr().err


# ---- with SAELens itself (optional: `pip install sparsefeat[saelens]`) ------------------------


@pytest.mark.parametrize("arch", ["relu-l1", "topk"])
def test_saelens_loads_our_export(sweeps, store, tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    mid = _member(sweeps[arch], 32)
    export(sweeps[arch], mid, tmp_path / "sae")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    ours = load_sae(sweeps[arch], mid)
    x = _rows(store)
    with torch.no_grad():
        x_hat, codes = ours(x)
        torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), x_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_evaluate_reads_a_folder_saelens_saved(store, tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    cls, cfg_cls = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
                    "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
                    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig)}[arch]
    torch.manual_seed(0)
    sae = cls(cfg_cls(d_in=D, d_sae=24, **({"k": 5} if arch == "topk" else {})))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero biases and thresholds
    sae.save_model(str(tmp_path / "saved"))
    x = _rows(store)
    with torch.no_grad():
        want_codes, want = sae.encode(x), sae(x)
    got, codes = load_foreign(tmp_path / "saved")(x)
    torch.testing.assert_close(codes, want_codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert evaluate_foreign(tmp_path / "saved", store).metrics["test"]["rows"] > 0
