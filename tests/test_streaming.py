"""A prune streamed from the checkpoint's files (pipeline/streaming.py, sdsengine.prune_checkpoint, `prune
--stream-weights`) writes what a prune of the loaded model saves, bit for bit, holding one layer at a time."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import sdsengine
from sdsengine import checkpoint, tensorfiles
from sdsengine.algorithms import lookup
from sdsengine.cli import main
from sdsengine.models import load_model
from sdsengine.pipeline import memory, sequential, streaming

from tiny_models import MOE_SETTINGS, mixture_or_skip, save_tiny_tokenizer, tiny_model, tiny_tokens


def _source(tmp_path, family="llama", dtype=torch.float32, **save):
    path = tmp_path / f"{family}-src"
    tiny_model(family).to(dtype).save_pretrained(path, **save)
    save_tiny_tokenizer(path)
    return path


def _whole(source, out, config, dtype=None):
    """The baseline: the loaded model pruned and saved."""
    model, tokenizer, name = load_model(str(source), dtype)
    result = sdsengine.prune(model, config, tiny_tokens(), tokenizer, progress=False, model_source=name)
    checkpoint.save_checkpoint(model, tokenizer, out, result.report)
    return result


def _tensors(directory):
    """name -> tensor of every safetensors file in directory, as written (names and dtypes)."""
    found = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        found.update(load_file(file))
    return found


def _same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    loaded_a = AutoModelForCausalLM.from_pretrained(a).state_dict()
    loaded_b = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(loaded_a[k], loaded_b[k]) for k in loaded_a)


# gpt_neox: its head is embed_out in the files, lm_head in the model; gpt2: Conv1D weights, (in, out); gemma3: a
# tied head and layers of two kinds; opt: a projection before the layers. Each with one linear kept dense (--ignore).
KEPT = {"llama": "*.1.mlp.down_proj", "gpt_neox": "*.1.mlp.dense_4h_to_h", "gpt2": "*.1.mlp.c_proj",
        "gemma3": "*.1.mlp.down_proj", "opt": "*.1.fc2"}


@pytest.mark.parametrize("family", KEPT)
def test_streamed_prune_writes_what_the_whole_prune_saves(family, tmp_path):
    source = _source(tmp_path, family)
    config = sdsengine.SparseGPTConfig(sparsity="2:4", ignore=[KEPT[family]])
    whole = _whole(source, tmp_path / "whole", config)
    streamed = sdsengine.prune_checkpoint(str(source), tmp_path / "streamed", config, tiny_tokens(), progress=False)
    _same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    # the layers' sparsity counted as they were written, --ignore'd linears included
    assert streamed.report["decoder_sparsity"] == whole.report["decoder_sparsity"] < 0.5
    written = json.loads((tmp_path / "streamed" / streaming.INDEX).read_text())["weight_map"]
    assert len(set(written.values())) == len(streamed.layers) + 1  # a shard per layer, one for the rest


@pytest.mark.parametrize("family", [f for f in MOE_SETTINGS if f != "llama4_text"])  # the mixtures sdsengine prunes
def test_a_streamed_mixture_writes_what_the_whole_prune_saves(family, tmp_path):
    """Experts stored one by one (Mixtral, Qwen-MoE, ...) are read into the banks transformers fuses them into, each
    expert's linears pruned on their slices, and the banks split back into the checkpoint's tensors; stored fused
    (GPT-OSS) or renamed (GraniteMoE; Mixtral's router), read and written under their names."""
    mixture_or_skip(family)  # a mixture this transformers can prune
    source = _source(tmp_path, family)
    config = sdsengine.WandaConfig(sparsity="2:4")
    whole = _whole(source, tmp_path / "whole", config)
    streamed = sdsengine.prune_checkpoint(str(source), tmp_path / "streamed", config, tiny_tokens(), progress=False)
    _same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    assert streamed.report["decoder_sparsity"] == whole.report["decoder_sparsity"] == 0.5


def _expert_with_nan(tensors):
    tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"][0, 1] = float("nan")


@pytest.mark.parametrize("change, error", [
    (_expert_with_nan,
     r"model.layers.1.mlp.experts.gate_up_proj, built from the checkpoint's experts, holds 1 inf/NaN"),
    (lambda tensors: tensors.pop("model.layers.1.block_sparse_moe.experts.3.w1.weight"),
     r"tensors for model.layers.1.mlp.experts.gate_up_proj do not build it"),
])
def test_a_mixture_whose_experts_cannot_be_read_is_refused_by_name(change, error, tmp_path):
    source = _source(tmp_path, "mixtral")
    _replace_tensors(source, change)
    with pytest.raises(ValueError, match=error):
        sdsengine.prune_checkpoint(str(source), tmp_path / "out", sdsengine.WandaConfig(sparsity="2:4"),
                                   tiny_tokens(), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sds", "besa"])
def test_every_method_streams(method, tmp_path):
    source = _source(tmp_path)
    config_class, _ = lookup(method)
    _whole(source, tmp_path / "whole", config_class(sparsity="2:4"))
    sdsengine.prune_checkpoint(str(source), tmp_path / "streamed", config_class(sparsity="2:4"), tiny_tokens(),
                               progress=False)
    _same_checkpoint(tmp_path / "whole", tmp_path / "streamed")


@pytest.mark.parametrize("stored, run", [(torch.bfloat16, None), (torch.float32, "bfloat16"),
                                         (torch.bfloat16, "auto")])
def test_a_checkpoint_streams_in_any_dtype_from_any_dtype_and_shards(stored, run, tmp_path):
    source = _source(tmp_path, "qwen3", stored, max_shard_size="20KB")  # sharded: an index and several files
    assert (source / streaming.INDEX).is_file()
    config = sdsengine.WandaConfig(sparsity="2:4")
    _whole(source, tmp_path / "whole", config, run)
    sdsengine.prune_checkpoint(str(source), tmp_path / "streamed", config, tiny_tokens(), dtype=run, progress=False)
    _same_checkpoint(tmp_path / "whole", tmp_path / "streamed")


def test_only_the_module_whose_turn_it_is_holds_weights(tmp_path, monkeypatch):
    """While a layer is written, every other parameter of the model is still on the meta device."""
    source = _source(tmp_path)
    held = []
    write = streaming.WeightStream.write_layer

    def counting(self, layer, state):
        held.append((sum(p.numel() for p in self.model.parameters() if not p.is_meta),
                     sum(p.numel() for p in layer.parameters())))
        write(self, layer, state)

    monkeypatch.setattr(streaming.WeightStream, "write_layer", counting)
    sdsengine.prune_checkpoint(str(source), tmp_path / "out", sdsengine.WandaConfig(sparsity="2:4"), tiny_tokens(),
                               progress=False)
    assert len(held) == 2 and all(total == layer for total, layer in held)


class _Stop(BaseException):  # as a kill would: no handler of Exception catches it
    pass


def _stop_at(monkeypatch, index):
    real = sequential._prune_layer

    def prune_layer(i, *args, **kwargs):
        if i == index:
            raise _Stop
        return real(i, *args, **kwargs)
    monkeypatch.setattr(sequential, "_prune_layer", prune_layer)


def _prune_resumable(how, source, out, config, progress):
    """A prune with progress kept, streamed or of the loaded model (then saved to out)."""
    if how == "streamed":
        return sdsengine.prune_checkpoint(str(source), out, config, tiny_tokens(), progress=False, resume_dir=progress)
    model, tokenizer, _ = load_model(str(source))
    result = sdsengine.prune(model, config, tiny_tokens(), tokenizer, progress=False, resume_dir=progress)
    checkpoint.save_checkpoint(model, tokenizer, out, result.report)
    return result


@pytest.mark.parametrize("family", ["llama", "mixtral"])
@pytest.mark.parametrize("stopped, resumed", [("streamed", "streamed"), ("whole", "streamed"), ("streamed", "whole")])
def test_progress_resumes_streamed_or_not_into_the_unbroken_runs_checkpoint(stopped, resumed, family, tmp_path,
                                                                            monkeypatch):
    """A run stopped at its second layer, then resumed, streamed or with the model loaded either time (the fingerprints
    agree: a stream's is made of the checkpoint's tensors as the loaded model holds them, a mixture's experts as their
    linears): SDS with the dense stream, whose activations come back from the progress too."""
    source, progress = _source(tmp_path, family), tmp_path / "progress"
    config = sdsengine.SDSConfig(sparsity="2:4", base="wanda", iters=5, refit=3, teacher="dense")
    whole = _whole(source, tmp_path / "whole", config)
    _stop_at(monkeypatch, 1)
    with pytest.raises(_Stop):
        _prune_resumable(stopped, source, tmp_path / "out", config, progress)
    assert not (tmp_path / "out").exists() and (progress / "layer-0000.pt").is_file()
    monkeypatch.undo()
    result = _prune_resumable(resumed, source, tmp_path / "out", config, progress)
    assert result.report["resumed"]["from_layer"] == 1
    assert result.report["decoder_sparsity"] == whole.report["decoder_sparsity"]
    _same_checkpoint(tmp_path / "whole", tmp_path / "out")


def _replace_tensors(source, change):
    """Rewrite the one safetensors file of source with change(tensors) applied."""
    tensors = load_file(source / streaming.SINGLE)
    change(tensors)
    save_file(tensors, source / streaming.SINGLE, metadata={"format": "pt"})


def _renamed(tensors):
    tensors["model.layers.1.mlp.up.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")


def _reshaped(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()


def _quantized(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.int8)


def _damaged(tensors):
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")


@pytest.mark.parametrize("change, error", [
    (_renamed, "holds no tensor named model.layers.1.mlp.up_proj.weight"),
    (_reshaped, r"model.layers.0.mlp.up_proj.weight has shape \(127, 64\), the model's"),
    (_quantized, "is I8, not a float tensor"),
    (_damaged, "model.layers.1.mlp.down_proj.weight holds 1 inf/NaN values"),
])
def test_a_checkpoint_that_cannot_be_streamed_is_refused_and_nothing_is_written(change, error, tmp_path):
    source = _source(tmp_path)
    _replace_tensors(source, change)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=error):
        sdsengine.prune_checkpoint(str(source), out, sdsengine.WandaConfig(sparsity="2:4"), tiny_tokens(),
                                   progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [source.name]


def test_a_layers_tensor_that_transformers_renames_from_outside_the_layer_is_written_back_once(tmp_path, monkeypatch):
    """Read under the checkpoint's name, written back pruned under it, in the layer's shard, and not copied again."""
    source = _source(tmp_path)
    _replace_tensors(source, lambda t: t.update({"elsewhere.up.weight": t.pop("model.layers.1.mlp.up_proj.weight")}))
    monkeypatch.setattr(streaming.transformers_compat, "loading_names",
                        lambda model, keys: {"elsewhere.up.weight": "model.layers.1.mlp.up_proj.weight"})
    sdsengine.prune_checkpoint(str(source), tmp_path / "out", sdsengine.WandaConfig(sparsity="2:4"), tiny_tokens(),
                               progress=False)
    index = json.loads((tmp_path / "out" / streaming.INDEX).read_text())["weight_map"]
    assert index["elsewhere.up.weight"] == index["model.layers.1.mlp.down_proj.weight"]
    written = _tensors(tmp_path / "out")
    assert "model.layers.1.mlp.up_proj.weight" not in written
    assert (written["elsewhere.up.weight"] == 0).float().mean() == 0.5


def test_what_streaming_does_not_read_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="is a GGUF file"):
        sdsengine.models.weights_directory(str(tmp_path / "model.gguf"))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="holds pytorch_model.bin: drop --stream-weights"):
        streaming.checkpoint_files(tmp_path)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_cli_streams_and_its_dry_run_says_so(family, tmp_path, capsys):
    source = _source(tmp_path, family)
    tokens = tmp_path / "calib.txt"
    tokens.write_text("a " * 4000)
    flags = ["prune", "--model", str(source), "--method", "wanda", "--sparsity", "2:4", "--calib", str(tokens),
             "--nsamples", "4", "--seqlen", "32", "--stream-weights"]
    assert main(flags + ["--out", str(tmp_path / "whole"), "--dry-run"]) == 0
    layer = sum(p.numel() * 4 for p in tiny_model(family).model.layers[0].parameters())  # more than the embeddings
    assert (f"read from the checkpoint a layer at a time (--stream-weights): the host holds at most "
            f"{memory.describe(layer)} of them at once") in capsys.readouterr().out
    assert not (tmp_path / "whole").exists()
    assert main(flags[:-1] + ["--out", str(tmp_path / "whole")]) == 0
    assert main(flags + ["--out", str(tmp_path / "streamed")]) == 0
    assert "saved to" in capsys.readouterr().out
    _same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    assert main(flags + ["--out", str(tmp_path / "resumable"), "--resume-dir", str(tmp_path / "progress")]) == 0
    _same_checkpoint(tmp_path / "whole", tmp_path / "resumable")
    assert not (tmp_path / "progress").exists()  # removed once saved


def test_a_checkpoint_with_other_names_is_refused_by_the_dry_run(tmp_path, capsys):
    source = _source(tmp_path)
    _replace_tensors(source, _renamed)
    assert main(["prune", "--model", str(source), "--method", "magnitude", "--sparsity", "2:4", "--stream-weights",
                 "--dry-run", "--out", str(tmp_path / "out")]) == 2
    assert "holds no tensor named model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    with safe_open(source / streaming.SINGLE, "pt") as f:  # the checkpoint is as it was
        assert "model.layers.1.mlp.up.weight" in f.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool])
