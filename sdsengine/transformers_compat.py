"""What differs between the transformers versions sdsengine supports (setup.py: 4.45 and later)."""
import functools


@functools.lru_cache(maxsize=1)
def _major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


def dtype_kwargs(dtype) -> dict:
    """The keyword that sets a model's dtype in from_pretrained / from_config: `dtype` from transformers 5
    (4.56 added it), `torch_dtype` before, where an unknown `dtype` would reach the model's constructor."""
    return {"dtype" if _major() >= 5 else "torch_dtype": dtype}
