"""Perplexity of a model streamed from its files a decoder layer at a time (eval/streamed.py,
sdsengine.eval.runner.evaluate_checkpoint, `eval --stream-weights`) is the loaded model's."""
import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdsengine.cli import main
from sdsengine.eval import streamed
from sdsengine.eval.perplexity import perplexity
from sdsengine.eval.runner import evaluate, evaluate_checkpoint
from sdsengine.models import load_model
from sdsengine.pipeline import adapters, placement, streaming

from tiny_models import save_tiny_tokenizer, tiny_model

DATA_DIR = Path(os.environ.get("SDSENGINE_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"offline data directory {DATA_DIR} not found")

# LLaMA; Gemma 3's alternating masks and tied head; GPT-NeoX's head renamed as it loads; BLOOM's layers return tuples
# and its ALiBi sits in the masks; OPT's positions are a module; GPT-2's Conv1D and tied head; Falcon returns tuples
FAMILIES = ["llama", "gemma3", "gpt_neox", "bloom", "opt", "gpt2", "falcon"]


def _saved(tmp_path, family="llama", dtype=torch.float32, **save):
    path = tmp_path / family
    tiny_model(family).to(dtype).save_pretrained(path, **save)
    save_tiny_tokenizer(path)
    return path


def _stream(source, dtype=None):
    model, _, _ = load_model(str(source), dtype, needs_tokenizer=False, skeleton=True)
    return model, streaming.WeightStream(model, streaming.checkpoint_files(source), every=True)


def _ids(vocab, tokens=16 * 5 + 3):
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_model_scores_as_the_loaded_one(family, tmp_path):
    """The same operations on the same windows: equal to the last bit, and the skeleton is left as it came."""
    source = _saved(tmp_path, family)
    loaded, _, _ = load_model(str(source), needs_tokenizer=False)
    ids = _ids(loaded.config.vocab_size)
    model, weights = _stream(source)
    layers = list(adapters.decoder_layers(model))
    assert perplexity(model, ids, 16, progress=False, weights=weights) == perplexity(loaded, ids, 16, progress=False)
    assert list(adapters.decoder_layers(model)) == layers and all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("stored, run", [(torch.bfloat16, None), (torch.float32, torch.bfloat16),
                                         (torch.bfloat16, torch.float16)])
def test_a_sharded_checkpoint_streams_in_any_dtype(stored, run, tmp_path):
    source = _saved(tmp_path, dtype=stored, max_shard_size="20KB")
    assert (source / streaming.INDEX).is_file()
    loaded, _, _ = load_model(str(source), run or "auto", needs_tokenizer=False)
    model, weights = _stream(source, run or "auto")
    ids = _ids(loaded.config.vocab_size)
    assert perplexity(model, ids, 16, progress=False, weights=weights) == perplexity(loaded, ids, 16, progress=False)


def test_only_the_layer_whose_turn_it_is_holds_weights(tmp_path, monkeypatch):
    """While a decoder layer runs, the rest of the model is still on the meta device; while the head runs, only the
    head and the final norm hold weights (not the embeddings, as large as the head)."""
    source = _saved(tmp_path)
    model, weights = _stream(source)
    held = []
    visiting = placement.visiting

    @contextlib.contextmanager
    def counting(modules, device, lender=None):
        with visiting(modules, device, lender):
            held.append((sum(p.numel() for p in model.parameters() if not p.is_meta),
                         sum(p.numel() for m in modules for p in m.parameters())))
            yield

    monkeypatch.setattr(placement, "visiting", counting)
    perplexity(model, _ids(model.config.vocab_size), 16, progress=False, weights=weights)
    layer = sum(p.numel() for p in adapters.decoder_layers(tiny_model("llama"))[0].parameters())
    assert len(held) == 4 and all(total == turn for total, turn in held)  # the capture, two layers, the head
    assert held[1][0] == held[2][0] == layer
    tiny = tiny_model("llama")
    assert held[3][0] == tiny.lm_head.weight.numel() + tiny.model.norm.weight.numel()


def test_inf_in_a_layer_is_named_and_the_skeleton_is_left_as_it_came(tmp_path):
    """inf in a layer's weight is named; the model's layers are its own again and hold no weights after."""
    source = _saved(tmp_path)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    model, weights = _stream(source)
    layers = list(adapters.decoder_layers(model))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight holds 1 inf/NaN values"):
        perplexity(model, _ids(model.config.vocab_size), 16, progress=False, weights=weights)
    assert list(adapters.decoder_layers(model)) == layers and all(p.is_meta for p in model.parameters())


def test_the_stand_ins_hand_on_each_window_in_turn():
    hidden = torch.arange(6.0).view(3, 1, 2)
    feed = streamed._Feed(hidden, torch.device("cpu"), as_tuple=True)
    first, later = streamed._StandIn(feed, True, None), streamed._StandIn(feed, False, None)
    for w in range(3):
        out = first(torch.zeros(1, 1, 2))
        assert isinstance(out, tuple) and torch.equal(out[0], hidden[w:w + 1])
        assert torch.equal(later(out[0])[0], hidden[w:w + 1])


@needs_data
def test_evaluate_checkpoint_gives_evaluates_result_on_wikitext2(tmp_path):
    source = _saved(tmp_path)
    loaded, tokenizer, _ = load_model(str(source))
    whole = evaluate(loaded, tokenizer, "wikitext2", seqlen=32, limit=3, data_dir=DATA_DIR, progress=False)
    assert evaluate_checkpoint(str(source), "wikitext2", seqlen=32, limit=3, data_dir=DATA_DIR,
                               progress=False) == whole


def test_zero_shot_tasks_and_compressed_checkpoints_are_refused_before_the_model_is_read(tmp_path, capsys):
    source = _saved(tmp_path)
    with pytest.raises(ValueError, match="--stream-weights evaluates perplexity tasks .* only, and piqa is zero-shot"):
        evaluate_checkpoint(str(source), "wikitext2,piqa")
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "sdsengine_compressed.json").write_text("{}")
    with pytest.raises(ValueError, match="is a compressed checkpoint .* streaming reads the dense"):
        evaluate_checkpoint(str(tmp_path / "packed"), "wikitext2")
    assert main(["eval", "--model", str(source), "--tasks", "arc_easy", "--stream-weights"]) == 2
    assert "arc_easy is zero-shot" in capsys.readouterr().err
    assert main(["eval", "--tasks", "wikitext2", "--stream-weights"]) == 2  # the embedded model: a GGUF file
    assert "is a GGUF file, whose weights transformers dequantizes whole" in capsys.readouterr().err


@needs_data
def test_the_cli_evaluates_streamed(tmp_path, capsys):
    source = _saved(tmp_path)
    for name, streaming_flag in (("whole", []), ("streamed", ["--stream-weights"])):
        assert main(["eval", "--model", str(source), "--tasks", "wikitext2", "--seqlen", "32", "--limit", "3",
                     "--data-dir", str(DATA_DIR), "--json", str(tmp_path / f"{name}.json")] + streaming_flag) == 0
    results = [json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("whole", "streamed")]
    assert results[0] == results[1] and results[0]["wikitext2"]["windows"] == 3
    assert "evaluation activations" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_streamed_model_scores_on_the_gpu_as_the_loaded_one_does(tmp_path):
    """Each layer lent on the GPU, the windows' hidden states kept there: the loaded model's perplexity on the GPU
    (the same kernels, so equal up to the order of sums)."""
    source = _saved(tmp_path)
    loaded, _, _ = load_model(str(source), needs_tokenizer=False, device="cuda")
    model, weights = _stream(source)
    ids = _ids(loaded.config.vocab_size)
    whole = perplexity(loaded, ids, 16, progress=False)
    result = perplexity(model, ids, 16, device="cuda", progress=False, weights=weights)
    assert result["nll"] == pytest.approx(whole["nll"], rel=1e-5)
    assert all(p.is_meta for p in model.parameters())
