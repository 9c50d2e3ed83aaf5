"""SparseLinear and the conversion of a pruned model to it (prune, then convert)."""
from sdsengine.nn.convert import Conversion, convert, load_compressed, save_compressed
from sdsengine.nn.convert_streamed import convert_checkpoint
from sdsengine.nn.sparse_linear import SparseLinear, set_graphs, set_lean, use_backend, weight_bytes

__all__ = ["Conversion", "SparseLinear", "convert", "convert_checkpoint", "load_compressed", "save_compressed",
           "set_graphs", "set_lean", "use_backend", "weight_bytes"]
