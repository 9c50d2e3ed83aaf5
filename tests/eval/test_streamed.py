"""Perplexity and zero-shot log-likelihoods of a model streamed from its files a decoder layer at a time
(eval/streamed.py, sdsengine.eval.runner.evaluate_checkpoint, `eval --stream-weights`) are the loaded model's."""
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
from sdsengine.eval.zeroshot import loglikelihoods
from sdsengine.models import load_model
from sdsengine.pipeline import adapters, memory, placement, streaming

from tiny_models import MOE_SETTINGS, save_tiny_tokenizer, tiny_model

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


def _pairs(vocab, count=12, seed=0):
    """Random (context, continuation) ids of several lengths, two of them one input (one-token answers)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)))
               for _ in range(count)]
    pairs = [(torch.randint(0, vocab, (c,), generator=g).tolist(), torch.randint(0, vocab, (k,), generator=g).tolist())
             for c, k in lengths]
    return pairs + [(pairs[0][0], pairs[0][1][:1])]


def _realigned(model):
    """The model with each weight copied to memory of its own. transformers can leave a loaded weight inside the file's
    mapping at an address that is not 64-byte aligned, where the CPU's one-row matrix product rounds differently; the
    streamed model's weights are read into fresh (aligned) memory."""
    for p in model.parameters():
        p.data = p.data.clone()
    return model


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


@pytest.mark.parametrize("family", [f for f in MOE_SETTINGS if f != "llama4_text"])  # the mixtures sdsengine prunes
def test_a_streamed_mixture_scores_as_the_loaded_one(family, tmp_path):
    """Experts stored one by one (Mixtral, Qwen-MoE, ...) are lent as the fused banks transformers builds from them on
    load; stored fused (GPT-OSS) or renamed (GraniteMoE), as any tensor."""
    source = _saved(tmp_path, family)
    loaded = _realigned(load_model(str(source), needs_tokenizer=False)[0])
    ids = _ids(loaded.config.vocab_size)
    model, weights = _stream(source)
    assert perplexity(model, ids, 16, progress=False, weights=weights) == perplexity(loaded, ids, 16, progress=False)
    assert all(p.is_meta for p in model.parameters())


def test_an_expert_missing_from_the_checkpoint_is_named(tmp_path):
    source = _saved(tmp_path, "mixtral")
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    model, weights = _stream(source)
    with pytest.raises(ValueError, match=r"the checkpoint's 7 tensors for model.layers.1.mlp.experts.gate_up_proj do "
                                         r"not build it .*: it cannot be streamed"):
        perplexity(model, _ids(model.config.vocab_size), 16, progress=False, weights=weights)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("stored, run", [(torch.bfloat16, None), (torch.float32, torch.bfloat16),
                                         (torch.bfloat16, torch.float16)])
def test_a_sharded_checkpoint_streams_in_any_dtype(stored, run, tmp_path):
    source = _saved(tmp_path, dtype=stored, max_shard_size="20KB")
    assert (source / streaming.INDEX).is_file()
    loaded, _, _ = load_model(str(source), run or "auto", needs_tokenizer=False)
    model, weights = _stream(source, run or "auto")
    ids = _ids(loaded.config.vocab_size)
    assert perplexity(model, ids, 16, progress=False, weights=weights) == perplexity(loaded, ids, 16, progress=False)


@pytest.mark.parametrize("task", ["perplexity", "zero-shot"])
def test_only_the_layer_whose_turn_it_is_holds_weights(task, tmp_path, monkeypatch):
    """While a decoder layer runs, the rest of the model is still on the meta device; while the head runs, only the
    head and the final norm hold weights (not the embeddings, as large as the head). Each is lent once: a zero-shot
    task's inputs of many lengths too."""
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
    if task == "perplexity":
        perplexity(model, _ids(model.config.vocab_size), 16, progress=False, weights=weights)
    else:
        pairs = _pairs(model.config.vocab_size)
        assert len({len(c) + len(k) for c, k in pairs}) > 5
        loglikelihoods(model, pairs, progress=False, weights=weights)
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
    groups = [torch.arange(12.0).view(2, 3, 2), torch.arange(6.0).view(3, 1, 2)]
    feed = streamed._Feed(groups, torch.device("cpu"), as_tuple=True)
    first, later = streamed._StandIn(feed, True, None), streamed._StandIn(feed, False, None)
    for hidden in groups:
        for w in range(hidden.shape[0]):
            out = first(torch.zeros(1, hidden.shape[1], 2))
            assert isinstance(out, tuple) and torch.equal(out[0], hidden[w:w + 1])
            assert torch.equal(later(out[0])[0], hidden[w:w + 1])
    with pytest.raises(RuntimeError, match=r"call 5 gives the decoder layers \(1, 1\) \(batch, tokens\), not"):
        first(torch.zeros(1, 1, 2))  # one window more than were computed


