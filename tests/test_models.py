"""Where load_model puts a model's weights as they load."""
import json
import warnings

import pytest
import torch
import transformers

from sdsengine.checkpoint import save_checkpoint
from sdsengine.models import load_model
from tiny_models import save_tiny_tokenizer, tiny_model


@pytest.fixture
def saved(tmp_path):
    path = save_checkpoint(tiny_model("llama"), None, tmp_path / "model", {})
    save_tiny_tokenizer(path)
    return path


@pytest.fixture
def loads(monkeypatch):
    """from_pretrained's keyword arguments, per call; the weights still load on the host (no GPU here)."""
    calls, real = [], transformers.AutoModelForCausalLM.from_pretrained

    def recording(location, **kwargs):
        calls.append(dict(kwargs))
        if "device_map" in kwargs:
            kwargs["device_map"] = {"": "cpu"}
        return real(location, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    return calls


def test_a_checkpoint_evaluated_on_a_gpu_loads_straight_there(saved, loads):
    pytest.importorskip("accelerate")
    model, _, _ = load_model(saved, device="cuda:1")
    assert loads[-1]["device_map"] == {"": "cuda:1"}
    assert not model.training and next(model.parameters()).dtype == torch.float32
    reference, _, _ = load_model(saved)
    assert "device_map" not in loads[-1]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_the_host_load_stays_as_it_was_on_cpu_and_without_accelerate(saved, loads, monkeypatch):
    load_model(saved, device="cpu")
    assert "device_map" not in loads[-1]
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "accelerate"
                        else real_find_spec(name, *a))
    with pytest.warns(UserWarning, match="accelerate is not installed, so the model loads in host memory"):
        load_model(saved, device="cuda")
    assert "device_map" not in loads[-1]


@pytest.mark.parametrize("dtype, loaded", [(None, "float32"), ("bfloat16", "bfloat16"), ("auto", "as stored")])
def test_weights_beyond_the_hosts_memory_are_said_before_the_load(saved, monkeypatch, dtype, loaded):
    """A model loaded whole that cannot fit was killed (or swapped) minutes into its load, without a word on
    --stream-weights."""
    from sdsengine.pipeline import memory
    size = sum(p.numel() for p in tiny_model("llama").parameters()) * (2 if dtype == "bfloat16" else 4)
    monkeypatch.setattr(memory, "available_bytes", lambda device: size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(saved, dtype)  # it fits, to the byte
    monkeypatch.setattr(memory, "available_bytes", lambda device: size - 1)
    said = rf"its weights take .* loaded \({loaded}\), more than the .* available on this host: loaded whole, the run "
    with pytest.warns(UserWarning, match=said + r"will likely fail or swap. --stream-weights"):
        load_model(saved, dtype)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])  # GPT-OSS keeps its norms float32 in float16
def test_a_skeleton_is_the_model_without_its_weights(tmp_path, loads, family, dtype):
    """What the processes of a data-parallel prune after the first load: the loaded model's parameters and buffers by
    name, shape and dtype (a mixture's float32 routers, Gemma's embedding scale), its parameters on the meta device, its
    buffers computed (rotary frequencies), and no weights read."""
    path = save_checkpoint(tiny_model(family), None, tmp_path / "model", {})
    save_tiny_tokenizer(path)
    model, _, _ = load_model(path, dtype)
    skeleton, tokenizer, _ = load_model(path, dtype, skeleton=True)
    assert len(loads) == 1 and tokenizer is not None and not skeleton.training

    def described(m):
        return [(name, t.shape, t.dtype) for name, t in (*m.named_parameters(), *m.named_buffers())]
    assert described(skeleton) == described(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert all(torch.equal(a, b) for a, b in zip(skeleton.buffers(), model.buffers()))


@pytest.mark.parametrize("family, names", [("llama4_text", r"'llama4_text' \(a mixture-of-experts model whose .*"
                                                          r"experts\.gate_up_proj"),
                                           ("bert", r"'bert'; supported: ")])
def test_an_unsupported_layout_is_refused_before_its_weights_load(tmp_path, monkeypatch, family, names):
    """A Llama-4-Scout's weights (over 400 GB in fp32) loaded, for minutes or until the host ran out of memory, before
    its layout was refused; now the config says it, with the same message the loaded model would give."""
    if family == "bert":
        from transformers import BertConfig, BertForMaskedLM
        model = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32))
    else:
        model = tiny_model(family)
    path = save_checkpoint(model, None, tmp_path / "model", {})
    save_tiny_tokenizer(path)

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=f"unsupported model layout {names}"):
        load_model(path)


def test_a_gguf_tokenizer_adds_no_bos_the_file_does_not_ask_for_and_survives_a_save(tmp_path, monkeypatch):
    """transformers 4.57 and 5.0 build SmolLM2's GGUF tokenizer adding a BOS token that the file's
    tokenizer.ggml.add_bos_token (false) rules out, and 5.0's CodeLlamaTokenizer reloads from a saved run with
    every space mapped to the unknown token. Stood in for here: the tokenizer this transformers builds, with a
    BOS template and a class of its own, as those versions return it."""
    pytest.importorskip("gguf")
    from tokenizers import processors

    from sdsengine.models import _load_tokenizer, default_gguf
    try:
        gguf = default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))

    class OlderGGUFTokenizer(transformers.PreTrainedTokenizerFast):
        """Saves under a class name of its own, which from_pretrained cannot find again as it was; adds a BOS
        until told not to (as LlamaTokenizerFast's add_bos_token rebuilds its template)."""

        @property
        def add_bos_token(self):
            return self._adds_bos

        @add_bos_token.setter
        def add_bos_token(self, value):
            self._adds_bos = value
            bos = f"{self.bos_token} " if value else ""
            self.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos}$A", pair=f"{bos}$A {bos}$B",
                special_tokens=[(self.bos_token, self.bos_token_id)] if value else [])

    real = transformers.AutoTokenizer.from_pretrained

    def as_older_versions_build_it(location, **kwargs):
        built = real(location, **kwargs)
        built.__class__ = OlderGGUFTokenizer
        built.add_bos_token = True
        return built
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", as_older_versions_build_it)
    tokenizer = _load_tokenizer(str(gguf.parent), gguf, "the embedded model", gguf.name)
    monkeypatch.undo()
    text = "The capital of France is Paris.\n\nIt is"
    ids = tokenizer(text).input_ids
    assert ids == tokenizer(text, add_special_tokens=False).input_ids, "a BOS the GGUF file does not ask for"
    assert ids[0] != tokenizer.bos_token_id
    tokenizer.save_pretrained(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == ids


def test_a_model_no_method_prunes_is_still_evaluated(tmp_path, capsys):
    """eval needs no layout: a dense baseline of a mixture-of-experts model (which prune refuses) is scored."""
    from sdsengine.cli import main
    path = save_checkpoint(tiny_model("llama4_text"), None, tmp_path / "moe", {})
    save_tiny_tokenizer(path)
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "a", "choices": [" a", " a a"], "label": 0}\n')
    results = tmp_path / "results.json"
    assert main(["eval", "--model", str(path), "--tasks", str(task), "--json", str(results)]) == 0
    assert json.loads(results.read_text())["results"][str(task)]["n"] == 1
    assert main(["prune", "--model", str(path), "--method", "magnitude", "--sparsity", "2:4",
                 "--out", str(tmp_path / "out")]) == 2
    assert "unsupported model layout 'llama4_text'" in capsys.readouterr().err
