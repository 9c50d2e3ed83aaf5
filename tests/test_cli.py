"""The CLI end to end on the real SmolLM2-135M (a few samples), and the errors a user can meet."""
import json
import os
from pathlib import Path

import pytest
import torch

from sdsengine.cli import main
from sdsengine.masks import nm_violations

DATA = Path(os.environ.get("SDSENGINE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """The embedded GGUF, converted once to a local HF directory (GGUF dequantizes on every load)."""
    pytest.importorskip("gguf")
    from sdsengine.models import load_model
    try:
        model, tokenizer, _ = load_model(None)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def data_env(monkeypatch):
    if not (DATA / "c4").is_dir():
        pytest.skip(f"no offline data directory at {DATA}")
    monkeypatch.setenv("SDSENGINE_DATA_DIR", str(DATA))


def test_prune_then_eval_real_model(smollm_dir, data_env, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(smollm_dir), "--method", "sparsegpt", "--sparsity", "2:4",
                 "--calib", "c4", "--nsamples", "4", "--seqlen", "128", "--out", str(out),
                 "--resume-dir", str(tmp_path / "progress")]) == 0
    assert not (tmp_path / "progress").exists()  # the progress goes once the checkpoint is saved
    report = json.loads((out / "sdsengine.json").read_text())
    assert report["calibration"]["nsamples"] == 4 and len(report["layers"]) == 30
    assert all(info["nm_violations"] == 0 for layer in report["layers"] for info in layer["linears"].values())
    peaks = [layer["memory"]["cpu_peak_rss_gib"] for layer in report["layers"]]  # the peak so far, after each
    assert 0 < peaks[0] and peaks == sorted(peaks) and peaks[-1] <= report["memory"]["cpu_peak_rss_gib"]
    # the process's peak when the prune began (the model load's), for telling the prune's own from it
    assert 0 < report["memory_at_start"]["cpu_peak_rss_gib"] <= peaks[0]
    assert report["versions"]["threads"] == torch.get_num_threads()
    log = capsys.readouterr().out.splitlines()
    first = log.index(next(line for line in log if line.startswith("layer  sparsity")))
    assert "peak RSS GiB" in log[first] and f"{peaks[-1]:.3f}" in log[first + 31]
    from safetensors.torch import load_file
    weights = load_file(out / "model.safetensors")
    down = weights["model.layers.3.mlp.down_proj.weight"]
    assert nm_violations(down, 2, 4) == 0 and (down == 0).float().mean() == 0.5
    assert "lm_head.weight" not in weights or (weights["lm_head.weight"] != 0).float().mean() > 0.99

    results = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--tasks", "wikitext2", "--seqlen", "128", "--limit", "2",
                 "--json", str(results)]) == 0
    dense = tmp_path / "dense.json"
    assert main(["eval", "--model", str(smollm_dir), "--tasks", "wikitext2", "--seqlen", "128", "--limit", "2",
                 "--json", str(dense)]) == 0
    pruned_r = json.loads(results.read_text())["results"]["wikitext2"]
    dense_r = json.loads(dense.read_text())["results"]["wikitext2"]
    assert {"ppl", "tokens", "windows", "seqlen"} <= set(pruned_r)
    assert pruned_r["windows"] == 2 and pruned_r["tokens"] == 256
    assert torch.isfinite(torch.tensor(pruned_r["ppl"])) and pruned_r["ppl"] > dense_r["ppl"]

    # convert (in float32, to compare exactly), then evaluate the compressed checkpoint itself: the same
    # perplexity as the pruned model's
    packed = tmp_path / "packed"
    assert main(["convert", "--model", str(out), "--out", str(packed), "--dtype", "float32"]) == 0
    packed_json = tmp_path / "packed.json"
    assert main(["eval", "--model", str(packed), "--tasks", "wikitext2", "--seqlen", "128", "--limit", "2",
                 "--json", str(packed_json)]) == 0
    packed_r = json.loads(packed_json.read_text())["results"]["wikitext2"]
    assert packed_r["ppl"] == pytest.approx(pruned_r["ppl"], rel=1e-5)
    # lean: no decompressed copies held, the same numbers; a model that is no compressed checkpoint is refused
    assert main(["eval", "--model", str(packed), "--tasks", "wikitext2", "--seqlen", "128", "--limit", "2",
                 "--json", str(packed_json), "--overwrite", "--lean"]) == 0
    assert json.loads(packed_json.read_text())["results"]["wikitext2"]["ppl"] == packed_r["ppl"]
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--tasks", "wikitext2", "--lean"]) == 2
    assert f"--lean applies to a compressed checkpoint (written by sdsengine convert), and {out} is not one" in \
        capsys.readouterr().err
    assert main(["prune", "--model", str(packed), "--method", "magnitude", "--sparsity", "2:4",
                 "--out", str(tmp_path / "again")]) == 2
    assert "is a compressed checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--method", "obs", "--sparsity", "2:4"], "unknown method 'obs'"),
    (["--method", "wanda", "--sparsity", "4:2"], "0 < N < M"),
    (["--method", "wanda", "--sparsity", "1.5"], r"\[0, 1\)"),
    (["--method", "wanda", "--sparsity", "2:4", "--blocksize", "64"], "--blocksize does not apply to method 'wanda'"),
    (["--method", "wanda", "--sparsity", "2:4", "--model", "/nonexistent/model.gguf"], "GGUF model file not found"),
    (["--method", "wanda", "--sparsity", "2:4", "--model", "/tmp"], "not a Hugging Face model directory"),
    (["--method", "wanda", "--sparsity", "2:4", "--model", "/nonexistent"], "model not found: /nonexistent is not"),
    (["--method", "wanda", "--sparsity", "2:4", "--model", "./my/model"], "model not found: my/model is not"),
])
def test_bad_input_is_named(args, message, tmp_path, capsys):
    assert main(["prune", *args, "--out", str(tmp_path / "o")]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", [["prune", "--method", "wanda", "--sparsity", "2:4"], ["eval"], ["demo"]])
def test_missing_gpu_is_named_before_model_time(command, tmp_path, capsys, monkeypatch):
    import sdsengine.cli as cli
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = ["--out", str(tmp_path / "o")] if command[0] == "prune" else []
    assert main([*command, "--device", "cuda", *out]) == 2
    assert "device 'cuda': no CUDA GPU is visible here" in capsys.readouterr().err


def test_existing_output_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("precious")
    assert main(["prune", "--method", "wanda", "--sparsity", "2:4", "--model", "/nonexistent.gguf",
                 "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "mine.txt").read_text() == "precious"


def test_foreign_resume_directory_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("precious")
    assert main(["prune", "--method", "wanda", "--sparsity", "2:4", "--model", "/nonexistent.gguf",
                 "--out", str(tmp_path / "o"), "--resume-dir", str(tmp_path)]) == 2
    assert "holds no sdsengine progress" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_real_model_limits(smollm_dir, data_env, tmp_path, capsys):
    assert main(["prune", "--model", str(smollm_dir), "--method", "wanda", "--sparsity", "2:4", "--seqlen",
                 "100000", "--nsamples", "1", "--out", str(tmp_path / "a")]) == 2
    assert "exceeds the model's maximum" in capsys.readouterr().err
    assert main(["prune", "--model", str(smollm_dir), "--method", "wanda", "--sparsity", "2:4", "--seqlen",
                 "2048", "--nsamples", "5000", "--out", str(tmp_path / "b")]) == 2
    assert "fewer than nsamples=5000" in capsys.readouterr().err
    assert main(["eval", "--model", str(smollm_dir), "--tasks", "lambada"]) == 2
    assert "unknown task 'lambada'" in capsys.readouterr().err
    assert main(["eval", "--model", str(smollm_dir), "--tasks", "wikitext2", "--seqlen", "0"]) == 2
    assert "at least 2 tokens (seqlen), got 0" in capsys.readouterr().err
    assert main(["eval", "--model", str(smollm_dir), "--tasks", "wikitext2", "--samples", str(tmp_path / "s")]) == 2
    assert "none of the tasks 'wikitext2' is zero-shot" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_eval_writes_each_items_answer(smollm_dir, tmp_path):
    """--samples: one JSONL line per zero-shot item, whose answers give the --json file's accuracy."""
    task = tmp_path / "mine.jsonl"
    rows = [{"context": "The capital of France is", "choices": [" Paris", " a banana"], "label": 0},
            {"context": "Two plus two is", "choices": [" four", " purple"], "label": 1},
            {"context": "Water is", "choices": [" wet", " dry", " loud"], "label": 0}]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, results = tmp_path / "samples.jsonl", tmp_path / "eval.json"
    assert main(["eval", "--model", str(smollm_dir), "--tasks", str(task), "--json", str(results),
                 "--samples", str(samples)]) == 0
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(r["task"], r["index"], r["label"], r["choices"]) for r in lines] == [
        (str(task), i, row["label"], row["choices"]) for i, row in enumerate(rows)]
    assert all(r["pred"] == max(range(len(r["choices"])), key=r["loglikelihoods"].__getitem__) for r in lines)
    acc = json.loads(results.read_text())["results"][str(task)]["acc"]
    assert acc == pytest.approx(sum(r["pred"] == r["label"] for r in lines) / len(lines))


def test_convert_cli_round_trip(tmp_path, capsys):
    """Prune a tiny GPT-2 (Conv1D weights) 2:4, convert through the CLI, load it back: same logits."""
    import sdsengine
    from tiny_models import tiny_model, tiny_tokens
    from sdsengine.checkpoint import save_checkpoint
    model = tiny_model("gpt2")
    result = sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), None, progress=False)
    src = save_checkpoint(model, None, tmp_path / "pruned", result.report)
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "packed"), "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    assert "8 of 9 linears converted" in out.out  # lm_head stays dense
    assert "float32 SparseLinears always run the dense fallback" in out.err
    packed = sdsengine.load_compressed(tmp_path / "packed")
    ids = tiny_tokens(1, 8)
    torch.testing.assert_close(packed(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # saved without a tokenizer: none is made up for it (transformers builds an empty GPT-2 one, which convert
    # saved as the model's, so that eval of the result read every text as no tokens)
    assert not any((tmp_path / "packed" / name).exists() for name in ("vocab.json", "tokenizer_config.json"))


@pytest.mark.parametrize("saved,expected", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.bfloat16, torch.bfloat16)])
def test_convert_writes_a_dtype_the_sparse_kernels_run(tmp_path, capsys, saved, expected):
    """Without --dtype: a float16/bfloat16 checkpoint keeps its dtype; a float32 one (prune's default) is
    converted in bfloat16, and convert says so."""
    import sdsengine
    from tiny_models import tiny_model
    from sdsengine.checkpoint import save_checkpoint
    model = tiny_model("gpt2")  # as in test_convert_cli_round_trip: load_model accepts its directory
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), None, progress=False)
    src = save_checkpoint(model.to(saved), None, tmp_path / "pruned", {})
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "packed")]) == 0
    assert ("converting in bfloat16" in capsys.readouterr().out) == (saved == torch.float32)
    manifest = json.loads((tmp_path / "packed" / "sdsengine_compressed.json").read_text())
    assert {spec["dtype"] for spec in manifest["sparse_modules"].values()} == {str(expected).removeprefix("torch.")}