def test_the_stand_ins_refuse_a_window_out_of_order():
    feed = streamed._Feed([torch.zeros(1, 3, 2), torch.zeros(1, 2, 2)], torch.device("cpu"), as_tuple=False)
    with pytest.raises(RuntimeError, match=r"call 0 gives the decoder layers \(1, 2\) .* in the order they were"):
        streamed._StandIn(feed, True, None)(torch.zeros(1, 2, 2))


@pytest.mark.parametrize("family", FAMILIES + ["mixtral", "qwen2_moe"])
def test_a_streamed_model_gives_the_loaded_ones_zero_shot_loglikelihoods(family, tmp_path):
    """Each input run alone through each layer in turn, its inputs of several lengths: the loaded model's
    log-likelihoods at batch size 1 to the last bit (batched, they differ by the batch's rounding); the skeleton is left
    as it came."""
    source = _saved(tmp_path, family)
    loaded = _realigned(load_model(str(source), needs_tokenizer=False)[0])
    pairs = _pairs(loaded.config.vocab_size)
    model, weights = _stream(source)
    layers = list(adapters.decoder_layers(model))
    streamed_lls = loglikelihoods(model, pairs, progress=False, weights=weights)
    assert streamed_lls == loglikelihoods(loaded, pairs, batch_size=1, progress=False)
    assert streamed_lls == pytest.approx(loglikelihoods(loaded, pairs, progress=False), abs=1e-5)
    assert list(adapters.decoder_layers(model)) == layers and all(p.is_meta for p in model.parameters())


@needs_data
def test_evaluate_checkpoint_gives_evaluates_result_on_wikitext2(tmp_path):
    source = _saved(tmp_path)
    loaded, tokenizer, _ = load_model(str(source))
    whole = evaluate(loaded, tokenizer, "wikitext2", seqlen=32, limit=3, data_dir=DATA_DIR, progress=False)
    assert evaluate_checkpoint(str(source), "wikitext2", seqlen=32, limit=3, data_dir=DATA_DIR,
                               progress=False) == whole