def test_a_file_written_a_tensor_at_a_time_reads_as_safetensors_wrote_it(dtype, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"matrix": torch.randn(5, 7, generator=g) * 100, "scalar": torch.tensor(3.5),
               "empty": torch.empty(0, 4), "row": torch.randn(1, 3, generator=g)[0]}
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    entries = [(name, t.dtype, t.shape, lambda t=t: t) for name, t in tensors.items()]
    size = tensorfiles.write_safetensors(tmp_path / "ours.safetensors", entries)
    save_file(tensors, tmp_path / "theirs.safetensors")
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert ours.keys() == theirs.keys() and size == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(ours[k].dtype == dtype and ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k])
               for k in ours)
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    wrong = [("matrix", dtype, (5, 7), lambda: torch.zeros(5, 7, dtype=torch.float64))]
    with pytest.raises(RuntimeError, match=r"matrix: torch.float64 \(5, 7\), not the header's"):
        tensorfiles.write_safetensors(tmp_path / "bad.safetensors", wrong)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])
def test_inf_and_nan_are_counted_across_slices(chunk):
    from sdsengine.pipeline.sequential import non_finite
    weight = torch.randn(40, 37)
    weight[0, 0], weight[3, 4], weight[39, 36] = -float("inf"), float("nan"), float("inf")
    assert non_finite(weight, chunk) == non_finite(weight.T, chunk) == 3
    assert non_finite(torch.empty(0, 3), chunk) == 0 and non_finite(torch.tensor(float("nan")), chunk) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_a_prune_on_the_gpu_streams_each_layer_there(family, tmp_path):
    """Read to the host, then lent on the GPU (a mixture's experts each their slice of a bank built on the host): the
    same masks as the loaded model pruned there (the kept weights are the checkpoint's; Wanda's norms are sums the GPU
    may take in another order, hence the agreement rather than equality)."""
    source = _source(tmp_path, family)
    _whole(source, tmp_path / "whole", sdsengine.WandaConfig(sparsity="2:4", device="cuda"))
    sdsengine.prune_checkpoint(str(source), tmp_path / "streamed", sdsengine.WandaConfig(sparsity="2:4", device="cuda"),
                               tiny_tokens(), progress=False)
    whole, streamed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert whole.keys() == streamed.keys()
    for name, w in whole.items():
        s = streamed[name]
        assert s.dtype == w.dtype and s.device.type == "cpu"
        assert ((w != 0) == (s != 0)).float().mean() > 0.99, name
        both = (w != 0) & (s != 0)
        assert torch.equal(w[both], s[both]), name


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool])
def test_a_tensor_read_in_slices_is_the_one_safetensors_reads(stored, tmp_path, monkeypatch):
    """read_tensor (plain reads, a slice at a time where the dtype changes) gives safetensors' tensor, cast as .to()
    casts it: scalars, empty tensors, a slice that ends inside an element's row."""
    monkeypatch.setattr(tensorfiles, "_SLICE_BYTES", 24)  # several slices per tensor
    g = torch.Generator().manual_seed(0)
    tensors = {"matrix": torch.randn(5, 7, generator=g) * 100, "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4),
               "row": torch.randn(1, 3, generator=g)[0]}
    tensors = {name: t.to(stored) for name, t in tensors.items()}
    save_file(tensors, tmp_path / "t.safetensors")
    found = tensorfiles.file_header(tmp_path / "t.safetensors")
    assert found.keys() == tensors.keys()
    for name, tensor in tensors.items():
        for dtype in (None, torch.float32, torch.bfloat16, torch.float16):
            read = tensorfiles.read_tensor(found[name], dtype)
            expected = tensor if dtype is None else tensor.to(dtype)
            assert read.dtype == expected.dtype and torch.equal(read, expected), (name, dtype)