def test_convert_overwrite_and_its_own_source(tmp_path, capsys):
    """A non-empty --out needs --overwrite; --out naming the model being converted is refused either way."""
    import sdsengine
    from tiny_models import tiny_model
    from sdsengine.checkpoint import save_checkpoint
    model = tiny_model("gpt2")  # as in test_convert_cli_round_trip: load_model accepts its directory
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), None, progress=False)
    src = save_checkpoint(model, None, tmp_path / "pruned", {})
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "old.txt").write_text("old")
    assert main(["convert", "--model", str(src), "--out", str(packed), "--overwrite"]) == 2
    assert "holds no model checkpoint" in capsys.readouterr().err and (packed / "old.txt").exists()
    (packed / "config.json").write_text("{}")  # an earlier checkpoint: --overwrite replaces it
    assert main(["convert", "--model", str(src), "--out", str(packed)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (packed / "old.txt").exists()
    assert main(["convert", "--model", str(src), "--out", str(packed), "--overwrite"]) == 0
    assert not (packed / "old.txt").exists() and (packed / "sdsengine_compressed.json").exists()
    assert main(["convert", "--model", str(src), "--out", str(src), "--overwrite"]) == 2
    assert "would replace the model being converted" in capsys.readouterr().err
    assert (src / "config.json").exists()
    (tmp_path / "mine.txt").write_text("mine")  # --out holding the model: its save would remove the model
    assert main(["convert", "--model", str(src), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "would replace the model being converted" in capsys.readouterr().err
    assert (src / "config.json").exists() and (tmp_path / "mine.txt").read_text() == "mine"


def test_convert_cli_refuses_a_model_with_nothing_to_convert(tmp_path, capsys):
    """Unstructured 50% saves neither time nor memory: convert says so and writes nothing."""
    import sdsengine
    from tiny_models import tiny_model
    from sdsengine.checkpoint import save_checkpoint
    model = tiny_model("gpt2")
    result = sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="0.5"), None, progress=False)
    src = save_checkpoint(model, None, tmp_path / "pruned", result.report)
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "packed")]) == 2
    err = capsys.readouterr().err
    assert "none of its 9 linears can be converted (ignored; not 2:4)" in err and "--sparsity 2:4" in err
    assert not (tmp_path / "packed").exists()


