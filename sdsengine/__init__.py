"""sdsengine: one-shot pruning of language models to 2:4 and other sparsity."""
__version__ = "0.1.0"

from sdsengine.api import PruneResult, plan, prune, prune_checkpoint  # noqa: E402
from sdsengine.checkpoint import save_checkpoint  # noqa: E402
from sdsengine.config import (  # noqa: E402
    BESAConfig,
    CalibrationConfig,
    MagnitudeConfig,
    PruneConfig,
    SDSConfig,
    SparseGPTConfig,
    SparsityPattern,
    WandaConfig,
)

from sdsengine.nn import SparseLinear, convert, convert_checkpoint, load_compressed, save_compressed  # noqa: E402

__all__ = ["convert", "convert_checkpoint", "SparseLinear", "load_compressed", "save_compressed", "prune",
           "prune_checkpoint", "save_checkpoint", "plan", "PruneResult", "BESAConfig", "CalibrationConfig",
           "MagnitudeConfig", "PruneConfig", "SDSConfig", "SparseGPTConfig", "SparsityPattern", "WandaConfig"]