def _task_file(tmp_path):
    """A zero-shot task whose contexts and choices differ in length (the tiny tokenizer reads a word as one token)."""
    rows = [{"context": " ".join(["a", "b"] * (i % 5 + 1)), "choices": [" a", " a b", " b a b"][:2 + i % 2],
             "label": i % 2} for i in range(9)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_evaluate_checkpoint_gives_evaluates_result_on_a_zero_shot_task(tmp_path):
    source, task = _saved(tmp_path), _task_file(tmp_path)
    loaded, tokenizer, _ = load_model(str(source))
    whole, streamed_samples = {}, {}
    expected = evaluate(loaded, tokenizer, task, progress=False, samples=whole)
    assert evaluate_checkpoint(str(source), task, progress=False, samples=streamed_samples) == expected
    assert [r["pred"] for r in streamed_samples[task]] == [r["pred"] for r in whole[task]]
    for got, want in zip(streamed_samples[task], whole[task]):
        assert got["loglikelihoods"] == pytest.approx(want["loglikelihoods"], abs=1e-5)


@needs_data
@pytest.mark.parametrize("fits", [True, False])
def test_several_tasks_read_the_layers_once(fits, tmp_path, monkeypatch):
    """Perplexity and two zero-shot tasks streamed: each layer read once for all three where their windows' hidden
    states fit together (once per task before: a large model's files read again for every task), else once per task; the
    loaded model's results either way."""
    source, task = _saved(tmp_path), _task_file(tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text(Path(task).read_text().replace('"label": 1', '"label": 0'))
    tasks = ["wikitext2", task, str(other)]
    loaded, tokenizer, _ = load_model(str(source))
    expected = evaluate(loaded, tokenizer, tasks, seqlen=32, limit=3, data_dir=DATA_DIR, progress=False)
    visits, visiting = [], placement.visiting
    monkeypatch.setattr(placement, "visiting",
                        lambda modules, *args: visits.append(modules) or visiting(modules, *args))
    if not fits:  # each task's windows fit alone, not the three tasks' together
        monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * 3 * 32 * loaded.config.hidden_size * 4)
    got = evaluate_checkpoint(str(source), tasks, seqlen=32, limit=3, data_dir=DATA_DIR, progress=False)
    assert got == expected
    layers = [modules for modules in visits if isinstance(modules[0], type(loaded.model.layers[0]))]
    assert len(layers) == 2 * (1 if fits else 3)


def test_hidden_states_that_cannot_fit_are_refused_before_any_layer_is_read(tmp_path, monkeypatch):
    source = _saved(tmp_path)
    model, weights = _stream(source)
    pairs = _pairs(model.config.vocab_size)
    inputs = {tuple((c + k)[:-1]) for c, k in pairs}
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(placement, "visiting", None)  # any read would fail otherwise than below
    with pytest.raises(ValueError, match=rf"the hidden states of {len(inputs)} evaluation windows "
                                         rf"\({sum(map(len, inputs))} tokens\) need .* on cpu, but .*: lower --limit"):
        loglikelihoods(model, pairs, progress=False, weights=weights)


def test_compressed_checkpoints_and_the_gguf_default_are_refused_before_the_model_is_read(tmp_path, capsys):
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "sdsengine_compressed.json").write_text("{}")
    with pytest.raises(ValueError, match="is a compressed checkpoint .* streaming reads the dense"):
        evaluate_checkpoint(str(tmp_path / "packed"), "wikitext2")
    assert main(["eval", "--tasks", "wikitext2", "--stream-weights"]) == 2  # the embedded model: a GGUF file
    assert "is a GGUF file, whose weights transformers dequantizes whole" in capsys.readouterr().err


@needs_data
def test_the_cli_evaluates_streamed(tmp_path, capsys):
    """Perplexity and zero-shot tasks in one run, with --samples: the loaded run's results and answers."""
    source = _saved(tmp_path)
    for name, streaming_flag in (("whole", []), ("streamed", ["--stream-weights"])):
        assert main(["eval", "--model", str(source), "--tasks", "wikitext2,piqa", "--seqlen", "32", "--limit", "3",
                     "--data-dir", str(DATA_DIR), "--json", str(tmp_path / f"{name}.json"),
                     "--samples", str(tmp_path / f"{name}.jsonl")] + streaming_flag) == 0
    results = [json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("whole", "streamed")]
    assert results[0] == results[1] and results[0]["wikitext2"]["windows"] == 3 and results[0]["piqa"]["n"] == 3
    answers = [[json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
               for n in ("whole", "streamed")]
    assert [a["pred"] for a in answers[0]] == [a["pred"] for a in answers[1]] and len(answers[0]) == 3
    assert "evaluation activations" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_streamed_model_scores_on_the_gpu_as_the_loaded_one_does(tmp_path):
    """Each layer lent on the GPU, the windows' hidden states kept there: the loaded model's perplexity and zero-shot
    log-likelihoods on the GPU (the same kernels, so equal up to the order of sums)."""
    source = _saved(tmp_path)
    loaded, _, _ = load_model(str(source), needs_tokenizer=False, device="cuda")
    model, weights = _stream(source)
    ids = _ids(loaded.config.vocab_size)
    whole = perplexity(loaded, ids, 16, progress=False)
    result = perplexity(model, ids, 16, device="cuda", progress=False, weights=weights)
    assert result["nll"] == pytest.approx(whole["nll"], rel=1e-5)
    pairs = _pairs(loaded.config.vocab_size)
    lls = loglikelihoods(model, pairs, device="cuda", progress=False, weights=weights)
    assert lls == pytest.approx(loglikelihoods(loaded, pairs, batch_size=1, progress=False), abs=1e-4)
    assert all(p.is_meta for p in model.parameters())
