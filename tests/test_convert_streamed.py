"""A pruned checkpoint converted a linear at a time from its files (nn/convert_streamed.py,
sdsengine.convert_checkpoint, `convert --stream-weights`) is the compressed checkpoint that convert and save_compressed
write for the loaded model."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdsengine
from sdsengine import checkpoint, tensorfiles
from sdsengine.cli import main
from sdsengine.models import load_model
from sdsengine.nn import convert_streamed
from sdsengine.nn.convert import MANIFEST, WEIGHTS
from sdsengine.pipeline import experts, streaming

from tiny_models import MOE_SETTINGS, mixture_or_skip, save_tiny_tokenizer, tiny_model

# as in test_streaming: GPT-NeoX's head is embed_out in the files; GPT-2's Conv1D weights are (in, out); Gemma 3, OPT
# and GPT-2 tie their head to the embeddings. In each, one linear left unpruned stays dense (not 2:4).
KEPT = {"llama": "*.1.mlp.down_proj", "gpt_neox": "*.1.mlp.dense_4h_to_h", "gpt2": "*.1.mlp.c_proj",
        "gemma3": "*.1.mlp.down_proj", "opt": "*.1.fc2"}


def _pruned(tmp_path, family="llama", dtype=torch.float32, **save):
    """A checkpoint of the tiny `family` pruned 2:4 (magnitude), one linear kept dense, with a tokenizer."""
    model = tiny_model(family)
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4", ignore=[KEPT.get(family, "")]), progress=False)
    path = tmp_path / f"{family}-pruned"
    model.to(dtype).save_pretrained(path, **save)
    save_tiny_tokenizer(path)
    return path


def _whole(source, out, dtype=None, **convert):
    """The baseline: the loaded model converted (with `convert`'s options) and saved."""
    model, tokenizer, _ = load_model(str(source), dtype or "auto", needs_tokenizer=False)
    records = []
    sdsengine.convert(model, report=records, **convert)
    sdsengine.save_compressed(model, out, tokenizer)
    return records


def _same_compressed(a, b, model):
    """a and b hold the same tensors, manifest, configs and tokenizer; a tensor tied to another may be stored under
    either name (the loader ties them again)."""
    ta, tb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    tied = {name for names in _tied(model) for name in names}
    assert set(ta) ^ set(tb) <= tied and len(ta) == len(tb)
    assert all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in set(ta) & set(tb))
    for name in (MANIFEST, "config.json", "generation_config.json", "tokenizer.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    loaded_a, loaded_b = sdsengine.load_compressed(a).state_dict(), sdsengine.load_compressed(b).state_dict()
    assert loaded_a.keys() == loaded_b.keys()
    assert all(torch.equal(loaded_a[k], loaded_b[k]) for k in loaded_a)


def _tied(model):
    names = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    return [group for group in names.values() if len(group) > 1]


@pytest.mark.parametrize("family", KEPT)
def test_a_streamed_convert_writes_what_convert_of_the_loaded_model_saves(family, tmp_path):
    source = _pruned(tmp_path, family)
    whole = _whole(source, tmp_path / "whole")
    streamed = sdsengine.convert_checkpoint(str(source), tmp_path / "streamed")
    assert streamed == whole and sum(r.action == "converted" for r in streamed) == len(streamed) - 2  # head, KEPT
    _same_compressed(tmp_path / "whole", tmp_path / "streamed", tiny_model(family))


def test_float32_layers_are_warned_of_as_convert_warns(tmp_path):
    source = _pruned(tmp_path)
    with pytest.warns(UserWarning, match="float32 SparseLinears always run the dense fallback.*pass dtype=torch.bf"):
        sdsengine.convert_checkpoint(str(source), tmp_path / "fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdsengine.convert_checkpoint(str(source), tmp_path / "bf16", dtype=torch.bfloat16)


@pytest.mark.parametrize("stored, run", [(torch.bfloat16, None), (torch.float32, torch.float16),
                                         (torch.float16, torch.bfloat16)])
def test_a_sharded_checkpoint_converts_in_any_dtype(stored, run, tmp_path):
    source = _pruned(tmp_path, "qwen3", stored, max_shard_size="20KB")
    assert (source / streaming.INDEX).is_file()
    _whole(source, tmp_path / "whole", run)
    sdsengine.convert_checkpoint(str(source), tmp_path / "streamed", dtype=run)
    _same_compressed(tmp_path / "whole", tmp_path / "streamed", tiny_model("qwen3"))
    manifest = json.loads((tmp_path / "streamed" / MANIFEST).read_text())
    assert manifest["dtype"] == str(run or stored).removeprefix("torch.")


def test_only_the_linear_being_converted_holds_its_weight(tmp_path, monkeypatch):
    source = _pruned(tmp_path)
    held, add = [], tensorfiles.SafetensorsWriter.add
    skeleton = {}
    real_stream = streaming.WeightStream.__init__

    def keep(self, model, *args, **kwargs):
        skeleton["model"] = model
        real_stream(self, model, *args, **kwargs)

    def counting(self, name, tensor):
        held.append(sum(p.numel() for p in skeleton["model"].parameters() if not p.is_meta))
        add(self, name, tensor)

    monkeypatch.setattr(streaming.WeightStream, "__init__", keep)
    monkeypatch.setattr(tensorfiles.SafetensorsWriter, "add", counting)
    sdsengine.convert_checkpoint(str(source), tmp_path / "out")
    largest = max(p.numel() + (0 if m.bias is None else m.bias.numel())
                  for m in tiny_model("llama").modules() if isinstance(m, torch.nn.Linear) for p in [m.weight])
    assert 0 < max(held) <= largest and held.count(0) >= 3  # none while the embeddings and norms are written


def test_the_cli_converts_streamed_and_the_result_evaluates(tmp_path, capsys):
    source = _pruned(tmp_path)
    assert main(["convert", "--model", str(source), "--out", str(tmp_path / "packed"), "--stream-weights"]) == 0
    out = capsys.readouterr().out
    assert "converting in bfloat16" in out and "13 of 15 linears converted to SparseLinear" in out
    model, tokenizer, _ = load_model(str(tmp_path / "packed"), compressed_ok=True)
    assert tokenizer is not None and sum(isinstance(m, sdsengine.SparseLinear) for m in model.modules()) == 13


def test_the_cli_packs_a_mixtures_experts_streamed_as_it_packs_them_loaded(tmp_path, capsys):
    source = _pruned(tmp_path, "qwen2_moe")
    for how in ("loaded", "streamed"):
        flags = ["--stream-weights"] if how == "streamed" else []
        assert main(["convert", "--model", str(source), "--out", str(tmp_path / how), "--pack-experts"] + flags) == 0
    _same_compressed(tmp_path / "loaded", tmp_path / "streamed", tiny_model("qwen2_moe"))
    model = sdsengine.load_compressed(tmp_path / "streamed")
    assert any(isinstance(m, experts.UnfusedExperts) for m in model.modules())


def test_a_checkpoint_with_nothing_to_convert_writes_nothing(tmp_path):
    model = tiny_model("llama")
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="0.5"), progress=False)
    model.save_pretrained(tmp_path / "unstructured")
    with pytest.raises(ValueError, match=r"none of its 15 linears can be converted \(ignored; not 2:4\)"):
        sdsengine.convert_checkpoint(str(tmp_path / "unstructured"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["unstructured"]


def _renamed(tensors):
    tensors["lm_head.w"] = tensors.pop("lm_head.weight")


def _damaged(tensors):  # each linear's weight is checked as it is read (as a streamed prune checks them)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")


@pytest.mark.parametrize("change, error", [
    (_renamed, "holds no tensor named lm_head.weight"),  # outside the layers: a prune does not read it, a convert does
    (_damaged, "model.layers.1.mlp.up_proj.weight holds 1 inf/NaN values"),
])
def test_a_checkpoint_that_cannot_be_converted_streamed_is_refused_and_nothing_is_written(change, error, tmp_path):
    source = _pruned(tmp_path)
    tensors = load_file(source / streaming.SINGLE)
    change(tensors)
    save_file(tensors, source / streaming.SINGLE, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=error):
        sdsengine.convert_checkpoint(str(source), tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == [source.name]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("family", [f for f in MOE_SETTINGS if f != "llama4_text"])  # the mixtures sdsengine prunes
def test_a_streamed_mixture_converts_as_the_loaded_one(family, pack, tmp_path):
    """Each bank is built from the experts stored one by one (Mixtral, Qwen-MoE, ...) as transformers builds it. Not
    packed, the experts stay fused and dense, written as save_compressed writes them; packed, each experts module is
    lent at once, its linears slices of its banks, and converted as convert(pack_experts=True) converts them."""
    mixture_or_skip(family)  # a mixture this transformers can prune
    source = _pruned(tmp_path, family)
    whole = _whole(source, tmp_path / "whole", pack_experts=pack)
    assert sdsengine.convert_checkpoint(str(source), tmp_path / "streamed", pack_experts=pack) == whole
    assert any(".experts." in r.name and r.action == "converted" for r in whole) == pack  # not shared_experts
    _same_compressed(tmp_path / "whole", tmp_path / "streamed", tiny_model(family))


def test_packed_experts_none_of_whose_linears_converts_stay_fused_as_convert_leaves_them(tmp_path):
    source = _pruned(tmp_path, "mixtral")
    ignore = ("lm_head", "*experts*")
    whole = _whole(source, tmp_path / "whole", pack_experts=True, ignore=ignore)
    assert sdsengine.convert_checkpoint(str(source), tmp_path / "streamed", ignore=ignore, pack_experts=True) == whole
    _same_compressed(tmp_path / "whole", tmp_path / "streamed", tiny_model("mixtral"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / "streamed" / WEIGHTS)


def test_a_file_whose_tensors_come_as_they_are_made_keeps_room_for_any_of_them(tmp_path):
    """The header is written last, into room kept for every tensor that might be added; fewer fit too."""
    entries = [("a.weight", torch.bfloat16, (64, 128)), ("a.values", torch.bfloat16, (64, 64)),
               ("a.meta", torch.int32, (64, 4)), ("scale", torch.float32, ())]
    room = tensorfiles.header_room(entries)
    assert room % 8 == 0
    tensors = {"a.values": torch.randn(64, 64).bfloat16(), "a.meta": torch.arange(256, dtype=torch.int32).view(64, 4),
               "scale": torch.tensor(2.5)}
    with tensorfiles.SafetensorsWriter(tmp_path / "some.safetensors", room) as file:
        for name, tensor in tensors.items():
            file.add(name, tensor)
    read = load_file(tmp_path / "some.safetensors")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    with pytest.raises(RuntimeError, match="over the 16 kept for it"):
        with tensorfiles.SafetensorsWriter(tmp_path / "small.safetensors", 16) as file:
            file.add("a.values", tensors["a.values"])


def test_convert_checkpoint_refuses_a_non_empty_output_before_reading(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no model checkpoint"):
        sdsengine.convert_checkpoint(str(tmp_path / "no-such-model"), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "mine.txt").read_text() == "mine"


def test_write_converted_takes_the_skeleton_the_cli_prepared(tmp_path):
    """The CLI loads the skeleton itself (its dtype rule) and hands it over with the load's source."""
    source = _pruned(tmp_path)
    model, tokenizer, name = load_model(str(source), torch.float16, needs_tokenizer=False, skeleton=True)
    records = convert_streamed.write_converted(model, name, checkpoint.check_output_dir(tmp_path / "out"), tokenizer,
                                               ignore="*.0.mlp.up_proj")  # one pattern, not its letters
    assert sum(r.action == "converted" for r in records) == 12  # the head and KEPT (not 2:4) are dense too
    assert [r.reason for r in records if r.name == "model.layers.0.mlp.up_proj"] == ["ignored"]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["dtype"] == "float16"
