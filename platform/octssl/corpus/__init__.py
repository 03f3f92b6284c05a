"""The corpus storage engine: ``manifest.parquet`` + ``volumes.zarr`` (Zarr v3), journalled appends, checks.

``store`` (the Corpus: open, query, read, append), ``layout`` (names and slots; a leaf), ``manifest``
(the schema and its checks), ``journal`` (the writer lock and the undo journal), ``writer`` (the data half
of an append), ``chunkread`` (the fast path that reads a chunk straight from a Zarr shard file), ``audit``
(verify, info), ``synth`` (synthetic corpora), ``preview`` (PNG previews).
"""

from octssl.corpus.store import Corpus

__all__ = ["Corpus"]
