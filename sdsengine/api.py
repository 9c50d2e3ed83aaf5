"""The Python API: one verb per job. `prune(model, config, calibration)` prunes in place."""
import functools
import time
import warnings
from dataclasses import dataclass

import torch

from sdsengine import report
from sdsengine.algorithms import algorithm_for
from sdsengine.config import CalibrationConfig, PruneConfig, check_device
from sdsengine.data import CALIBRATION_FILES, calibration_protocol, calibration_samples, resolve_data_dir
from sdsengine.nn.sparse_linear import SparseLinear
from sdsengine.pipeline import adapters, experts, parallel, streaming
from sdsengine.pipeline.memory import available_bytes
from sdsengine.pipeline.resume import ResumeStore
from sdsengine.pipeline.sequential import activation_plan, needs_dense_stream, plan_targets, prune_model


@dataclass
class PruneResult:
    layers: list
    seconds: float
    report: dict


def prune(model, config, calibration=None, tokenizer=None, progress=True, model_source=None,
          resume_dir=None, weights=None) -> PruneResult:
    """Prune `model` in place by `config` (a method config such as SparseGPTConfig).

    `calibration` is a (nsamples, seqlen) LongTensor of token ids, or a CalibrationConfig (then
    `tokenizer` is needed to build the windows), or None for methods that need no data (magnitude).
    `resume_dir`: keep the progress there after every layer, and continue from the progress of the same
    run if it holds some (see pipeline/resume.py); the directory stays, held by this process (another one
    is refused it), until `ResumeStore(d).clear()`.
    Inside a torch.distributed group of several processes (torchrun), each calling this with the same model and
    calibration and its own device in config.device, the run is data-parallel (pipeline/parallel.py).
    The model is pruned in place, layer by layer: where the call raises, the layers and linears done so far
    stay pruned (and a weight the run stopped on, inf/NaN, stays in the model): load it again to start over.
    `weights`: a streaming.WeightStream for a skeleton `model`, which reads each layer from the checkpoint and writes
    it pruned (prune_checkpoint makes one).
    """
    _check(model, config)
    memory_at_start = report.peak_memory(config.device)
    # a mixture of experts' fused expert banks as per-expert linears, put back pruned whatever happens
    with experts.unfused(adapters.decoder_layers(model), config.device):
        plan_targets(model, config)  # --ignore and the pattern checked before the calibration data is built
        samples, protocol = _calibration(model, config, calibration, tokenizer)
        store = ResumeStore(resume_dir) if resume_dir is not None and samples is not None else None
        start = time.perf_counter()
        with adapters.eval_mode(model):  # no dropout in the calibration forwards (a model from training has it on)
            layers = prune_model(model, config, samples, progress=progress, resume=store, weights=weights)
        seconds = time.perf_counter() - start
        # the others may hold a skeleton; a streamed model's layers were counted as they were written
        counted = weights.decoder_sparsity if weights is not None else functools.partial(report.decoder_sparsity, model)
        decoder_sparsity = parallel.from_first(counted)
    _warn_few_tokens(report.few_token_experts(layers))
    if store and store.resumed_from:
        seconds += store.earlier_seconds
    info = report.build(config, protocol, layers, seconds, model_source, memory_at_start)
    info["decoder_sparsity"] = decoder_sparsity
    if parallel.world() > 1:
        info["data_parallel"] = parallel.describe(samples, info["memory"])
    if store and store.resumed_from:
        info["resumed"] = {"from_layer": store.resumed_from, "earlier_seconds": round(store.earlier_seconds, 2)}
    return PruneResult(layers, seconds, info)


def prune_checkpoint(model, out, config, calibration=None, dtype=None, overwrite=False, progress=True,
                     resume_dir=None) -> PruneResult:
    """Prune the model at `model` (a safetensors checkpoint directory, or a hub id) into the checkpoint directory `out`,
    a layer at a time from its files: the host holds about one layer's weights, so a model larger than its memory can
    be pruned (pipeline/streaming.py). Otherwise as prune(load_model(model, dtype), config, calibration, tokenizer)
    followed by a save to `out`, and with the same result; out is written only once complete (replaced with
    overwrite). In a group of processes (torchrun) every process calls it; the first reads and writes the files.
    resume_dir: as prune's (a resumed run writes the finished layers from there); removed once `out` is written."""
    from sdsengine import checkpoint
    from sdsengine.models import load_model, weights_directory
    out = checkpoint.check_output_dir(out, overwrite) if parallel.rank() == 0 else None
    model, tokenizer, source = load_model(model, dtype, skeleton=True)
    if parallel.rank() > 0:  # lent each layer by the first process (parallel.lent)
        return prune(model, config, calibration, tokenizer, progress, source, resume_dir)
    files = streaming.checkpoint_files(weights_directory(source))
    with checkpoint.staged_directory(out, overwrite) as staged:
        weights = streaming.WeightStream(model, files, staged)
        result = prune(model, config, calibration, tokenizer, progress, source, resume_dir, weights)
        weights.finish()
        checkpoint.save_beside_weights(model, tokenizer, staged, result.report)
    if resume_dir is not None:
        ResumeStore(resume_dir).clear()
    return result


