"""Text corpora for harvests: built-in offline text and the user's own files, as ordered documents.

A corpus is a list of documents in a fixed order; the store's train/test split is drawn per
document, so a document is the unit that never straddles the split. Built-in sources need no
network and no extra package, since every CPython carries them:

- `pydoc`: the documentation topics in `pydoc_data.topics` (~128k MiniLM tokens on 3.11).
- `stdlib`: the docstrings of the standard library's own Python sources (~0.4M MiniLM tokens).

The default is both (`DEFAULT_SOURCES`). The text of either differs between Python versions, so
`Corpus.describe()` records the version beside the hash. See docs/harvest.md.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import SparsefeatError


class HarvestError(SparsefeatError):
    """A model, corpus or option that a harvest cannot use.

    Defined here, beside the corpus readers that raise it, so that `harvest` can import this module
    without a cycle; `sparsefeat.harvest.HarvestError` is the same class."""


@dataclass
class Corpus:
    """Documents in a fixed order; `origins[i]` says where document i came from (file:line etc.)."""

    documents: list[str]
    origins: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.documents)

    def sha256(self) -> str:
        """sha256 over the documents in order, each as its UTF-8 length (8 bytes, LE) then its bytes."""
        h = hashlib.sha256()
        for doc in self.documents:
            b = doc.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()

    def describe(self) -> dict:
        """What a store's provenance records about its corpus. `python` is the interpreter version
        whose files a built-in source was read from (None when every source is a user file)."""
        builtin = any(s in CORPORA for s in self.sources)
        return dict(sources=list(self.sources), documents=len(self), characters=sum(map(len, self.documents)),
                    sha256=self.sha256(), python=platform.python_version() if builtin else None)


PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in PARAGRAPH_BREAK.split(text) if p.strip()]


def _grouped(parts: Sequence[str], min_chars: int, sep: str = "\n\n") -> Iterator[tuple[int, str]]:
    """Consecutive parts joined until a group holds at least `min_chars` characters; the last group
    may be shorter. Yields (index of the group's first part, text)."""
    pending: list[str] = []
    first = 0
    for i, part in enumerate(parts):
        if not pending:
            first = i
        pending.append(part)
        if sum(len(p) for p in pending) >= min_chars:
            yield first, sep.join(pending)
            pending = []
    if pending:
        yield first, sep.join(pending)


def default_corpus(min_chars: int = 600) -> Corpus:
    """The Python documentation text in `pydoc_data.topics` (in every CPython), as paragraph-sized
    documents: topics in name order, consecutive paragraphs of a topic joined until a document holds
    at least `min_chars` characters (single paragraphs there are mostly one line or a code sample).

    This is the built-in source `pydoc`, unchanged since the first stores (same documents, same hash)."""
    from pydoc_data.topics import topics

    docs, origins = [], []
    for key in sorted(topics):
        for _, text in _grouped(_paragraphs(topics[key]), min_chars):
            docs.append(text)
            origins.append(f"pydoc:{key}#{len(docs)}")
    return Corpus(docs, origins, ["pydoc"])


# Folders of the standard library whose docstrings are not prose about the library: test suites
# (thousands of "Test that ..." lines, and files written to fail), the IDLE app, the removed 2to3,
# and third-party packages.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                              "__pycache__"})
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    """The folder of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The `.py` files under `root`, outside STDLIB_SKIP_DIRS at any depth, sorted by their path
    relative to `root` (so the order never depends on how the filesystem lists folders)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def module_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, cleaned docstring) of the module, classes and functions of one file, in source order;
    [] for a file that does not parse (the stdlib of another Python version, say)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCSTRING_NODES):
            text = ast.get_docstring(node, clean=True)
            if text and text.strip():
                found.append((node.body[0].lineno, text.strip()))  # the line the docstring starts on
    return sorted(found)


def stdlib_corpus(min_docstring: int = 40, group_chars: int = 1500, root: str | os.PathLike | None = None) -> Corpus:
    """The docstrings of the standard library's Python sources, as documents.

    Files in sorted relative-path order, skipping STDLIB_SKIP_DIRS; per file its docstrings longer
    than `min_docstring` characters in source order, each kept only at its first occurrence in the
    whole corpus (a text repeated in two modules would otherwise sit on both sides of the split).
    Consecutive docstrings of one file are joined until a document holds at least `group_chars`
    characters: a document never spans two files. Origins are `stdlib:<relative path>:<line>`.

    40 characters keeps one-sentence docstrings ("Return True if the stream is a TTY.") and drops
    bare labels; the 80 of the first measurement left the default corpus just under 500k tokens."""
    root = Path(root) if root is not None else stdlib_root()
    seen: set[str] = set()
    docs, origins = [], []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        kept = []
        for line, text in module_docstrings(path):
            if len(text) > min_docstring and text not in seen:
                seen.add(text)
                kept.append((line, text))
        for first, text in _grouped([t for _, t in kept], group_chars):
            docs.append(text)
            origins.append(f"stdlib:{rel}:{kept[first][0]}")
    if not docs:
        raise HarvestError(f"{root}: no standard library docstrings found (are the .py sources installed?); "
                           "use --corpus pydoc")
    return Corpus(docs, origins, ["stdlib"])


# Built-in corpora by name; a name here wins over a file of the same name (use ./NAME for the file).
CORPORA: dict[str, Callable[[], Corpus]] = {"pydoc": default_corpus, "stdlib": stdlib_corpus}
DEFAULT_SOURCES: tuple[str, ...] = ("pydoc", "stdlib")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HarvestError(f"{path}: no such file") from None
    except PermissionError:
        raise HarvestError(f"{path}: cannot read the corpus file (permission denied)") from None
    except UnicodeDecodeError as e:
        raise HarvestError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise HarvestError(f"{path}: cannot read the corpus file ({e.strerror or _first_line(e)})") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HarvestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise HarvestError(f"{path}:{lineno}: no {text_field!r} field (choose one with --text-field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise HarvestError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not text")
        if text.strip():
            yield text.strip(), f"{path}:{lineno}"


def _file_documents(path: Path, paragraphs: bool, text_field: str) -> Iterator[tuple[str, str]]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    elif paragraphs:
        for i, para in enumerate(_paragraphs(_read_text(path))):
            yield para, f"{path}#{i}"
    else:
        text = _read_text(path).strip()
        if text:
            yield text, str(path)


def load_corpus(sources: Sequence[str | os.PathLike] = DEFAULT_SOURCES, *, paragraphs: bool = False,
                text_field: str = "text") -> Corpus:
    """Documents from built-in corpora, files and folders, in the order given.

    A `.jsonl` file gives one document per line (its `text_field`); any other file is UTF-8 text,
    one document per file, or one per blank-line-separated paragraph with `paragraphs=True`.
    A folder contributes its .txt and .jsonl files (recursively, in sorted path order).
    Blank documents are dropped; leading and trailing whitespace is stripped.
    """
    if not sources:
        raise HarvestError("no corpus given")
    docs, origins = [], []
    for src in sources:
        src = str(src)
        if src in CORPORA:
            part = CORPORA[src]()
            docs += part.documents
            origins += part.origins
            continue
        path = Path(src).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
            if not files:
                raise HarvestError(f"{path}: the folder holds no .txt or .jsonl files")
        elif path.exists():
            files = [path]
        else:
            raise HarvestError(f"{src}: no such corpus file or folder (built-in corpora: {', '.join(CORPORA)})")
        for file in files:
            for text, origin in _file_documents(file, paragraphs, text_field):
                docs.append(text)
                origins.append(origin)
    if not docs:
        raise HarvestError(f"{', '.join(map(str, sources))}: the corpus is empty (no non-blank documents)")
    return Corpus(docs, origins, [str(s) for s in sources])
