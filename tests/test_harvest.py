"""Harvest: activations from real transformers models (the shipped MiniLM-L6 and a tiny GPT-2 built
here) land in the store exactly as the model computes them, traceable to their text, split by
document, resumable after SIGKILL, and bad input fails with one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sparsefeat.cli import main
from sparsefeat.errors import SparsefeatError
from sparsefeat.harvest import (HarvestConfig, HarvestError, default_corpus, harvest, load_corpus,
                                minilm_path)
from sparsefeat.store import ActivationStore, partial_path

TEXTS = [
    "The cat sat on the mat.",
    "Sparse autoencoders count features in activations, or so it is claimed.",
    "Layer zero is the baseline: token embeddings before any transformer block.",
    "A short one.",
    # long enough to be cut into several windows at max_length=32
    " ".join(f"Sentence number {i} talks about dictionaries and superposition." for i in range(12)),
    "Held-out documents tell noise from features.",
]


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a store by name (activations, rows, tokens, documents)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def doc_rows(tokens: dict, doc: int) -> np.ndarray:
    """Indices of the rows of one document (tokens as from ActivationStore.tokens())."""
    return np.flatnonzero(tokens["doc"] == doc)


# --------------------------------------------------------------------------------------------
# Fixtures: one real MiniLM, a tiny GPT-2 saved to disk, a few stores shared by tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """The shipped MiniLM, loaded independently of harvest() for reference computations."""
    from transformers import AutoModel, AutoTokenizer
    path = minilm_path()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", TEXTS)


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("stores") / "minilm.h5"
    cfg = HarvestConfig(corpus=[str(corpus_file)], max_length=32, batch_size=4, block_tokens=40,
                        test_fraction=0.5, seed=3, device="cpu")
    return harvest(cfg, out, progress=False)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE tokenizer trained on a few sentences, saved offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModel, GPT2Config, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# MiniLM: the stored rows are the model's own activations, traceable and split by document
# --------------------------------------------------------------------------------------------


def reference_windows(tokenizer, text: str, max_length: int) -> list[list[int]]:
    """The windows the docs promise: the text's tokens cut every max_length-2, each in [CLS] ... [SEP]."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = max_length - 2
    return [[tokenizer.cls_token_id, *ids[i:i + step], tokenizer.sep_token_id] for i in range(0, len(ids), step)]


