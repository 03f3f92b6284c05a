"""Exception types: every error names the file (and sample) where the problem was seen."""


class OctsslError(Exception):
    """Base class for errors a user can act on (the CLI prints them without a traceback)."""


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


class CheckpointError(OctsslError):
    """A training checkpoint is unreadable or holds more than tensors and DeepSpeed's own state."""