def test_ignore_flag_reaches_the_config_as_patterns():
    """--ignore takes comma-separated patterns (it once reached the config split into characters)."""
    from sdsengine.cli import _config_from, build_parser
    from sdsengine.config import WandaConfig
    args = build_parser().parse_args(["prune", "--method", "wanda", "--sparsity", "2:4", "--ignore",
                                      "model.layers.0.*,*.down_proj", "--out", "x"])
    args._config_flags = {"sparsity", "ignore"}
    assert _config_from(args, WandaConfig).ignore == ("model.layers.0.*", "*.down_proj")


@pytest.mark.parametrize("wanda_flags,ours", [
    (["--sparsity_ratio", "0.5", "--sparsity_type", "unstructured"], "0.5"),
    (["--sparsity_ratio", "0.6"], "0.6"),
    (["--sparsity_ratio", "0.5", "--sparsity_type", "2:4"], "2:4"),
    (["--sparsity_type", "4:8"], "4:8"),
])
def test_wanda_flags_mean_our_sparsity(wanda_flags, ours):
    """A command copied from Wanda's README (--prune_method, --sparsity_ratio/--sparsity_type,
    --save_model) runs as the same prune written with our flags."""
    from sdsengine.cli import build_parser, sparsity_from
    args = build_parser().parse_args(["prune", "--prune_method", "wanda", *wanda_flags, "--nsamples", "128",
                                      "--seed", "0", "--save_model", "out/llama"])
    assert (args.method, sparsity_from(args), args.out, args.nsamples) == ("wanda", ours, "out/llama", 128)


