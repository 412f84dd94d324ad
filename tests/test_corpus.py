"""The default corpus: Python's own documentation topics plus the standard library's docstrings,
read offline, in an order that never depends on the filesystem, one document never straddling the
train/test split, and at least half a million MiniLM tokens."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest

import sparsefeat.corpus as corpus_module
from sparsefeat.corpus import (DEFAULT_SOURCES, STDLIB_SKIP_DIRS, HarvestError, default_corpus, load_corpus,
                               stdlib_corpus, stdlib_root)
from sparsefeat.harvest import HarvestConfig, harvest, minilm_path
from sparsefeat.harvest import HarvestError as HarvestErrorFromHarvest
from sparsefeat.harvest import load_corpus as load_corpus_from_harvest
from sparsefeat.store import ActivationStore


def doc(text: str) -> str:
    return f'"""{text}"""\n'


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    """A small library tree: docstrings of known length in known places, test folders to skip, a
    docstring repeated in two files, and a file that does not parse."""
    root = tmp_path / "lib"
    (root / "pkg" / "test").mkdir(parents=True)
    (root / "pkg" / "tests").mkdir()
    (root / "idlelib").mkdir()
    long_a = "Module a explains something at length. " * 3  # > 40 characters
    (root / "a.py").write_text(doc(long_a) + "def f():\n    " + doc("Too short.") + "\n"
                               + "class C:\n    " + doc("Class C does a thing that needs a long explanation here.")
                               + "    def m(self):\n        " + doc("Method m of C returns the answer to everything."))
    (root / "pkg" / "__init__.py").write_text(doc("The package pkg collects helpers for the tests of corpus."))
    (root / "pkg" / "b.py").write_text(doc("Class C does a thing that needs a long explanation here.") +
                                       "def g():\n    " + doc("Function g is documented with a long sentence."))
    (root / "pkg" / "test" / "test_x.py").write_text(doc("A test module docstring that must never appear."))
    (root / "pkg" / "tests" / "y.py").write_text(doc("Another test docstring that must never appear, ever."))
    (root / "idlelib" / "z.py").write_text(doc("An IDLE docstring that must never appear in the corpus."))
    (root / "broken.py").write_text(doc("A docstring in a file that does not parse as Python at all.") + "def (:\n")
    (root / "notes.txt").write_text("Not Python: never read.")
    return root


# --------------------------------------------------------------------------------------------
# Document boundaries on a tree whose answer is known
# --------------------------------------------------------------------------------------------


def test_stdlib_documents_are_docstring_groups_of_one_file_in_path_order(fake_stdlib):
    c = stdlib_corpus(root=fake_stdlib, group_chars=1)  # one docstring per document
    assert c.sources == ["stdlib"]
    assert c.documents == [
        ("Module a explains something at length. " * 3).strip(),
        "Class C does a thing that needs a long explanation here.",
        "Method m of C returns the answer to everything.",
        "The package pkg collects helpers for the tests of corpus.",
        # pkg/b.py: its class docstring repeats a.py's, so only its own text is left
        "Function g is documented with a long sentence.",
    ]
    assert c.origins == ["stdlib:a.py:1", "stdlib:a.py:6", "stdlib:a.py:8", "stdlib:pkg/__init__.py:1",
                         "stdlib:pkg/b.py:3"]  # file:line where each docstring starts


def test_stdlib_groups_join_docstrings_but_never_span_two_files(fake_stdlib):
    c = stdlib_corpus(root=fake_stdlib, group_chars=10_000)  # everything of a file in one document
    assert c.origins == ["stdlib:a.py:1", "stdlib:pkg/__init__.py:1", "stdlib:pkg/b.py:3"]
    assert c.documents[0].count("\n\n") == 2 and c.documents[0].endswith("answer to everything.")
    grouped = stdlib_corpus(root=fake_stdlib, group_chars=150)
    assert grouped.documents[0] == "\n\n".join(stdlib_corpus(root=fake_stdlib, group_chars=1).documents[:2])
    assert grouped.origins == ["stdlib:a.py:1", "stdlib:a.py:8", "stdlib:pkg/__init__.py:1", "stdlib:pkg/b.py:3"]


def test_stdlib_order_does_not_depend_on_how_the_filesystem_lists_folders(fake_stdlib, monkeypatch):
    before = stdlib_corpus(root=fake_stdlib, group_chars=1)
    real_walk = os.walk

    def reversed_walk(top, *a, **kw):
        for folder, dirs, files in real_walk(top, *a, **kw):
            dirs.reverse()
            yield folder, dirs, files[::-1]

    monkeypatch.setattr(corpus_module.os, "walk", reversed_walk)
    after = stdlib_corpus(root=fake_stdlib, group_chars=1)
    assert after.documents == before.documents and after.origins == before.origins
    assert after.sha256() == before.sha256()


def test_a_library_without_sources_is_one_clear_error(tmp_path):
    (tmp_path / "only.pyc").write_bytes(b"\x00")
    with pytest.raises(HarvestError, match="no standard library docstrings found") as e:
        stdlib_corpus(root=tmp_path)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# The real default corpus
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default():
    return load_corpus()


def test_default_is_pydoc_then_stdlib_and_pydoc_alone_is_unchanged(default):
    pydoc = load_corpus(("pydoc",))
    assert DEFAULT_SOURCES == ("pydoc", "stdlib") and default.sources == ["pydoc", "stdlib"]
    assert HarvestConfig().corpus == ["pydoc", "stdlib"]
    # old stores recorded corpus ["pydoc"]: that source still gives exactly the old documents
    assert pydoc.documents == default_corpus().documents == default.documents[:len(pydoc)]
    assert all(o.startswith("stdlib:") for o in default.origins[len(pydoc):])
    assert len(default) == len(default.origins) and all(d.strip() == d and d for d in default.documents)
    # harvest's names are the corpus module's
    assert load_corpus_from_harvest is load_corpus and HarvestErrorFromHarvest is HarvestError


def test_default_holds_no_test_suite_idle_or_third_party_text(default):
    parts = {part for o in default.origins if o.startswith("stdlib:")
             for part in o.removeprefix("stdlib:").rsplit(":", 1)[0].split("/")[:-1]}
    assert parts and not parts & STDLIB_SKIP_DIRS
    files = {o.removeprefix("stdlib:").rsplit(":", 1)[0] for o in default.origins if o.startswith("stdlib:")}
    assert {"json/__init__.py", "argparse.py", "collections/__init__.py"} <= files
    assert all((stdlib_root() / f).is_file() for f in files)
    # No stdlib text twice, nor a copy of a pydoc document: it could sit on both sides of the split.
    # (`pydoc` itself repeats 62 of its documents, topic specialnames copying other topics; it is
    # kept as it was so that old stores' document indices still point at their text.)
    stdlib = [d for d, o in zip(default.documents, default.origins) if o.startswith("stdlib:")]
    assert len(set(stdlib)) == len(stdlib)
    assert not set(stdlib) & set(d for d, o in zip(default.documents, default.origins) if o.startswith("pydoc:"))


def test_default_describes_itself_for_provenance(default):
    d = default.describe()
    assert d == dict(sources=["pydoc", "stdlib"], documents=len(default),
                     characters=sum(len(t) for t in default.documents), sha256=default.sha256(),
                     python=platform.python_version())
    assert d["characters"] > 1_800_000 and d["documents"] > 1_000
    own = corpus_module.Corpus(["x"], ["f"], ["f.txt"]).describe()
    assert own["python"] is None  # a user's files do not depend on the interpreter


def test_default_has_at_least_half_a_million_minilm_tokens(default):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    ids = tokenizer(default.documents, add_special_tokens=False, verbose=False)["input_ids"]
    assert sum(len(i) for i in ids) >= 500_000


@pytest.mark.slow
def test_two_loads_give_the_same_hash(default):
    assert load_corpus().sha256() == default.sha256()


# --------------------------------------------------------------------------------------------
# A tiny harvest: the split is per document
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_harvest_of_the_stdlib_keeps_each_document_on_one_side(tmp_path):
    cfg = HarvestConfig(corpus=["stdlib"], layers=[0], max_tokens=3000, max_length=64, block_tokens=500,
                        test_fraction=0.3, seed=1, device="cpu")
    with ActivationStore(harvest(cfg, tmp_path / "s.h5", progress=False)) as s:
        tokens, doc_test, p = s.tokens(), s.documents_test(), s.provenance
        test_rows = s.split_mask("test")
    docs = tokens["doc"]
    assert 3000 <= len(docs) and len(np.unique(docs)) >= 5
    assert doc_test.any() and not doc_test.all()  # both sides hold documents
    np.testing.assert_array_equal(test_rows, doc_test[docs])  # every row follows its document
    for d in np.unique(docs):  # and a document's rows are all on one side
        assert len(np.unique(test_rows[docs == d])) == 1
    corpus = stdlib_corpus()
    assert p["corpus"] == ["stdlib"] and p["corpus_sha256"] == corpus.sha256()
    assert p["corpus_documents"] == len(corpus) and p["corpus_characters"] == sum(map(len, corpus.documents))
    assert p["corpus_python"] == platform.python_version()
