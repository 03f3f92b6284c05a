"""Exception types: every error names the file (and sample) where the problem was seen."""


class OctsslError(Exception):
    """Base class for errors a user can act on (the CLI prints them without a traceback); ``exit_status`` is
    what the entry points exit with."""

    exit_status = 1


class CorpusError(OctsslError):
    """A corpus (manifest.parquet + volumes.zarr) is missing, inconsistent or corrupt."""


class ShardError(OctsslError):
    """A WebDataset shard or its index is missing, truncated or fails its checksum."""


class SampleError(OctsslError):
    """A sample dict has a wrong key, dtype, shape or non-finite values."""


class IngestError(OctsslError):
    """A device file cannot be read or converted (the reason names the file)."""


class ConfigError(OctsslError):
    """A job configuration cannot work (raised before any worker starts)."""


class ModelError(OctsslError):
    """Invalid model options or input shapes, or mismatched weights on transfer."""


class StorageError(OctsslError):
    """An object-store URL cannot be served (unknown scheme, no bucket, access denied, server gone)."""

class CheckpointError(OctsslError):
    """A training checkpoint is unreadable or holds more than tensors and DeepSpeed's own state."""


#: Exit status of an entry point whose run stopped on SIGTERM (:class:`Preempted`): 128 + 15, as shells and
#: Kubernetes report a process ended by SIGTERM.
EXIT_PREEMPTED = 128 + 15


class Preempted(OctsslError):
    """A run stopped cleanly on SIGTERM after saving a checkpoint; ``--resume`` continues it."""

    exit_status = EXIT_PREEMPTED


class PredictError(OctsslError):
    """Predictions or growth cannot be made from the given sources (the message names them)."""
