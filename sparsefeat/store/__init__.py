"""The activation store: one self-describing, versioned HDF5 file of activations from one source.

Layout (documented in full in docs/format.md):

    /                      attrs: format, format_version, package_version, created, kind,
                                  provenance (JSON), units, split_unit, test_fraction, split_seed,
                                  complete
    activations/<site>     [rows, d] float16|float32, chunked by rows (~1 MiB chunks)
    checksums/<site>       [blocks] uint32, CRC-32 (attr algorithm) of each chunk-aligned block (v2)
    rows/test              [rows] uint8, 1 = the row belongs to the test split
    rows/committed         [1] int64, rows that are durably written (the crash-safe counter)
    tokens/doc|pos|ids     [rows] int64, model data only: where each row came from
    documents/test         [docs] uint8, model data only: the per-document split
    ground_truth/<name>    toy data only: what the generator knows (e.g. features [n, d])

The parts: `h5` (opening files, formats, JSON; shared with results files), `writer` (crash-safe,
resumable appends), `reader` (`ActivationStore`, `describe`, `verify`), `stream` (the shuffling
batch generator and its row sources), `checksums`, `splits` and `importer` (bring your own arrays).
"""

from .checksums import ALGORITHM as CHECKSUM_ALGORITHM
from .h5 import (FORMAT, FORMAT_VERSION, StoreError, check_format, file_format, first_line, json_default,
                 open_for_reading, open_h5, partial_path, to_json)
from .importer import ARRAY_SUFFIXES, ImportConfig, check_int, check_test_fraction, import_array
from .reader import ActivationStore, describe, verify
from .splits import split_documents, split_rows
from .stream import CopiedRows, MappedRows, shuffled_batches
from .writer import (BLOCK_ROWS_TOKENS, CHUNK_BYTES, COPY_BLOCK_BYTES, AlreadyComplete, StoreWriter,
                     check_site_name, chunk_rows_for)

__all__ = [
    "ARRAY_SUFFIXES", "BLOCK_ROWS_TOKENS", "CHECKSUM_ALGORITHM", "CHUNK_BYTES", "COPY_BLOCK_BYTES",
    "FORMAT", "FORMAT_VERSION", "ActivationStore", "AlreadyComplete", "CopiedRows", "ImportConfig",
    "MappedRows", "StoreError", "StoreWriter", "check_format", "check_int", "check_site_name",
    "check_test_fraction", "chunk_rows_for", "describe", "file_format", "first_line", "import_array",
    "json_default", "open_for_reading", "open_h5", "partial_path", "shuffled_batches",
    "split_documents", "split_rows", "to_json", "verify",
]