def test_minilm_rows_are_the_models_embeddings_and_last_hidden_state(minilm_store, minilm):
    model, tokenizer = minilm
    with ActivationStore(minilm_store) as s:
        assert s.kind == "model" and s.units == "model hidden units"
        assert s.sites == [f"resid_{L}" for L in range(7)] and s.width("resid_0") == 384
        resid0, resid3, resid6 = (s.load(f"resid_{L}").numpy() for L in (0, 3, 6))
        tokens = s.tokens()
        for doc, text in enumerate(TEXTS):
            rows = doc_rows(tokens, doc)
            ref0, ref3, ref6, ids = [], [], [], []
            for window in reference_windows(tokenizer, text, 32):
                x = torch.tensor([window])
                with torch.inference_mode():
                    emb = model.embeddings(input_ids=x)[0, 1:-1]
                    out = model(input_ids=x, output_hidden_states=True)
                ref0.append(emb.numpy())
                ref3.append(out.hidden_states[3][0, 1:-1].numpy())
                ref6.append(out.last_hidden_state[0, 1:-1].numpy())
                ids += window[1:-1]
            np.testing.assert_array_equal(tokens["ids"][rows], ids)
            np.testing.assert_allclose(resid0[rows], np.concatenate(ref0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(resid3[rows], np.concatenate(ref3), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(resid6[rows], np.concatenate(ref6), rtol=1e-4, atol=1e-4)
    assert len(reference_windows(tokenizer, TEXTS[4], 32)) >= 3  # the long document really was windowed


def test_special_tokens_absent_and_positions_are_what_the_model_saw(minilm_store, minilm):
    _, tokenizer = minilm
    with ActivationStore(minilm_store) as s:
        t = s.tokens()
    assert not np.isin(t["ids"], tokenizer.all_special_ids).any()
    first = doc_rows(t, 0)
    assert t["pos"][first].tolist() == list(range(1, len(first) + 1))  # position 0 is [CLS]
    long_doc = doc_rows(t, 4)
    assert t["pos"][long_doc].max() == 30  # windows of 32 positions: [CLS] + 30 tokens + [SEP]
    assert np.all(np.diff(t["doc"]) >= 0)  # rows in document order


def test_every_document_wholly_in_one_split(minilm_store):
    with ActivationStore(minilm_store) as s:
        docs_test = s.documents_test()
        doc = s.tokens()["doc"]
        test = s.split_mask("test")
        assert len(docs_test) == len(TEXTS)
        assert 0 < docs_test.sum() < len(TEXTS)  # test_fraction 0.5, seed 3: both splits present
        np.testing.assert_array_equal(test, docs_test[doc])


def test_keep_special_and_float16_storage(tmp_path, corpus_file, minilm_store, minilm):
    _, tokenizer = minilm
    cfg = HarvestConfig(corpus=[str(corpus_file)], layers=[0, 6], max_length=32, batch_size=4, block_tokens=40,
                        test_fraction=0.5, seed=3, dtype="float16", keep_special=True, device="cpu")
    out = harvest(cfg, tmp_path / "f16.h5", progress=False)
    with ActivationStore(out) as s16, ActivationStore(minilm_store) as s32:
        assert s16.sites == ["resid_0", "resid_6"]
        assert s16.f["activations/resid_6"].dtype == np.float16
        t16, t32 = s16.tokens(), s32.tokens()
        special = np.isin(t16["ids"], tokenizer.all_special_ids)
        windows = sum(len(reference_windows(tokenizer, text, 32)) for text in TEXTS)
        assert special.sum() == 2 * windows  # one [CLS] and one [SEP] per window
        np.testing.assert_array_equal(t16["ids"][~special], t32["ids"])
        np.testing.assert_allclose(s16.load("resid_6").numpy()[~special], s32.load("resid_6").numpy(),
                                   rtol=1e-3, atol=1e-3)  # float16 keeps ~3 significant digits


# --------------------------------------------------------------------------------------------
# A causal LM (tiny GPT-2 from a folder), a hooked module, the random-weights control
# --------------------------------------------------------------------------------------------


def test_causal_lm_and_module_hook(tmp_path, tiny_gpt2, corpus_file):
    from transformers import AutoModel, AutoTokenizer
    cfg = HarvestConfig(model=str(tiny_gpt2), corpus=[str(corpus_file)], module="h.0.mlp", max_length=16,
                        batch_size=3, block_tokens=30, device="cpu")
    out = harvest(cfg, tmp_path / "gpt2.h5", progress=False)
    model = AutoModel.from_pretrained(tiny_gpt2, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2, local_files_only=True)
    mlp_out = []
    model.h[0].mlp.register_forward_hook(lambda m, i, o: mlp_out.append(o))
    with ActivationStore(out) as s:
        assert sorted(s.sites) == ["h.0.mlp", "resid_0", "resid_1", "resid_2"]
        assert s.provenance["model"] == str(tiny_gpt2) and s.provenance["module"] == "h.0.mlp"
        t = s.tokens()
        stored = {site: s.load(site).numpy() for site in s.sites}
        for doc, text in enumerate(TEXTS):
            ids = tok(text)["input_ids"]
            rows = doc_rows(t, doc)
            np.testing.assert_array_equal(t["ids"][rows], ids)  # a causal LM adds no special tokens
            for start in range(0, len(ids), 16):  # windows of 16 positions, each starting at 0
                window = rows[start:start + 16]
                assert t["pos"][window].tolist() == list(range(len(window)))
                mlp_out.clear()
                with torch.inference_mode():
                    ref = model(input_ids=torch.tensor([ids[start:start + 16]]), output_hidden_states=True)
                for L in range(3):
                    np.testing.assert_allclose(stored[f"resid_{L}"][window], ref.hidden_states[L][0].numpy(),
                                               rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(stored["h.0.mlp"][window], mlp_out[0][0].numpy(), rtol=1e-4, atol=1e-5)


def test_module_only_store_of_a_block_output(tmp_path, tiny_gpt2, corpus_file):
    common = dict(model=str(tiny_gpt2), corpus=[str(corpus_file)], max_length=16, device="cpu")
    only = harvest(HarvestConfig(layers=[], module="h.0", **common), tmp_path / "m.h5", progress=False)
    resid = harvest(HarvestConfig(layers=[1], **common), tmp_path / "r.h5", progress=False)
    with ActivationStore(only) as a, ActivationStore(resid) as b:
        assert a.sites == ["h.0"] and a.provenance["layers"] == []
        np.testing.assert_array_equal(a.load("h.0").numpy(), b.load("resid_1").numpy())  # block 0 out = state 1
        np.testing.assert_array_equal(a.tokens()["ids"], b.tokens()["ids"])


def test_random_init_differs_from_trained_and_is_reproducible_by_seed(tmp_path, corpus_file, minilm_store):
    def run(name, init_seed):
        cfg = HarvestConfig(corpus=[str(corpus_file)], layers=[0, 6], random_init=True, init_seed=init_seed,
                            max_documents=3, max_length=32, test_fraction=0.5, seed=3, device="cpu")
        return harvest(cfg, tmp_path / name, progress=False)

    a, b, c = run("a.h5", 0), run("b.h5", 0), run("c.h5", 1)
    da, db, dc = datasets(a), datasets(b), datasets(c)
    for name in da:
        np.testing.assert_array_equal(da[name], db[name])  # same seed: bit-identical
    with ActivationStore(a) as sa, ActivationStore(c) as sc, ActivationStore(minilm_store) as trained:
        assert sa.provenance["random_init"] is True and sa.provenance["init_seed"] == 0
        assert sa.provenance["model"] == trained.provenance["model"]  # the control names its model
        assert sa.provenance["weights_sha256"] != trained.provenance["weights_sha256"]
        assert sa.provenance["weights_sha256"] != sc.provenance["weights_sha256"]
        n = sa.n_rows()
        np.testing.assert_array_equal(sa.tokens()["ids"], trained.tokens()["ids"][:n])  # same tokenizer
        for site in ("resid_0", "resid_6"):
            ra, rc, rt = sa.load(site).numpy(), sc.load(site).numpy(), trained.load(site).numpy()[:n]
            assert ra.shape == rc.shape == rt.shape == (n, 384)
            assert np.abs(ra - rt).mean() > 0.1 * np.abs(rt).mean()
            assert np.abs(ra - rc).mean() > 0.1 * np.abs(ra).mean()


# --------------------------------------------------------------------------------------------
# Resume, max_tokens, provenance
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, kill_after_commit):
    options = dict(max_documents=60, max_tokens=2000, max_length=64, block_tokens=200, batch_size=8,
                   layers=[0, 3], device="cpu")
    killed = tmp_path / "killed.h5"
    code = (f"from sparsefeat.harvest import HarvestConfig, harvest; "
            f"harvest(HarvestConfig(**{options!r}), {str(killed)!r}, progress=False)")
    committed = kill_after_commit(code, killed, min_rows=500, timeout=90.0)
    assert 500 <= committed < 2000 and not killed.exists()
    with pytest.raises(SparsefeatError, match="cannot resume"):  # other options: refused, partial kept
        harvest(HarvestConfig(**{**options, "layers": [0]}), killed, resume=True, progress=False)
    resumed = harvest(HarvestConfig(**options), killed, resume=True, progress=False)
    whole = harvest(HarvestConfig(**options), tmp_path / "whole.h5", progress=False)
    a, b = datasets(resumed), datasets(whole)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with ActivationStore(whole) as s:
        assert s.complete and 2000 <= s.n_rows() < 2000 + 400  # stopped within a document of max_tokens
        assert len(s.documents_test()) < 60


# Kills with the default settings (MiniLM, the pydoc corpus, default blocks and lengths), cut short
# by --max-tokens: after the first block, after the second, and inside the final close (the store
# marked complete but not yet renamed). Each resume must end with the uninterrupted run's rows.
DEFAULT_RUN = dict(max_tokens=20_000, device="cpu")
HARVEST_CODE = ("from sparsefeat.harvest import HarvestConfig, harvest; "
                "harvest(HarvestConfig(**{options!r}), {out!r}, resume={resume}, progress=False)")
KILL_AT_RENAME = ("import os, signal; os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
                  + HARVEST_CODE)


@pytest.fixture(scope="module")
def default_harvest(tmp_path_factory) -> Path:
    return harvest(HarvestConfig(**DEFAULT_RUN), tmp_path_factory.mktemp("default") / "whole.h5", progress=False)


def same_store(a: Path, b: Path) -> None:
    da, db = datasets(a), datasets(b)
    assert da.keys() == db.keys()
    for name in da:
        np.testing.assert_array_equal(da[name], db[name], err_msg=name)
    with ActivationStore(a) as sa, ActivationStore(b) as sb:
        assert sa.complete and sb.complete and sa.provenance == sb.provenance


@pytest.mark.slow
def test_default_harvest_killed_in_blocks_resumes_to_the_uninterrupted_store(tmp_path, kill_after_commit,
                                                                             default_harvest):
    out = tmp_path / "killed.h5"
    first = kill_after_commit(HARVEST_CODE.format(options=DEFAULT_RUN, out=str(out), resume=False), out,
                              min_rows=1, timeout=120.0)  # while the second block is computed
    second = kill_after_commit(HARVEST_CODE.format(options=DEFAULT_RUN, out=str(out), resume=True), out,
                               min_rows=first + 1, timeout=120.0)  # resumed, then killed a block later
    assert 0 < first < second and not out.exists()
    same_store(harvest(HarvestConfig(**DEFAULT_RUN), out, resume=True, progress=False), default_harvest)


@pytest.mark.slow
def test_default_harvest_killed_while_closing_resumes_to_the_uninterrupted_store(tmp_path, default_harvest):
    out = tmp_path / "closing.h5"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", KILL_AT_RENAME.format(options=DEFAULT_RUN, out=str(out), resume=False)],
                          env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert partial_path(out).exists() and not out.exists()  # every block written, the rename never happened
    same_store(harvest(HarvestConfig(**DEFAULT_RUN), out, resume=True, progress=False), default_harvest)


def test_max_tokens_stops_within_one_document_of_the_target(tmp_path, tiny_gpt2, corpus_file):
    cfg = HarvestConfig(model=str(tiny_gpt2), corpus=[str(corpus_file)] * 3, layers=[1], max_tokens=100,
                        max_length=16, device="cpu")
    with ActivationStore(harvest(cfg, tmp_path / "s.h5", progress=False)) as s:
        doc = s.tokens()["doc"]
        assert s.n_rows() >= 100 and np.sum(doc < doc.max()) < 100
        assert len(s.documents_test()) == doc.max() + 1 < 3 * len(TEXTS)


def test_provenance_records_model_corpus_and_options(minilm_store, corpus_file):
    with ActivationStore(minilm_store) as s:
        p = s.provenance
    assert p["model"] == "sentence-transformers/all-MiniLM-L6-v2" and p["random_init"] is False
    assert p["layers"] == list(range(7)) and p["dtype"] == "float32" and p["max_length"] == 32
    assert len(p["weights_sha256"]) == 64 and p["corpus"] == [str(corpus_file)]
    assert p["corpus_sha256"] == load_corpus([corpus_file]).sha256()
    assert {"sparsefeat", "transformers", "torch"} <= set(p["versions"])
    assert p["options"]["batch_size"] == 4 and p["options"]["seed"] == 3


# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------


def test_default_corpus_is_paragraph_sized_and_deterministic():
    a, b = default_corpus(), default_corpus()
    assert a.documents == b.documents and a.sha256() == b.sha256()
    assert len(a) > 300 and all(doc.strip() for doc in a.documents)
    lengths = np.array([len(d) for d in a.documents])
    assert np.median(lengths) >= 600 and np.median(lengths) < 3000


def test_corpus_files_folders_paragraphs_and_jsonl(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("Second file.\n\nIts second paragraph.\n")
    (tmp_path / "d" / "a.txt").write_text("First file, one paragraph.\n")
    (tmp_path / "d" / "empty.txt").write_text("  \n\n")
    (tmp_path / "d" / "skip.md").write_text("not a corpus file in a folder")
    write_jsonl(tmp_path / "d" / "c.jsonl", ["json one", "", "json two"], field="body")
    per_file = load_corpus([tmp_path / "d"], text_field="body")
    assert per_file.documents == ["First file, one paragraph.", "Second file.\n\nIts second paragraph.",
                                  "json one", "json two"]
    per_para = load_corpus([tmp_path / "d" / "b.txt", tmp_path / "d" / "a.txt"], paragraphs=True)
    assert per_para.documents == ["Second file.", "Its second paragraph.", "First file, one paragraph."]
    assert per_para.origins[1].endswith("b.txt#1")
    assert per_file.sha256() != per_para.sha256()


@pytest.mark.parametrize("content, message", [
    ("", "the corpus is empty"),
    ("\n  \n\t\n", "the corpus is empty"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_bad_corpus_files(tmp_path, content, message):
    path = tmp_path / "c.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(HarvestError, match=message) as e:
        load_corpus([path])
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "wrong field"}\n')
    with pytest.raises(HarvestError, match=r"c\.jsonl:2: no 'text' field"):
        load_corpus([path])
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(HarvestError, match=r"c\.jsonl:2: not valid JSON"):
        load_corpus([path])


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no file left behind
# --------------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["harvest", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra, message", [
    (["--model", "no-such-org/no-such-model"], "not in the offline Hugging Face cache"),
    (["--model", "./no/such/folder"], "no such model folder"),
    (["--model", "{tmp}"], "not a transformers model folder"),
    (["--layers", "0,7"], "layer 7 is out of range: the model has 6 layers"),
    (["--module", "encoder.layer.9"], "no submodule 'encoder.layer.9'"),
    (["--corpus", "{tmp}/missing.txt"], "no such corpus file"),
    (["--corpus", "{tmp}/empty.txt"], "the corpus is empty"),
    (["--corpus", "{tmp}/binary.txt"], "not UTF-8"),
    (["--max-length", "600"], "exceeds the model's 512 positions"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_leaves_no_file(tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "binary.txt").write_bytes(b"\x80\x81\x82")
    out = tmp_path / "out" / "s.h5"
    code, _, err = run_cli(capsys, *[x.replace("{tmp}", str(tmp_path)) for x in extra],
                           "--max-documents", "2", "--device", "cpu", "--no-progress", "--out", out)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not partial_path(out).exists()


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path, tiny_gpt2, capsys):
    import shutil
    folder = shutil.copytree(tiny_gpt2, tmp_path / "three-layers")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 3}))  # the weights hold 2 blocks
    code, _, err = run_cli(capsys, "--model", folder, "--no-progress", "--out", tmp_path / "s.h5")
    assert code == 2 and "weights are missing from the checkpoint" in err and "h.2." in err
    assert not (tmp_path / "s.h5").exists()


def test_cli_harvest_writes_a_store_and_refuses_to_overwrite(tmp_path, capsys, tiny_gpt2, corpus_file):
    out = tmp_path / "cli.h5"
    args = ["--model", tiny_gpt2, "--corpus", corpus_file, corpus_file, "--layers", "0,2", "--max-length", "16",
            "--test-fraction", "0.3", "--seed", "1", "--dtype", "float16", "--no-progress", "--out", out]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and f"wrote {out}" in stdout
    with ActivationStore(out) as s:
        assert s.sites == ["resid_0", "resid_2"] and s.provenance["layers"] == [0, 2]
        assert len(s.documents_test()) == 2 * len(TEXTS)  # the corpus file twice: both copies
        assert s.provenance["options"]["test_fraction"] == 0.3
    before = out.read_bytes()
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "already exists" in err and out.read_bytes() == before
    code, _, _ = run_cli(capsys, *args, "--force")
    assert code == 0
