"""sparsefeat: count the features in neural-network activations with sparse dictionaries,
and say honestly whether the count means anything (train vs test loss, false-positive
controls, the layer-0 baseline)."""

__version__ = "0.1.0"

from .errors import SparsefeatError  # noqa: E402,F401