def test_a_tensor_is_read_into_its_place_in_a_larger_one(tmp_path):
    """read_tensor(out=): a bank's rows filled in place, cast to the bank's dtype; a place of another shape, or not
    contiguous (the rows would land elsewhere), is refused."""
    weight = torch.randn(3, 4)
    save_file({"w": weight}, tmp_path / "t.safetensors")
    stored = tensorfiles.file_header(tmp_path / "t.safetensors")["w"]
    bank = torch.zeros(2, 6, 4, dtype=torch.bfloat16)
    tensorfiles.read_tensor(stored, out=bank[1, 3:6])
    assert torch.equal(bank[1, 3:6], weight.to(torch.bfloat16)) and bank[0].abs().sum() == bank[1, :3].abs().sum() == 0
    with pytest.raises(ValueError, match=r"t.safetensors: a tensor of shape \(3, 4\) is read into a contiguous one of "
                                         r"its shape, not \(2, 4\)"):
        tensorfiles.read_tensor(stored, out=bank[1, :2])
    with pytest.raises(ValueError, match="not a strided one"):
        tensorfiles.read_tensor(stored, out=torch.zeros(4, 3).T)


def test_an_expert_of_another_shape_is_refused_by_name(tmp_path):
    source = _source(tmp_path, "mixtral")
    _replace_tensors(source, lambda tensors: tensors.update(
        {"model.layers.0.block_sparse_moe.experts.1.w2.weight": torch.zeros(64, 64)}))
    error = (r"tensors for model.layers.0.mlp.experts.down_proj do not build it \(4 tensors of .*w2.weight, of shapes "
             r"\[\(64, 64\), \(64, 128\)\], for 4 experts\)")
    with pytest.raises(ValueError, match=error):
        sdsengine.prune_checkpoint(str(source), tmp_path / "out", sdsengine.WandaConfig(sparsity="2:4"),
                                   tiny_tokens(), progress=False)


def test_a_truncated_or_damaged_file_is_named(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="short.safetensors ends inside a tensor: the file is truncated"):
        tensorfiles.read_tensor(tensorfiles.file_header(tmp_path / "short.safetensors")["w"])
    (tmp_path / "bad.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        tensorfiles.file_header(tmp_path / "bad.safetensors")