def plan(model, config, calibration=None, tokenizer=None) -> dict:
    """What sdsengine.prune(model, config, calibration, tokenizer) would prune and the memory it would keep, checked as
    prune checks before its work (the calibration windows built), nothing pruned. `model` may be a skeleton
    (models.load_model(M, skeleton=True)): no weight is read, so a large model's plan takes seconds. Sizes in bytes;
    a layer's statistics counted one per linear (linears that read one input share theirs in a prune). In one
    process (a group's processes would plan their shares)."""
    _check(model, config)
    if parallel.world() > 1:
        raise ValueError("a prune's plan is made in one process (run the dry run without torchrun)")
    algo = algorithm_for(config)
    with experts.unfused(adapters.decoder_layers(model)):
        layers, targets = plan_targets(model, config)
        samples, protocol = _calibration(model, config, calibration, tokenizer)
        every = sum(len(adapters.pruned_linears(layer)) for layer in layers)
        dense_stream = needs_dense_stream(algo, config)
        statistics = None if algo.STATS is None else max(
            sum(algo.STATS.nbytes(adapters.get_weight(m).shape[1], dense_stream) for m in t.values()) for t in targets)
        weights = [_bytes(layer.parameters()) for layer in layers]
        activations, store = activation_plan(model, config, samples) if samples is not None else (0, None)
    return {"method": config.method, "sparsity": str(config.sparsity), "device": str(config.device),
            "layers": len(layers), "linears_pruned": sum(map(len, targets)),
            "linears_kept_dense": every - sum(map(len, targets)), "calibration": protocol,
            "weights_bytes": _bytes(model.parameters()), "dtype": str(next(model.parameters()).dtype),
            "host_available_bytes": available_bytes(torch.device("cpu")),
            "largest_layer_bytes": max(weights), "layer_statistics_bytes": statistics,
            "before_layers_bytes": _bytes(p for m in adapters.pre_layer_modules(model) for p in m.parameters()),
            "activations_bytes": activations, "activations_on": store and str(store)}


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _check(model, config):
    """What prune and plan refuse before anything else: not a method config, an unusable device, a layout not
    supported, a converted model."""
    if not isinstance(config, PruneConfig):
        raise TypeError("config must be a method config such as sdsengine.SparseGPTConfig, got "
                        f"{type(config).__name__}")
    check_device(config.device)
    adapters.layout_for(model)  # an unsupported model is named before its inputs are looked at
    if any(isinstance(m, SparseLinear) for m in model.modules()):  # its linears would all be skipped
        raise ValueError("the model holds SparseLinear layers (it was converted): prune the model it came from")


def _warn_few_tokens(few):
    if few:
        index, name, tokens = min(few, key=lambda item: item[2])
        warnings.warn(f"{len(few)} expert linear(s) saw fewer calibration tokens than they have inputs, as few as "
                      f"{tokens} (layer {index} {name}): their pruning rests on those few tokens (SDS leaves such "
                      "linears to its base, the refit and swaps are skipped); more calibration windows (--nsamples) "
                      "send them more. Each expert's count is in the report (calibration_tokens)")


def _calibration(model, config, calibration, tokenizer):
    """(tokens, protocol) of the calibration given, or (None, None) for none or for a method that reads no data
    (magnitude: building windows from a file would cost its tokenization and record data it never used)."""
    if calibration is None or algorithm_for(config).STATS is None:
        return None, None
    if isinstance(calibration, CalibrationConfig):
        adapters.check_seqlen(model, calibration.seqlen)
        if tokenizer is None:
            raise ValueError("a CalibrationConfig needs the tokenizer to build its windows")
        samples = calibration_samples(tokenizer, calibration)
        adapters.check_ids(model, samples, "the tokenizer's ids (is it the model's tokenizer?)")
        # the data directory read, where it came from the environment too (its setting says None then); none for
        # a calibration file of the user's, which is read from its own path
        data_dir = resolve_data_dir(calibration.data_dir) if calibration.dataset in CALIBRATION_FILES else None
        return samples, {**calibration.to_dict(), "data_dir": data_dir and str(data_dir.resolve()),
                         "sampler": calibration_protocol(calibration)}
    samples = _as_token_windows(calibration)
    if samples.dtype.is_floating_point or samples.dtype.is_complex or samples.dtype == torch.bool:
        raise ValueError(f"calibration tokens must be integer token ids, got dtype {samples.dtype}")
    adapters.check_ids(model, samples, "calibration token ids")
    adapters.check_seqlen(model, samples.shape[1])
    samples = samples.long()  # embeddings take int32 or int64 ids only (uint8 and int16 ones are ids too)
    return samples, {"dataset": "user tokens", "nsamples": samples.shape[0], "seqlen": samples.shape[1]}


def _as_token_windows(calibration):
    """A (nsamples, seqlen) tensor from a tensor, an array, nested lists, or a list of 1-D windows."""
    if isinstance(calibration, (list, tuple)) and calibration and all(
            isinstance(w, torch.Tensor) for w in calibration):
        lengths = sorted({tuple(w.shape) for w in calibration})
        if len(lengths) > 1 or len(lengths[0]) != 1:
            raise ValueError(f"calibration windows must be 1-D token tensors of one length, got shapes {lengths}")
        return torch.stack(list(calibration))
    try:
        samples = torch.as_tensor(calibration)
    except (TypeError, ValueError) as exc:  # ragged nested lists, objects that are no tokens
        raise ValueError(f"calibration tokens must be (nsamples, seqlen) token ids of one length: {exc}") from None
    if samples.dim() != 2 or 0 in samples.shape:
        raise ValueError("calibration tokens must be (nsamples, seqlen), both positive, got shape "
                         f"{tuple(samples.shape)}")
    return samples