@pytest.mark.parametrize("flags, message", [
    (["--method", "sparsegpt", "--prune_method", "wanda"], "--prune_method wanda contradicts the sparsegpt"),
    (["--method", "wanda", "--out", "a", "--save_model", "b"], "--save_model b contradicts the a"),
    (["--method", "wanda", "--out", "a", "--dataset", "c4", "--calib", "wikitext2"], "--calib wikitext2 contradicts"),
    (["--method", "wanda", "--out", "a", "--nsamples", "4", "--nsamples", "8"], "--nsamples 8 contradicts the 4"),
    (["--method", "wanda", "--sparsity_ratio", "0.5", "--sparsity_ratio", "0.6"], "--sparsity_ratio 0.6 contradicts"),
    (["--method", "wanda", "--model", "a", "--model", "b"], "--model b contradicts the a"),
    (["--method", "wanda", "--resume-dir", "r1", "--resume-dir", "r2"], "--resume-dir r2 contradicts the r1"),
    (["--method", "wanda", "--dtype", "float16", "--dtype", "bfloat16"], "--dtype bfloat16 contradicts"),
])
def test_a_setting_given_twice_with_different_values_is_refused(flags, message, capsys):
    """Wanda's aliases name our settings: --prune_method sparsegpt --method wanda must not run one of them."""
    from sdsengine.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", *flags, "--sparsity", "2:4", "--out", "a"])
    assert message in capsys.readouterr().err
    args = build_parser().parse_args(["prune", "--method", "wanda", "--prune_method", "wanda", "--sparsity", "2:4",
                                      "--out", "a", "--save_model", "a"])  # the same value twice is fine
    assert (args.method, args.out) == ("wanda", "a")


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "2:4", "--sparsity_type", "2:4"], "not both"),
    (["--sparsity_type", "2:4", "--sparsity_ratio", "0.6"], "2:4 is 0.5 sparse, but --sparsity_ratio is 0.6"),
    (["--sparsity_type", "unstructured"], "needs --sparsity_ratio"),
    (["--sparsity_type", "0.5"], "use unstructured or N:M"),
    ([], "the sparsity is required"),
    (["--sparsity", "2:4", "--save", "logs"], "Wanda's --save"),
])
def test_bad_sparsity_flags_are_named(args, message, tmp_path, capsys):
    assert main(["prune", "--method", "wanda", *args, "--model", "/nonexistent.gguf",
                 "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_layer_table_shows_the_peaks_and_older_reports():
    from sdsengine.pipeline.sequential import LayerReport
    from sdsengine.report import layer_table
    linears = {"q": {"shape": [4, 8], "sparsity": 0.5}}
    rows = layer_table([LayerReport(0, 1.5, 0.25, linears),  # saved by a run before memory was recorded
                        LayerReport(1, 2.0, None, linears, memory={"cpu_peak_rss_gib": 1.25,
                                                                   "gpu_peak_allocated_gib": 3.5})]).splitlines()
    assert rows[0].split("  ")[-2:] == ["peak RSS GiB", "peak GPU GiB"]
    assert rows[2].split()[-2:] == ["n/a", "n/a"] and rows[3].split()[-2:] == ["1.250", "3.500"]


def test_a_visible_gpu_left_idle_is_mentioned(monkeypatch, capsys):
    from sdsengine import cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cli._note_unused_gpu("cpu")
    assert "a GPU is visible but this runs on the CPU; --device cuda" in capsys.readouterr().err
    cli._note_unused_gpu("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli._note_unused_gpu("cpu")
    assert capsys.readouterr().err == ""


def test_magnitude_ignores_a_resume_directory_and_leaves_it_alone(tmp_path, capsys):
    """Magnitude uses no data, so it says it ignores --resume-dir: that progress (another run's) stays."""
    from tiny_models import save_tiny_tokenizer, tiny_model
    tiny_model("llama").save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    progress = tmp_path / "progress"
    progress.mkdir()
    (progress / "progress.json").write_text(json.dumps({"fingerprint": "another run", "done": 1, "reports": []}))
    (progress / "layer-0000.pt").write_text("another run's layer")
    assert main(["prune", "--model", str(tmp_path / "model"), "--method", "magnitude", "--sparsity", "2:4",
                 "--out", str(tmp_path / "out"), "--resume-dir", str(progress)]) == 0
    assert "ignoring --resume-dir" in capsys.readouterr().err
    assert sorted(p.name for p in progress.iterdir()) == ["layer-0000.pt", "progress.json"]


def test_an_interrupted_prune_says_what_is_kept(tmp_path, capsys, monkeypatch):
    import sdsengine.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "load_model", interrupted)
    argv = ["prune", "--method", "wanda", "--sparsity", "2:4", "--out", str(tmp_path / "out")]
    assert main([*argv, "--resume-dir", str(tmp_path / "progress")]) == 130
    assert f"interrupted; finished layers are kept in {tmp_path / 'progress'}" in capsys.readouterr().err
    assert main(argv) == 130 and capsys.readouterr().err == "sdsengine: interrupted\n"
    assert not (tmp_path / "out").exists()


def test_a_prune_interrupted_after_its_save_names_the_checkpoint(tmp_path, capsys, monkeypatch):
    """Ctrl-C between the checkpoint's save and the progress's removal said only that finished layers were
    kept in --resume-dir, as if the run had to be resumed: the checkpoint is there, the progress not needed."""
    import sdsengine.cli as cli
    from tiny_models import save_tiny_tokenizer, tiny_model
    tiny_model("llama").save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.ResumeStore, "clear", interrupted)
    out, progress = tmp_path / "out", tmp_path / "progress"
    assert main(["prune", "--model", str(tmp_path / "model"), "--method", "wanda", "--sparsity", "2:4", "--calib",
                 str(tmp_path / "calib.txt"), "--nsamples", "2", "--seqlen", "8", "--out", str(out),
                 "--resume-dir", str(progress)]) == 130
    assert (f"interrupted after the checkpoint was saved to {out}; {progress} (--resume-dir) is no longer needed: "
            "delete it") in capsys.readouterr().err
    assert (out / "config.json").is_file()


def test_a_dry_run_checks_and_plans_without_reading_a_weight(tmp_path, capsys, monkeypatch):
    """--dry-run: the model as a skeleton (from_pretrained never called), the calibration windows built, the plan
    printed, nothing pruned or saved; a mistake a run would refuse is refused the same."""
    import transformers

    from tiny_models import save_tiny_tokenizer, tiny_model
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("a " * 2000)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", None)  # any weight load fails
    flags = ["prune", "--model", str(tmp_path / "model"), "--method", "sds", "--teacher", "dense", "--sparsity", "2:4",
             "--calib", str(tmp_path / "calib.txt"), "--nsamples", "3", "--seqlen", "16", "--out", str(tmp_path / "out"),
             "--dry-run", "--ignore", "model.layers.0.mlp"]
    assert main(flags) == 0
    text = capsys.readouterr().out
    hidden, inner = model.config.hidden_size, model.config.intermediate_size
    assert "dry run, nothing pruned or saved: sds 2:4" in text and "2 decoder layers; 11 linears to prune, 3 kept" in text
    assert f"model weights: {sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20:.1f} MiB (float32)" in text
    # the dense stream: four activation buffers; a layer's Hessians with their two dense-stream companions
    assert f"calibration activations: {4 * 3 * 16 * hidden * 4 / 2 ** 20:.1f} MiB on cpu (3 windows x 16" in text
    assert f"up to {3 * 4 * (6 * hidden ** 2 + inner ** 2) / 2 ** 20:.1f} MiB" in text
    assert not (tmp_path / "out").exists()
    assert main(flags[:-1] + ["model.layer.0.mlp"]) == 2
    assert "--ignore pattern(s) ['model.layer.0.mlp'] match no module" in capsys.readouterr().err
