"""The kernel benchmarks' smoke paths and the summary, on CPU with tiny shapes.

Both sides run the PyTorch reference (--backend torch): the Triton kernels have their own tests in
tests/kernels, and under the interpreter they would only slow this down. What is checked here is the
harness: cases, timing, records with every required field, the time budget, the results files, summarize.
"""
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdsengine import ops
from test_grouped_experts import fake_grouped_kernel
from tiny_models import needs_fused_experts, tiny_model, tiny_tokens

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
REQUIRED = {"bench", "shape", "dtype", "pattern", "gpu", "torch", "triton", "cuda", "ms", "baseline_ms", "speedup",
            "target", "target_met", "status"}
BANDWIDTH = {"bytes", "gbps", "copy_gbps", "frac_copy_bw"}
BENCHES = {  # name: (fields beyond REQUIRED, patterns, dtypes)
    "wanda": (BANDWIDTH | {"mismatch"}, {"2:4", "0.5"}, {"float16", "bfloat16"}),
    "compress": (BANDWIDTH | {"mismatch", "copy_ms", "vs_copy"}, {"2:4"}, {"float16", "bfloat16"}),
    "sparsegpt": ({"rel_err"}, {"2:4", "0.5"}, {"float32"}),
    "nm_mask": (BANDWIDTH | {"mismatch"}, {"2:4"}, {"float32", "float64"}),
}


@pytest.fixture
def benchmark(monkeypatch):
    """Imports a module of benchmarks/ as its scripts do (their folder first on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def run_smoke(benchmark, name, out, *flags, stem=None):
    assert benchmark(f"bench_{name}").main(["--smoke", "--backend", "torch", "--out", str(out), *flags]) == 0
    return json.loads((out / f"{stem or name + '-smoke'}.json").read_text())


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_smoke_records_have_the_fields(benchmark, name, tmp_path):
    fields, patterns, dtypes = BENCHES[name]
    records = run_smoke(benchmark, name, tmp_path)
    assert (tmp_path / f"{name}-smoke.md").read_text().count("\n| ") == len(records) + 1
    assert {r["pattern"] for r in records} == patterns and {r["dtype"] for r in records} == dtypes
    assert {r["shape"] for r in records} == {"64x128", "96x256"}
    for r in records:
        assert r["status"] == "ok", r
        assert REQUIRED | fields <= r.keys(), REQUIRED | fields - r.keys()
        assert r["bench"] == name and r["gpu"] == "cpu"
        assert r["ms"] > 0 and r["speedup"] == pytest.approx(r["baseline_ms"] / r["ms"])
        assert isinstance(r["target_met"], bool)
        assert r.get("mismatch", 0) == 0 and r.get("rel_err", 0) == 0  # the same reference on both sides


def test_the_disagreement_fields_see_a_difference(benchmark):
    """The smoke runs compare the reference with itself (0 by construction); the measures themselves must
    report a flipped mask bit or a changed weight."""
    harness = benchmark("harness")
    mask = torch.ones(4, 8, dtype=torch.bool)
    flipped = mask.clone()
    flipped[1, 3] = False
    assert harness.mismatch((mask, torch.zeros(2)), (flipped, torch.zeros(2))) == pytest.approx(1 / 32)
    assert harness.mismatch((mask,), (mask.clone(),)) == 0
    w = torch.ones(4, 8)
    assert ops.relative_error(w * 1.01, w) == pytest.approx(0.01, rel=1e-3)  # bench_sparsegpt's rel_err


def test_spent_budget_records_skips(benchmark, tmp_path):
    records = run_smoke(benchmark, "compress", tmp_path, "--budget", "0")
    assert len(records) == 4
    assert all(r["status"] == "skipped" and r["error"] == "time budget spent" for r in records)


def test_a_failed_case_fails_the_benchmark_and_bad_flags_are_usage_errors(benchmark, tmp_path, capsys):
    """A case that raises is a failed record and exit status 1 (the suite's step table must not read ok);
    a flag the harness cannot read stops before any work with argparse's usage error, not a traceback."""
    compress = benchmark("bench_compress")
    assert compress.main(["--smoke", "--backend", "torch", "--out", str(tmp_path), "--shapes", "64x130"]) == 1
    for flags in (["--dtypes", "foo"], ["--dtypes", ""], ["--shapes", "64by128"]):
        with pytest.raises(SystemExit) as stop:
            compress.main(["--smoke", "--out", str(tmp_path / "never"), *flags])
        assert stop.value.code == 2 and "error: --" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_summary_lists_ratios_and_problems(benchmark, tmp_path, capsys):
    tiny = ("--shapes", "32x64", "--dtypes", "float16")
    run_smoke(benchmark, "wanda", tmp_path, "--name", "wanda", *tiny, stem="wanda")
    run_smoke(benchmark, "compress", tmp_path, "--name", "compress", *tiny, "--budget", "0", stem="compress")
    cut = {"bench": "methods", "method": "besa", "pattern": "2:4", "shape": "7b/1", "status": "cut", "error": "97 s"}
    (tmp_path / "methods.json").write_text(json.dumps([cut]))
    steps = ["step\tstatus\trc\tseconds", "install\tok\t0\t50", "e2e\ttimeout\t124\t60"]
    (tmp_path / "suite_steps.tsv").write_text("\n".join(steps) + "\n")
    capsys.readouterr()
    assert benchmark("summarize").main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["wanda", "2:4", "float16", "1"] in [row[:4] for row in rows]
    assert ["wanda", "0.5", "float16", "1"] in [row[:4] for row in rows]
    assert "step e2e: timeout (rc 124, 60 s)" in out and "step install" not in out
    assert "compress 32x64 float16 2:4: skipped (time budget spent)" in out
    assert "methods 7b/1 besa 2:4: cut (97 s)" in out  # a method's record names the method
    # of the steps this run had, e2e wrote nothing; those it did not have are not missed
    assert "e2e: no results" in out and "sparsegpt" not in out and "spmm" not in out
    # wanda and compress ran, yet are no step of this run's table: a SUITE_STEPS re-run keeps older files
    assert "from an earlier run (not a step of this one): wanda, compress" in out


def test_summary_keeps_how_earlier_steps_ended_and_counts_wrong_outputs_as_failed(benchmark, tmp_path, capsys):
    """After a SUITE_STEPS re-run: the other steps' statuses from suite_steps_earlier.tsv (a timeout there is
    still an issue); a record whose output disagrees with its reference is failed and left out of the
    ratios; an unreadable results file is named and the other benches are still summarized."""
    (tmp_path / "suite_steps.tsv").write_text("step\tstatus\trc\tseconds\ne2e\tok\t0\t80\n")
    (tmp_path / "suite_steps_earlier.tsv").write_text(
        "step\tstatus\trc\tseconds\nspmm\ttimeout\t124\t50\nwanda\tok\t0\t30\n")
    base = {"bench": "spmm", "shape": "64x64", "dtype": "float16", "backend": "sdsengine", "status": "ok",
            "speedup": 1.5}
    (tmp_path / "spmm.json").write_text(json.dumps([{**base, "tokens": 1, "rel_err": 1e-3},
                                                    {**base, "tokens": 16, "rel_err": 0.5, "speedup": 9.0}]))
    (tmp_path / "wanda.json").write_text('[{"bench": "wanda", "pattern": "2:4", "mismatch": 0.25, "speedup": 3}]')
    (tmp_path / "e2e.json").write_text('[{"bench": "e2e_decode", "sp')  # cut short
    (tmp_path / "wgmma_tiles.json").write_text(json.dumps([{  # what sweep_wgmma records off 9.0: by design
        "bench": "wgmma", "status": "skipped", "error": "needs compute capability 9.0 (wgmma.sp is sm_90a code)"}]))
    capsys.readouterr()
    assert benchmark("summarize").main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "from an earlier run (not a step of this one): wanda (ok), spmm (timeout)" in out
    assert "step spmm (an earlier run): timeout (rc 124, 50 s)" in out
    assert "spmm 64x64 float16 sdsengine x 16 tokens: output differs from its reference (mismatch None, rel_err 0.5)" in out
    assert "wanda None None 2:4: output differs from its reference (mismatch 0.25" in out
    assert "e2e: unreadable results (JSONDecodeError" in out and "needs compute capability 9.0" not in out
    spmm_row = next(line.split() for line in out.splitlines() if line.startswith("spmm "))
    assert spmm_row[3:5] == ["1", "1.5"]  # n, then the speedup of the one right record


def test_summary_names_the_test_steps_skips_that_are_not_by_design(benchmark, tmp_path, capsys):
    """A test step whose tests all skipped exits 0 and reads ok: the summary lists its skips, folded by kind,
    but not those a GPU of this kind has by design (CUTLASS off 8.x)."""
    skips = ["tests/test_ops.py::a[cutlass]\tPyTorch's CUTLASS 2:4 kernel needs compute capability 8.x, not 9.0",
             "tests/test_ops.py::a[cusparselt-16]\tcuSPARSELt (plain form) failed its self-check: wrong result 0.5",
             "tests/test_ops.py::a[cusparselt-1]\tcuSPARSELt (plain form) failed its self-check: wrong result 0.25"]
    (tmp_path / "gpu_tests_skips.tsv").write_text("\n".join(skips) + "\n")
    (tmp_path / "suite_steps.tsv").write_text("step\tstatus\trc\tseconds\ngpu_tests\tok\t0\t90\n")
    capsys.readouterr()
    assert benchmark("summarize").main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step gpu_tests: 2 test(s) skipped: cuSPARSELt (plain form) failed its self-check: wrong result #.#" in out
    assert "CUTLASS" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite's tests skip only without a GPU")
def test_the_gpu_suites_tests_write_their_skips_and_refuse_to_run_without_a_gpu(tmp_path):
    """The GPU suite's test steps (tests/conftest.py): each skip and its reason go to SDSENGINE_SKIPS; with
    SDSENGINE_GPU_SUITE=1 and no CUDA device pytest stops with a usage error instead of skipping everything."""
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_methods_gpu.py"]
    skips = tmp_path / "skips.tsv"
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, SDSENGINE_SKIPS=str(skips)))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = skips.read_text().splitlines()
    skipped = int(re.search(r"(\d+) skipped", done.stdout).group(1))
    assert len(lines) == skipped > 0 and all(line.endswith("\tneeds a CUDA GPU") for line in lines), lines
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, SDSENGINE_GPU_SUITE="1"))
    assert done.returncode == 4 and "torch sees no CUDA device" in done.stderr, done.stdout + done.stderr


def test_summary_shows_the_host_wait(benchmark, tmp_path, capsys):
    """ms / device_ms (> 1: the call waited on its host side) per group, and in a missed target's line."""
    base = {"bench": "wanda", "shape": "64x64", "dtype": "float16", "pattern": "0.5", "status": "ok",
            "target": "gbps >= 0.7 x copy", "frac_copy_bw": 0.2}
    records = [{**base, "ms": 0.3, "device_ms": 0.1, "target_met": False},
               {**base, "shape": "128x64", "ms": 0.2, "device_ms": 0.2, "target_met": True}]
    (tmp_path / "wanda.json").write_text(json.dumps(records))
    capsys.readouterr()
    assert benchmark("summarize").main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ms/device_ms" in out and "2 [1, 3]" in out
    assert "wanda 64x64 float16 0.5: target missed (gbps >= 0.7 x copy; frac_copy_bw 0.2, ms/device_ms 3)" in out


def test_summary_flags_a_decode_speedup_of_unlike_runs(benchmark, tmp_path, capsys):
    """A graph capture that failed on one side only: eager against graph replay is no speedup of sparsity
    (eager on both sides is, whatever each capture's reason). The weights held show beside the speedups."""
    base = {"bench": "e2e_decode", "shape": "llama-3-8b/8of32layers", "dtype": "float16", "backend": "sparse",
            "ms": 1.0, "dense_ms": 2.0, "speedup": 2.0, "weight_mib": 21.0, "dense_weight_mib": 10.0}
    records = [{**base, "mode": "cuda-graph", "dense_mode": "eager (graph capture failed: RuntimeError: x)"},
               {**base, "dtype": "bfloat16", "mode": "cuda-graph", "dense_mode": "cuda-graph"},
               {**base, "bench": "e2e_prefill", "dtype": "bfloat16"},
               # eager on both sides, each with its own reason: like runs
               {**base, "shape": "llama-2-7b/8of32layers", "mode": "eager (graph capture failed: RuntimeError: a)",
                "dense_mode": "eager (graph capture failed: OutOfMemoryError: b)"},
               # bench_e2e --compile: compiled on both sides, the capture failed on one
               {**base, "shape": "llama-2-7b/4of32layers", "mode": "compiled (inductor), cuda-graph",
                "dense_mode": "compiled (inductor), eager (graph capture failed: RuntimeError: c)"},
               {**base, "shape": "llama-2-7b/2of32layers", "mode": "compiled (inductor), cuda-graph",
                "dense_mode": "compiled (inductor), cuda-graph"}]
    (tmp_path / "e2e.json").write_text(json.dumps(records))
    capsys.readouterr()
    benchmark("summarize").main(["--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert ("e2e llama-3-8b/8of32layers float16 sparse: timed cuda-graph against dense eager (graph capture "
            "failed: RuntimeError: x): its speedup compares unlike runs") in out
    assert "e2e llama-2-7b/4of32layers float16 sparse: timed compiled (inductor), cuda-graph against dense" in out
    assert out.count("compares unlike runs") == 2
    assert "weight x dense" in out and "2.1 [2.1, 2.1]" in out  # the linear weights held against dense


def test_summary_compares_the_grouped_kernels_two_token_tiles(benchmark, tmp_path, capsys):
    base = {"bench": "grouped", "shape": "128x1536x2048", "layers": "qwen3-30b-a3b gate_up", "dtype": "bfloat16",
            "status": "ok", "ms": 0.2, "device_ms": 0.1, "dense_ms": 0.3, "speedup": 1.5}
    records = [{**base, "tokens": 64, "tiles_for_all_rows_device_ms": 0.13},
               {**base, "tokens": 16, "tiles_for_all_rows_device_ms": 0.09}, {**base, "tokens": 1}]
    (tmp_path / "grouped.json").write_text(json.dumps(records))
    capsys.readouterr()
    assert benchmark("summarize").main(["--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "all-rows tile x" in out and "1.1 [0.9, 1.3]" in out  # tokens 1: one tile either way, not counted


@pytest.mark.gpu
def test_hide_host_times_the_gpu_work_alone():
    """The timer's two readings of a call that spends 0.5 ms on the host before a tiny kernel: plain events
    include that wait; with hide_host the GPU's spin covers it and only the kernel is timed."""
    import time

    from sdsengine import ops
    x = torch.ones(1024, device="cuda")

    def call():
        time.sleep(5e-4)
        x.add_(1)
    assert ops.time_ms(call, 2, 10, flush=False) > 0.4
    assert ops.time_ms(call, 2, 10, flush=False, hide_host=True) < 0.2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host-clock path, on a machine without a CUDA GPU")
def test_spmm_records_time_each_backend_as_called_and_on_the_gpu_alone(monkeypatch, fresh_choices):
    """sdsengine.bench's per-token-count records on the CPU (host clock; dense the only real backend): both
    timings and ratios for each backend and the autotuned choice; cuSPARSELt (a stand-in that follows its
    contract) searches its algorithm once for all the weight copies."""
    from sdsengine import bench
    searched = []
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda packed, xt, **k: packed @ xt, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: searched.append(1) or 2, raising=False)
    shape, forms, layers = _spmm_forms(monkeypatch)
    records = bench._measure_tokens(shape, 5, torch.float32, forms, layers, iters=3, users="q_proj")
    assert [r["backend"] for r in records] == ["dense", "cusparselt", "auto:dense", "auto-graphs:dense"]
    for r in records:
        assert r["gpu"] == "cpu" and r["ms"] > 0 and r["device_ms"] > 0 and r["rel_err"] < 1e-5
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"]) and r["status"] == "ok"
        assert r["device_speedup"] == pytest.approx(r["dense_device_ms"] / r["device_ms"])
    assert len(searched) == 1 and all(f["alg"] == {8: 2} for f in forms["cusparselt"])


def _spmm_forms(monkeypatch):
    """(shape, {backend: three prepared copies of random 2:4 weights}, two SparseLinears of the first: eager and
    set for graphs) for bench._measure_tokens on the CPU: dense and cuSPARSELt, whose torch calls the caller stands
    in for."""
    from sdsengine.kernels import compress_24, decompress_24
    from sdsengine.masks import nm_mask
    from sdsengine.nn.sparse_linear import SparseLinear
    monkeypatch.setenv("SDSENGINE_CUSPARSELT_FORM", "plain")
    shape, weights = (32, 64), []
    for seed in range(3):
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        weights.append(compress_24(w * nm_mask(w.abs(), 2, 4)))
    forms = {"dense": [ops.prepare("dense", v, m) for v, m in weights],
             "cusparselt": [ops._cusparselt_state(decompress_24(v, m)) for v, m in weights]}
    layers = [SparseLinear.from_dense(decompress_24(*weights[0])) for _ in range(2)]
    layers[1].graphs = True
    return shape, forms, layers


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host-clock path, on a machine without a CUDA GPU")
def test_spmm_records_a_backend_that_fails_at_a_token_count(monkeypatch, fresh_choices):
    """A backend raising at one token count is a failed record naming the error (the summary lists it), not
    a backend missing from the results."""
    from sdsengine import bench

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: misaligned address")
    monkeypatch.setattr(torch, "_cslt_sparse_mm", refuse, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: 2, raising=False)
    shape, forms, layers = _spmm_forms(monkeypatch)
    records = bench._measure_tokens(shape, 5, torch.float32, forms, layers, iters=3, users="q_proj")
    failed = [r for r in records if r["status"] == "failed"]
    assert [r["backend"] for r in failed] == ["cusparselt"] and "misaligned address" in failed[0]["error"]
    assert {r["backend"] for r in records if r["status"] == "ok"} == {"dense", "auto:dense", "auto-graphs:dense"}


def test_prefill_profile_names_the_linears(benchmark, tmp_path):
    """bench_e2e --profile's table, on a tiny model on the CPU: it lists the linears' matmuls, and
    write_profiles puts one section per model into the file."""
    e2e = benchmark("bench_e2e")
    text = e2e.profile_prefill(tiny_model("llama"), batch=1, tokens=8)
    assert "aten::linear" in text or "aten::addmm" in text or "aten::mm" in text
    args = type("Args", (), {"model": "tiny", "batch": 1, "prefill": 8, "dtype": "float32"})()
    e2e.write_profiles(tmp_path / "p.md", {"dense": text, "2:4 (converted)": text}, args, 2)
    written = (tmp_path / "p.md").read_text()
    assert written.count("## ") == 2 and "aten::" in written


def _tiny_llama_pruned_24():
    """tiny_models' llama with every decoder linear pruned 2:4 by magnitude."""
    from tiny_models import tiny_model
    from sdsengine.masks import nm_mask
    model = tiny_model("llama")
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))
    return model


def test_e2e_decode_runs_compiled_on_a_tiny_model(benchmark):
    """bench_e2e --compile's decode path on the CPU (backend aot_eager there): a converted model's steps run
    through torch.compile after an eager step tuned them, and the mode says so."""
    import torch._dynamo as dynamo
    from sdsengine.nn import convert
    e2e = benchmark("bench_e2e")
    model = _tiny_llama_pruned_24()
    ms, mode = e2e.time_decode(convert(model), batch=1, prompt=4, steps=2, graphs=False, compile_backend="aot_eager")
    dynamo.reset()
    assert ms > 0 and mode == "compiled (aot_eager), eager"


def test_e2e_measurements_run_on_a_tiny_model(benchmark):
    """bench_e2e's timing path on the CPU (no graphs there: prefill_graph is None, decode eager): every
    field the e2e_prefill record and its diagnosis line read is filled, forced_dense included."""
    from sdsengine.nn import convert, sparse_linear
    e2e = benchmark("bench_e2e")
    model = _tiny_llama_pruned_24()
    args = type("Args", (), {"batch": 1, "prefill": 8, "prompt": 4, "steps": 2, "no_graphs": False,
                             "model": "llama-3-8b", "dtype": "float32", "decode_batches": [3]})()
    dense = e2e.measure_model(model, args)
    assert dense["prefill_graph"] is None and dense["mode"].startswith("eager (graph capture failed")
    sparse = e2e.measure_converted(convert(model), args)
    assert sparse["prefill_forced_dense"] > 0 and sparse["decode"] > 0
    dense["prefill_after"] = sparse["prefill_after"] = e2e.time_prefill(model, 1, 8)
    prefill, decode, decode3 = e2e.records_for(args, 2, dense, sparse, "cpu")
    assert prefill["bench"] == "e2e_prefill" and decode["bench"] == decode3["bench"] == "e2e_decode"
    # --decode-batches: a step of 3 sequences, one token each, against the dense model's
    assert decode["batch"] == 1 and decode3["batch"] == 3 and decode3["ms"] == sparse["decode_batches"][3][0]
    assert decode3["tokens_per_s"] == pytest.approx(3e3 / decode3["ms"]) and decode3["dense_ms"] > 0
    assert prefill["graph_speedup"] is None and prefill["forced_dense_ms"] == sparse["prefill_forced_dense"]
    # on the CPU a converted layer keeps its dense form beside the compressed one (fp32: 17/32 more)
    assert decode["dense_weight_mib"] < decode["weight_mib"] < 1.6 * decode["dense_weight_mib"]
    line = e2e.prefill_diagnosis(prefill)
    assert "graph_ms -" in line and f"forced_dense_ms {sparse['prefill_forced_dense']:.3f}" in line
    assert f", ms_after {sparse['prefill_after']:.3f}" in line and prefill["ms_after"] == sparse["prefill_after"]
    # the headline: each model's lower eager timing, so that the first one's warm-up is not charged to one side
    assert prefill["ms"] == min(sparse["prefill"], sparse["prefill_after"]) and prefill["first_ms"] == sparse["prefill"]
    assert prefill["speedup"] == pytest.approx(min(dense["prefill"], dense["prefill_after"]) / prefill["ms"])
    # both models timed in turn (rounds of each): two numbers eager; None where capture fails (the CPU)
    in_turn = e2e.time_prefills_in_turn([model, model], 1, 8, rounds=2)
    assert len(in_turn) == 2 and min(in_turn) > 0
    assert e2e.time_prefills_in_turn([model], 1, 8, graph=True, rounds=1) is None
    # --lean: the same converted model holding no dense copies, below the dense model's bytes
    sparse_linear.set_lean(model)
    lean_prefill, lean_decode, _ = e2e.records_for(args, 2, dense, e2e.measure_model(model, args), "cpu",
                                                   "sparse_lean")
    assert lean_prefill["backend"] == lean_decode["backend"] == "sparse_lean" and lean_prefill["ms"] > 0
    assert lean_decode["weight_mib"] < 0.6 * lean_decode["dense_weight_mib"]


@pytest.mark.parametrize("method", ["wanda", "sds", "sds-tf32", "besa"])
def test_methods_benchmark_times_a_copy_and_leaves_the_model(benchmark, method):
    """bench_methods' record on the CPU, a tiny model: seconds and memory filled, the model itself not pruned."""
    from tiny_models import tiny_model
    bench = benchmark("bench_methods")
    model = tiny_model("llama")
    before = [p.clone() for p in model.parameters()]
    calibration = torch.randint(0, model.config.vocab_size, (2, 16))
    record = bench.measure_method(model, method, calibration, "cpu", "tiny")
    assert record["layers"] == model.config.num_hidden_layers and record["seconds"] > 0
    assert record["seconds_per_layer"] == pytest.approx(record["seconds"] / record["layers"])
    assert record["cpu_peak_rss_gib"] > 0 and record["gpu_peak_allocated_gib"] is None
    assert (record["step_seconds"] is not None) == (method != "wanda")  # SDS and BESA time their steps
    first = {"wanda": None, "sds": "initial", "sds-tf32": "initial", "besa": "setup"}[method]
    assert first is None or record["step_seconds"][first] > 0
    if method == "besa":  # 2:4 checks its hard-mask iterates
        assert set(record["step_seconds"]) == {"setup", "steps", "checks", "apply"}, record["step_seconds"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_tile_sweep_compares_every_setting_with_the_defaults_output_and_puts_them_back(benchmark, monkeypatch):
    """sweep_tiles on the compress kernel (the interpreter here): each setting's output bit for bit against the
    defaults', the default setting marked, the module's constants as they were after."""
    from sdsengine.kernels import compress_24, use_backend
    from sdsengine.kernels import compress as compress_mod
    sweep_tiles = benchmark("sweep_tiles")
    space = {"TILE_ROWS": (8, 16), "TILE_CHUNKS": (2, 4)}
    monkeypatch.setitem(sweep_tiles.SETTINGS, "compress", (compress_mod, space))
    monkeypatch.setattr(sweep_tiles.harness, "time_ms", lambda call, *args, **kwargs: 1.0)  # the GPU's to time
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(0))  # rows end inside a 16-row tile
    grids, grid = [], compress_mod._grid
    monkeypatch.setattr(compress_mod, "_grid", lambda rows, cols: grids.append(grid(rows, cols)) or grids[-1])

    def call():
        with use_backend("triton"):
            return compress_24(weight)
    defaults = (compress_mod.TILE_ROWS, compress_mod.TILE_CHUNKS)
    rows = sweep_tiles.sweep("compress", call, 1000, 1.0)
    assert [(r["TILE_ROWS"], r["TILE_CHUNKS"]) for r in rows] == [(8, 2), (8, 4), (16, 2), (16, 4)]
    assert all(r["same_output"] for r in rows), rows
    assert len(set(grids)) == 4  # each setting launched its own tiles
    assert [r["default"] for r in rows] == [(r["TILE_ROWS"], r["TILE_CHUNKS"]) == defaults for r in rows]
    assert (compress_mod.TILE_ROWS, compress_mod.TILE_CHUNKS) == defaults


NCU_CSV = """==PROF== Connected to process 7 (/usr/bin/python3.12)
==PROF== Profiling "_compress_kernel" - 0: 0%....50%....100% - 38 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC",\
"Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type","Rule Description"
"0","7","python3.12","h","_compress_kernel","1","7","(128, 1, 1)","(256, 86, 1)","0","9.0","GPU Speed Of Light \
Throughput","DRAM Throughput","%","41.52","","",""
"0","7","python3.12","h","_compress_kernel","1","7","(128, 1, 1)","(256, 86, 1)","0","9.0","GPU Speed Of Light \
Throughput","Duration","us","97.60","","",""
"0","7","python3.12","h","_compress_kernel","1","7","(128, 1, 1)","(256, 86, 1)","0","9.0","Occupancy","Achieved \
Occupancy","%","71.2","","",""
"0","7","python3.12","h","_compress_kernel","1","7","(128, 1, 1)","(256, 86, 1)","0","9.0","Occupancy","","","",\
"AchievedOccupancy","OPT","The difference between calculated theoretical and measured achieved occupancy ..."
"1","7","python3.12","h","gemv2T_kernel","1","7","(128, 1, 1)","(112, 1, 1)","0","9.0","Launch Statistics",\
"Registers Per Thread","register/thread","1,024","","",""
==PROF== Disconnected from process 7
"""


def test_ncu_counters_become_one_record_per_launch(benchmark, tmp_path, capsys):
    """ncu_kernels --summarize: ncu's own lines skipped, each launch's metrics by name, numbers with thousands
    separators read, advice kept; the profiling form refuses without a GPU."""
    ncu = benchmark("ncu_kernels")
    (tmp_path / "ncu.csv").write_text(NCU_CSV)
    assert ncu.main(["--summarize", str(tmp_path / "ncu.csv"), "--out", str(tmp_path)]) == 0
    first, second = json.loads((tmp_path / "ncu.json").read_text())
    assert first["kernel"] == "_compress_kernel" and first["grid"] == "(256, 86, 1)" and first["dram_pct"] == 41.52
    assert first["duration"] == 97.6 and first["duration_unit"] == "us" and first["achieved_occupancy_pct"] == 71.2
    assert first["advice"][0].startswith("The difference between") and "advice" not in second
    assert second["kernel"] == "gemv2T_kernel" and second["registers"] == 1024.0 and "dram_pct" not in second
    assert "| 0 | _compress_kernel |" in (tmp_path / "ncu.md").read_text()
    with pytest.raises(ValueError, match="no ncu CSV header"):
        ncu.parse("==PROF== Connected\nno kernels were profiled\n")
    if not torch.cuda.is_available():
        assert ncu.main([]) == 1 and "no CUDA GPU visible" in capsys.readouterr().out


def test_a_method_stopped_by_sigterm_leaves_a_record_of_how_long_it_ran(benchmark, monkeypatch):
    """The suite's step limit (SIGTERM) ends the method in progress with a `cut` record, not the process; the
    handler is the previous one again afterwards."""
    bench = benchmark("bench_methods")

    def slow_method(model, name, calibration, device, shape):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
        raise AssertionError("not stopped")
    monkeypatch.setattr(bench, "measure_method", slow_method)
    before = signal.getsignal(signal.SIGTERM)
    with bench.stopped_by_sigterm():
        record = bench.measure_or_cut(None, "besa", None, "cpu", "tiny")
    assert signal.getsignal(signal.SIGTERM) is before
    assert record["status"] == "cut" and record["method"] == "besa" and 0 <= record["seconds_at_cut"] < 5
    assert "SIGTERM" in record["error"]


@needs_fused_experts
def test_e2e_measures_a_mixture_with_its_experts_pruned_and_converted(benchmark):
    """bench_e2e's mixture shapes: every expert 2:4 along its inputs (routers dense), the dense banks counted in
    the dense model's weights, the converted experts as SparseLinears, both timed."""
    from sdsengine.masks import nm_violations
    from sdsengine.nn import SparseLinear, convert
    e2e = benchmark("bench_e2e")
    assert e2e.model_config("qwen3-30b-a3b", 2, 64).num_experts == 128
    model = e2e.build_model("mixtral-8x7b", 1, torch.float32, 64, device="meta")  # the real shape, no memory
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 2 * 14336, 4096)
    model = e2e.prune_24(tiny_model("mixtral"))
    banks = [p for n, p in model.named_parameters() if p.dim() == 3]
    assert banks and all(nm_violations(b.reshape(-1, b.shape[-1]), 2, 4) == 0 for b in banks)
    assert all(nm_violations(p.detach(), 2, 4) > 0 for n, p in model.named_parameters() if "gate.weight" in n)
    args = type("Args", (), {"batch": 1, "prefill": 8, "prompt": 4, "steps": 2, "no_graphs": True,
                             "model": "mixtral-8x7b", "dtype": "float32"})()
    dense = e2e.measure_model(model, args)
    assert dense["weight_bytes"] > sum(b.numel() * 4 for b in banks)
    sparse = e2e.measure_converted(convert(model, pack_experts=True), args)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 24 and sparse["decode"] > 0
    prefill, decode = e2e.records_for(args, 1, dense, sparse, "cpu")
    assert prefill["shape"] == "mixtral-8x7b/1of32layers" and decode["speedup"] > 0


def test_lean_bench_measures_a_checkpoint_both_ways(benchmark, tmp_path):
    """bench_lean on a tiny compressed checkpoint: one record per token count, the lean model holding its
    compressed weights only (fp32: 17/32 of the linears' bytes), as loaded the dense copies too."""
    from tiny_models import tiny_model
    from sdsengine.masks import nm_mask
    from sdsengine.nn import convert, save_compressed
    model = tiny_model("llama")
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))
    save_compressed(convert(model), tmp_path / "packed")
    argv = ["--model", str(tmp_path / "packed"), "--tokens", "1,5", "--reps", "1", "--out", str(tmp_path)]
    assert benchmark("bench_lean").main(argv) == 0
    records = json.loads((tmp_path / "lean.json").read_text())
    assert [r["tokens"] for r in records] == [1, 5] and all(r["ms"] > 0 and r["baseline_ms"] > 0 for r in records)
    r = records[0]
    copies = r["baseline_weight_mib"] - r["weight_mib"]  # as loaded: the converted linears' dense bytes again
    head = r["dense_weight_mib"] - copies  # what stays nn.Linear (lm_head)
    assert copies > 0 and r["weight_mib"] == pytest.approx(head + copies * 17 / 32)


def test_load_bench_loads_each_checkpoint_in_a_fresh_process(benchmark, tmp_path):
    """bench_load on a tiny pruned model and its compressed checkpoint: one record, both sides measured in
    the compressed checkpoint's dtype."""
    from tiny_models import tiny_model
    from sdsengine import MagnitudeConfig, prune
    from sdsengine.nn import convert, save_compressed
    model = tiny_model("llama")
    prune(model, MagnitudeConfig(sparsity="2:4"), None, progress=False)
    model.save_pretrained(tmp_path / "pruned")
    save_compressed(convert(model.to(torch.bfloat16)), tmp_path / "packed")
    argv = ["--model", str(tmp_path / "packed"), "--dense", str(tmp_path / "pruned"), "--repeats", "1",
            "--out", str(tmp_path)]
    assert benchmark("bench_load").main(argv) == 0
    [r] = json.loads((tmp_path / "load.json").read_text())
    assert r["bench"] == "load" and r["dtype"] == "bfloat16" and r["ms"] > 0 and r["baseline_ms"] > 0
    assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["ms"])
    assert all(r[k] >= 0 for k in ("peak_mib", "baseline_peak_mib", "held_mib", "baseline_held_mib"))


def test_parallel_bench_times_one_process_against_a_group(benchmark, tmp_path):
    """bench_parallel on a tiny model: the baseline (one process, both threads), two processes of one thread and one
    process of one thread, each record against the baseline of the same run."""
    from tiny_models import save_tiny_tokenizer, tiny_model
    tiny_model("llama").save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("a " * 500)
    argv = ["--model", str(tmp_path / "model"), "--methods", "wanda", "--calib", str(tmp_path / "calib.txt"),
            "--nsamples", "2", "--seqlen", "8", "--processes", "2", "--threads", "2", "--out", str(tmp_path)]
    assert benchmark("bench_parallel").main(argv) == 0
    records = json.loads((tmp_path / "parallel_cpu.json").read_text())
    assert [(r["processes"], r["threads"]) for r in records] == [(1, 2), (2, 1), (1, 1)]
    for r in records:
        assert r["bench"] == "parallel" and r["method"] == "wanda" and r["seconds"] > 0
        assert r["speedup"] == pytest.approx(records[0]["seconds"] / r["seconds"]) and r["max_error_ratio"] >= 1
        assert (r["others_cpu_peak_rss_gib"] is None) == (r["processes"] == 1)  # the second process's in the group
    assert "| parallel | wanda | 2:4 | cpu | 2 | 1 |" in (tmp_path / "parallel_cpu.md").read_text()


def test_streaming_bench_prunes_a_checkpoint_whole_and_streamed(benchmark, tmp_path):
    """bench_streaming on a tiny model: one record per mode, the same checkpoint written both ways."""
    from tiny_models import save_tiny_tokenizer, tiny_model
    tiny_model("llama").save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("a " * 500)
    argv = ["--model", str(tmp_path / "model"), "--methods", "wanda,magnitude", "--calib", str(tmp_path / "calib.txt"),
            "--nsamples", "2", "--seqlen", "8", "--eval-windows", "3", "--out", str(tmp_path)]
    assert benchmark("bench_streaming").main(argv) == 0
    records = json.loads((tmp_path / "streaming_cpu.json").read_text())
    modes = [(mode, bench) for bench in ("streaming", "streaming_convert", "streaming_eval")
             for mode in ("whole", "streamed")]
    assert [(r["method"], r["mode"], r["bench"]) for r in records] == [
        (method, mode, bench) for method in ("wanda", "magnitude") for mode, bench in modes]
    for r in records:
        assert r["identical"] and r["wall_seconds"] > 0 and r["cpu_peak_rss_gib"] > 0
        assert 0 < r["largest_layer_gib"] < r["weights_gib"]
    # the command's peak holds the prune's (and the save after it)
    assert all(r["seconds"] > 0 and 0 < r["prune_peak_rss_gib"] <= r["cpu_peak_rss_gib"]
               for r in records if r["bench"] == "streaming")
    assert {r["dtype"] for r in records if r["bench"] == "streaming_convert"} == {"bfloat16"}  # from float32
    assert records[0]["rss_saved_gib"] == records[2]["rss_saved_gib"] == records[4]["rss_saved_gib"] == 0
    for method in ("wanda", "magnitude"):
        whole, streamed = [r for r in records if r["bench"] == "streaming_eval" and r["method"] == method]
        assert whole["ppl"] == streamed["ppl"] > 1 and whole["piqa_acc"] == streamed["piqa_acc"]
        assert whole["protocol"] == "wikitext2 test, 3 x 8; piqa validation, first 3 items"


def test_streaming_bench_sees_checkpoints_that_differ(benchmark, tmp_path):
    from safetensors.torch import save_file
    for name, value in (("a", 0.0), ("b", 0.0), ("c", 1.0)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((2, 2), value)}, tmp_path / name / "model.safetensors")
    identical = benchmark("bench_streaming").identical
    assert identical(tmp_path / "a", tmp_path / "b") and not identical(tmp_path / "a", tmp_path / "c")


def test_dispatch_bench_times_both_layers_through_sparse_linear(benchmark, tmp_path, monkeypatch):
    """bench_dispatch on the CPU: one record per token count, SparseLinear's calls really made (counted),
    and the summary lists the bench."""
    from sdsengine.nn import SparseLinear
    calls = []
    forward = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: (calls.append(1), forward(self, x))[1])
    argv = ["--tokens", "1,3", "--calls", "5", "--out", str(tmp_path), "--name", "dispatch"]
    assert benchmark("bench_dispatch").main(argv) == 0
    records = json.loads((tmp_path / "dispatch.json").read_text())
    layer, model = records[:2], records[2:]
    assert [r["tokens"] for r in layer] == [1, 3] and {r["backend"] for r in layer} == {"dense"}
    assert [(r["tokens"], r["shape"], r["linears"]) for r in model] == [(1, "llama-tiny/8layers", 56),
                                                                        (3, "llama-tiny/8layers", 56)]
    # warm-up, then 7 timed loops of 5, per token count; then the model's: 20 + 7 forwards of 56 linears
    assert len(calls) == 2 * (20 + 7 * 5) + 2 * 56 * (20 + 7)
    for r in records:
        per = r.get("linears", 1)
        assert r["extra_us"] == pytest.approx((r["ms"] - r["dense_ms"]) * 1e3 / per)
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])
    rows, _ = benchmark("summarize").collect(tmp_path)
    assert {row["group"] for row in rows if row["bench"] == "dispatch"} == {
        "64x256 1 float32", "64x256 3 float32", "llama-tiny/8layers 1 float32", "llama-tiny/8layers 3 float32"}


def test_zeroshot_answers_compares_item_by_item(benchmark, tmp_path, capsys):
    """Answer shares, accuracy and agreement with the first file, on hand-made --samples files."""
    def write(name, preds, labels=(1, 1, 0, 1)):
        rows = [{"task": "boolq", "index": i, "label": y, "pred": p, "pred_norm": p, "choices": [" no", " yes"],
                 "loglikelihoods": [0.0, 0.0]} for i, (p, y) in enumerate(zip(preds, labels))]
        rows.append({"task": "mine", "index": 0, "label": 0, "pred": 1, "pred_norm": 1, "choices": ["a", "b", "c"],
                     "loglikelihoods": [0.0, 1.0, 0.0]})
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    ref, other = write("ref.jsonl", [0, 0, 0, 1]), write("other.jsonl", [1, 0, 1, 1])
    out = tmp_path / "summary.json"
    assert benchmark("zeroshot_answers").main([ref, other, "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary[ref]["boolq"] == {"n": 4, "acc": 0.5, "answers": {" no": 0.75, " yes": 0.25}, "agreement": 1.0}
    assert summary[other]["boolq"] == {"n": 4, "acc": 0.5, "answers": {" no": 0.25, " yes": 0.75}, "agreement": 0.5}
    assert summary[other]["mine"]["answers"] == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert "| boolq | 4 | 50.0 | no 25.0, yes 75.0 | 50.0 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="boolq: the files disagree on labels"):
        benchmark("zeroshot_answers").main([ref, write("relabelled.jsonl", [0, 0, 0, 1], labels=(0, 0, 0, 0))])


def write_quality_record(folder, name, ppl, recipe=None, accs=(), seconds=100, rss=2.0, layer_rss=()):
    """NAME.json as quality.sh writes it (its prune_wall_s 30 s over the report's, as a model load adds) and
    NAME.prune.json, the run report; layer_rss: peaks the layers of earlier, resumed processes recorded."""
    results = {"wikitext2": {"ppl": ppl}}
    results.update({f"task{i}": {"acc": a, "acc_norm": a} for i, a in enumerate(accs)})
    run = {"results": results, "eval_command": "eval", "prune_command": "prune", "prune_wall_s": seconds + 30}
    (folder / f"{name}.json").write_text(json.dumps(run))
    recipe = recipe or {"method": name.split("_")[0]}
    report = {"recipe": {"sparsity": name.rpartition("_")[2].replace("-", ":").replace("50", "0.5"), **recipe},
              "memory": {"cpu_peak_rss_gib": rss}, "overall_sparsity": 0.5, "seconds": seconds + 0.4,
              "layers": [{"memory": {"cpu_peak_rss_gib": peak}} for peak in layer_rss]}
    (folder / f"{name}.prune.json").write_text(json.dumps(report))


def test_besa_nm_steps_learns_on_a_tiny_layer(benchmark):
    """besa_nm_steps.py's curve on a tiny model's second layer: the loss at Wanda's start, and the hard-mask
    loss over it at step 8 (it has no test of its numbers; this keeps it running as the learner changes)."""
    script = benchmark("besa_nm_steps")
    ctx = script.layer_context(tiny_model("llama"), tiny_tokens(nsamples=8), 1)
    start, points = script.curve(ctx, "0.05", "2:4", eval_windows=2)
    assert start > 0 and [step for step, _ in points] == [8] and points[0][1] > 0


def test_drift_reads_every_decoder_layers_output(benchmark):
    """drift.py: zero before the first changed layer, nonzero from it on, one entry per decoder layer, and
    the last entry the last layer's own output (transformers' hidden_states ends with the final norm's)."""
    drift = benchmark("drift")
    dense, changed = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    window = tiny_tokens(nsamples=1)[0]
    result = drift.drift(dense, changed, [window])
    for errors in result["layers"], result["normalized"]:
        assert len(errors) == len(dense.model.layers) and errors[0] == 0 and all(e > 0 for e in errors[1:])
    after, _ = drift.states(dense, window.unsqueeze(0))
    hidden = dense(window.unsqueeze(0), output_hidden_states=True).hidden_states
    torch.testing.assert_close(dense.model.norm(after[-1]), hidden[-1].float())
    torch.testing.assert_close(after[0], hidden[1].float())


def test_drift_normalizes_each_token_to_unit_mean_square(benchmark):
    """drift.py's normalized error compares token states at one scale: a state scaled by 100 normalizes to
    the same, and each normalized token has mean square 1 (so its error needs no further division)."""
    drift = benchmark("drift")
    h = torch.randn(1, 3, 8)
    h[0, 1] *= 50  # one token of large norm
    torch.testing.assert_close(drift.rms_normalized(100 * h), drift.rms_normalized(h))
    torch.testing.assert_close(drift.rms_normalized(h).pow(2).mean(dim=-1), torch.ones(1, 3))


def test_drift_refuses_a_run_pruned_from_another_model(benchmark, tmp_path, monkeypatch):
    """drift.py --model: a run whose decoder-layer count differs from the dense model's is refused by name
    (comparing layer by layer would silently pair the wrong layers)."""
    drift = benchmark("drift")
    dense, other = tiny_model("llama"), tiny_model("llama")
    del other.model.layers[1:]
    run = tmp_path / "other_2-4"
    run.mkdir()
    (run / "config.json").write_text("{}")
    loaded = {None: dense, str(run): other}
    monkeypatch.setattr(drift, "load_model", lambda path=None: (loaded[path], None, None))
    monkeypatch.setattr(drift, "calibration_samples", lambda *a: tiny_tokens(nsamples=1))
    with pytest.raises(SystemExit, match=r"other_2-4 has 1 decoder layers and the dense model 2: pass"):
        drift.main([str(run)])


def test_quality_versus_table_pairs_runs_with_their_base(benchmark, tmp_path, capsys):
    """--versus: each SDS/BESA record against its pattern's base record, targets named, the issue's SDS pairs
    listed as not measured when their record is missing, and a missing base shown as '-'. Seconds are the
    reports' pruning times; a resumed run's peak memory is the highest of its parts."""
    write_quality_record(tmp_path, "wanda_2-4", 200.0, accs=(0.5, 0.4), seconds=800, rss=2.3)
    write_quality_record(tmp_path, "sds-wanda_2-4", 80.0, {"method": "sds", "base": "wanda"}, accs=(0.6, 0.4),
                         seconds=6000, rss=2.4, layer_rss=(2.45, 2.41))
    write_quality_record(tmp_path, "besa_50", 43.0, {"method": "besa"})
    assert benchmark("quality_table").main(["--versus", str(tmp_path)]) == 0
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["sds-wanda_2-4"] == ("| sds-wanda_2-4 | wanda_2-4 | 80.00 | 200.00 | 0.400 | ≤ 0.75 | 50.0 / 45.0 "
                                      "| 6000 / 800 | 2.45 / 2.3 |")
    assert lines["besa_50"].startswith("| besa_50 | wanda_50 | 43.00 | - | - | < 1, and below sparsegpt_50 |")
    assert "not measured" in lines["sds-sparsegpt_4-8"] and "not measured" in lines["sds-wanda_50"]
    assert "wanda_2-4" not in lines  # base runs are columns, not rows
    assert list(lines).index("sds-wanda_2-4") < list(lines).index("sds-wanda_4-8") < list(lines).index("besa_50")


def test_quality_versus_table_pairs_sds_besa_with_the_besa_record_of_todays_defaults(benchmark, tmp_path, capsys):
    """SDS's BESA base runs BESA at today's defaults: besa-lr-checks_2-4 at 2:4 (besa_2-4 holds the old N:M
    defaults), besa_P at the other patterns."""
    for name, ppl in (("besa_2-4", 180.0), ("besa-lr-checks_2-4", 120.0), ("besa_4-8", 75.0)):
        write_quality_record(tmp_path, name, ppl, {"method": "besa"})
    for name in ("sds-besa_2-4", "sds-besa_4-8"):
        write_quality_record(tmp_path, name, 60.0, {"method": "sds", "base": "besa"})
    assert benchmark("quality_table").main(["--versus", str(tmp_path)]) == 0
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["sds-besa_2-4"].startswith("| sds-besa_2-4 | besa-lr-checks_2-4 | 60.00 | 120.00 | 0.500 |")
    assert lines["sds-besa_4-8"].startswith("| sds-besa_4-8 | besa_4-8 | 60.00 | 75.00 | 0.800 |")


def test_quality_versus_table_keeps_a_folders_name_prefix(benchmark, tmp_path, capsys):
    """A folder whose records all start with a prefix (quality_reduced's r16_): bases and placeholders carry
    it, and the pattern is the recipe's, not the end of the name (a suffix after it is not a pattern)."""
    write_quality_record(tmp_path, "r16_sparsegpt_2-4", 100.0)
    write_quality_record(tmp_path, "r16_sds-sparsegpt_2-4", 85.0, {"method": "sds", "base": "sparsegpt"})
    write_quality_record(tmp_path, "r16_sds-sparsegpt_2-4_refit", 80.0,
                         {"method": "sds", "base": "sparsegpt", "sparsity": "2:4"})
    assert benchmark("quality_table").main(["--versus", str(tmp_path)]) == 0
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["r16_sds-sparsegpt_2-4"].startswith("| r16_sds-sparsegpt_2-4 | r16_sparsegpt_2-4 | 85.00 | 100.00 "
                                                     "| 0.850 |")
    assert lines["r16_sds-sparsegpt_2-4_refit"].startswith("| r16_sds-sparsegpt_2-4_refit | r16_sparsegpt_2-4 "
                                                           "| 80.00 | 100.00 | 0.800 |")
    assert "not measured" in lines["r16_sds-wanda_2-4"] and "sds-wanda_2-4" not in lines
    one_method = tmp_path / "one"  # every name starts with sds-sparsegpt_: that is no prefix
    one_method.mkdir()
    write_quality_record(one_method, "sds-sparsegpt_2-4", 85.0, {"method": "sds", "base": "sparsegpt"})
    write_quality_record(one_method, "sds-sparsegpt_2-4_refit", 80.0, {"method": "sds", "base": "sparsegpt",
                                                                       "sparsity": "2:4"})
    assert benchmark("quality_table").main(["--versus", str(one_method)]) == 0
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["sds-sparsegpt_2-4"].startswith("| sds-sparsegpt_2-4 | sparsegpt_2-4 |")
    assert "sds-sparsegpt_sds-sparsegpt_2-4" not in lines


def test_quality_glance_table_has_a_cell_per_method_and_pattern(benchmark, tmp_path, capsys):
    """--glance: perplexity (zero-shot mean) from the record GLANCE names for each method and pattern, the
    dense row in every column, BESA's 2:4 from its defaults' record (not the old besa_2-4), '-' elsewhere,
    and for a record of other tasks only (TASKS=c4 quality.sh) or a zero-shot mean of 0."""
    def write(name, ppl, accs=()):
        results = {"wikitext2": {"ppl": ppl}} if ppl else {"c4": {"ppl": 30.0}}
        results.update({f"t{i}": {"acc": a, "acc_norm": a} for i, a in enumerate(accs)})
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": results, "eval_command": "eval"}))

    write("dense", 20.0, accs=(0.5, 0.6))
    write("wanda_4-8", 90.0)
    write("besa_2-4", 700.0)
    write("besa-lr-checks_2-4", 120.0, accs=(0.4,))
    write("besa_50", 43.0)
    write("sparsegpt_4-8", None, accs=(0.0,))
    assert benchmark("quality_table").main(["--glance", str(tmp_path)]) == 0
    lines = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["dense"] == "| dense | 20.00 (55.0) | 20.00 (55.0) | 20.00 (55.0) |"
    assert lines["Wanda"] == "| Wanda | - | 90.00 | - |"
    assert lines["BESA"] == "| BESA | 120.00 (40.0) | - | 43.00 |"
    assert lines["SDS(SparseGPT)"] == "| SDS(SparseGPT) | - | - | - |"
    assert lines["SparseGPT"] == "| SparseGPT | - | - (0.0) | - |"


@pytest.mark.parametrize("doc, tables", [("README.md", {(), ("--versus",), ("--glance",)}),
                                         ("docs/QUALITY.md", {("../benchmarks/results/quality_reduced",)})])
def test_quality_tables_match_the_records(benchmark, doc, tables):
    """Each table of the README and docs/QUALITY.md under a quality_table.py marker is that script's output on
    the committed records, verbatim: a record added or remade without `quality_table.py --readme README.md
    docs/QUALITY.md` fails here."""
    quality_table, path = benchmark("quality_table"), BENCHMARKS.parent / doc
    lines = path.read_text().split("\n")
    blocks = list(quality_table.marked_blocks(lines))
    assert tables <= {tuple(args) for _, _, args in blocks}  # the tables that belong there are marked
    for start, end, args in blocks:
        assert "\n".join(lines[start + 1:end]) == quality_table.render(args, path.parent), args


def test_readme_rewrite_replaces_only_the_marked_tables(benchmark, tmp_path):
    quality_table = benchmark("quality_table")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "wanda_50.json").write_text(json.dumps(
        {"results": {"wikitext2": {"ppl": 50.0}}, "prune_command": "sdsengine prune x", "prune_wall_s": 9}))
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- quality_table.py res -->\n| stale |\n|---|\n| old row |\nafter\n\n"
                   "<!-- quality_table.py res -->\nend\n")
    assert quality_table.rewrite_readme(doc) == 2
    table = quality_table.render(["res"], tmp_path)
    assert "| wanda_50 | - | 50.00 | - | - | 9 | - |" in table  # pruned, but no report: its wall time only
    assert doc.read_text() == (f"intro\n<!-- quality_table.py res -->\n{table}\nafter\n\n"
                               f"<!-- quality_table.py res -->\n{table}\nend\n")
    assert quality_table.rewrite_readme(doc) == 0  # regenerating again changes nothing


@pytest.mark.parametrize("text, error", [(None, "no file"), ("no marker here\n", "no '<!-- quality_table.py"),
                                         ("<!-- quality_table.py missing -->\n| old |\n", "no results folder")])
def test_readme_rewrite_bad_input_names_the_problem_and_keeps_the_file(benchmark, tmp_path, text, error):
    doc = tmp_path / "doc.md"
    if text is not None:
        doc.write_text(text)
    with pytest.raises(SystemExit, match=error):
        benchmark("quality_table").main(["--readme", str(doc)])
    assert (doc.read_text() if text is not None else None) == text


def test_kernel_sass_occupancy_follows_each_architectures_limits(benchmark):
    """Programs an SM holds, of a kernel small in registers and shared memory: bounded by the warps (64 on
    8.0 and 9.0, 48 on 8.6 and 8.9) and programs (32, 16 on 8.6, 24 on 8.9) an SM keeps resident."""
    occupancy = benchmark("kernel_sass").programs_per_sm
    assert [occupancy(16, 0, 4, arch) for arch in (80, 86, 89, 90)] == [16, 12, 12, 16]
    assert [occupancy(16, 0, 1, arch) for arch in (80, 86, 89, 90)] == [32, 16, 24, 32]


def test_kernel_sass_profiles_every_kernel_and_wanda_keeps_groups_in_a_thread(tmp_path):
    """kernel_sass.py compiles the kernels for sm_90 without a GPU (outside the interpreter, which tests set):
    the only compile check here of the Triton kernels as a GPU runs them, SparseGPT's block kernel included.

    The N:M Wanda kernel's tile puts each group in one thread: its rank needs no warp shuffle and no trip
    through shared memory (the 3-D tile it replaced had both, at 61 instructions per element against 30). A
    group of 4 is ranked by float compares folded into logic ops (keep_of_4): at fp16 at most 20 instructions
    per element in Wanda 2:4, nm_mask and compress, where sort keys and rank sums took 24.5-28, and the Wanda
    2:4 kernel keeps an SM's full 64 warps (8 programs; 5 when a thread held 4 groups' orders).
    The unstructured one's threshold search is one reduction across the row per step (its first loop: at most 3
    barriers a trip, where the search that also took the keys on either side of each probe had 6 under Triton 3.9
    and 9 under 3.6), and the row's keys are all its registers hold through it (ties are split without a scan, W
    is re-read for the write). A row of 4096 is one warp, which reduces without a barrier and without spilling
    its 128 keys a thread: an SM holds 9 rows at fp16/bf16 (6 at 4 warps a row, 4 before the search took one
    reduction a step)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton has no CUDA toolchain to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(BENCHMARKS / "kernel_sass.py"), "--out", str(tmp_path), "--name", "sass"],
                   env=env, check=True, capture_output=True)
    records = json.loads((tmp_path / "sass.json").read_text())
    kernels = ("wanda 2:4", "wanda 4:8", "wanda 50% (4096 cols)", "wanda 50% (11008 cols)", "wanda 50% (28672 cols)",
               "compress 2:4", "decompress 2:4", "sparsegpt 2:4", "sparsegpt 50%")
    assert {(r["kernel"], r["dtype"]) for r in records} == {
        (k, d) for k in kernels + ("nm_mask 2:4",) for d in ("float16", "bfloat16", "float32")} | {
        ("nm_mask 2:4", "float64")}
    assert all(re.match(r"\d+\.\d+", r["triton"]) and r["stack_bytes"] >= 0 for r in records)
    assert all(r["instructions"] > 0 and "LDG" in r["global_accesses"] and r["programs_per_sm"] >= 1
               for r in records)
    for r in records:
        if r["kernel"] in ("wanda 2:4", "wanda 4:8", "nm_mask 2:4") and r["dtype"] != "float32":
            assert (r["shfl"], r["shared"]) == (0, 0), r
        if r["kernel"] in ("wanda 2:4", "wanda 4:8", "wanda 50% (4096 cols)", "compress 2:4", "decompress 2:4",
                           "nm_mask 2:4"):
            assert r["stack_bytes"] == 0, r
        if r["kernel"] in ("wanda 2:4", "nm_mask 2:4", "compress 2:4") and r["dtype"] == "float16":
            assert r["per_element"] <= 20, r
        if r["kernel"] == "wanda 2:4" and r["dtype"] != "float32":
            assert r["programs_per_sm"] == 8, r
        if r["kernel"].startswith("wanda 50%"):
            assert r["per_element"] is None and r["loop_instructions"] > 0 and r["loop_bar"] <= 3, r
        if r["kernel"] == "wanda 50% (4096 cols)":
            assert r["warps"] == 1 and r["loop_bar"] == 0, r
            assert r["programs_per_sm"] >= (8 if r["dtype"] == "float32" else 9), r
    assert "| wanda 2:4 |" in (tmp_path / "sass.md").read_text()


def _suite(tmp_path, steps, python=sys.executable):
    env = dict(os.environ, SUITE_STEPS=steps, RESULTS=str(tmp_path), PYTHON=str(python), SUITE_SECONDS="60")
    env.pop("OUT", None)
    return subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh")], capture_output=True, text=True, env=env,
                          timeout=300)


def test_suite_runs_only_the_selected_steps_and_keeps_other_results(tmp_path):
    """SUITE_STEPS re-runs a few steps within a short device lease: only those run and are recorded, and
    only their results files are replaced (here `dispatch`, which runs on a CPU too; the e2e figures stay)."""
    (tmp_path / "e2e.json").write_text("[]")
    (tmp_path / "dispatch.json").write_text('[{"stale": true}]')
    done = _suite(tmp_path, "dispatch")
    steps = (tmp_path / "suite_steps.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in steps] == ["step", "dispatch"], done.stdout + done.stderr
    assert (tmp_path / "e2e.json").read_text() == "[]"
    dispatch = tmp_path / "dispatch.json"  # removed first; on a CPU the step writes dispatch-cpu.json instead
    assert not dispatch.exists() or "stale" not in dispatch.read_text()


def test_suite_rerun_keeps_how_the_other_steps_ended(tmp_path):
    """A SUITE_STEPS re-run replaces the step table; the steps it does not run keep their last status in
    suite_steps_earlier.tsv (an earlier timeout is not erased), over re-runs; a benchmark step that exits 0
    without its results file is no-results, not ok (a stand-in python that does nothing and exits 0)."""
    (tmp_path / "suite_steps.tsv").write_text("step\tstatus\trc\tseconds\nspmm\ttimeout\t124\t50\n"
                                              "dispatch\tok\t0\t9\n")
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\n")
    fake.chmod(0o755)
    _suite(tmp_path, "dispatch", python=fake)
    table = lambda name: [line.split("\t")[:2] for line in (tmp_path / name).read_text().splitlines()[1:]]
    assert table("suite_steps.tsv") == [["dispatch", "no-results"]]
    assert table("suite_steps_earlier.tsv") == [["spmm", "timeout"]]
    _suite(tmp_path, "versions", python=fake)
    assert table("suite_steps_earlier.tsv") == [["dispatch", "no-results"], ["spmm", "timeout"]]
    summary = subprocess.run([sys.executable, str(BENCHMARKS / "summarize.py"), "--dir", str(tmp_path)],
                             capture_output=True, text=True, check=True).stdout
    assert "step spmm (an earlier run): timeout" in summary
    assert "step dispatch (an earlier run): no-results" in summary


def test_suite_without_check_results_turns_the_unverified_backends_off(tmp_path):
    """`versions` gives later steps the backends' check results; with none (here: no GPU; on a GPU: cut off
    by its time limit), later steps get cuSPARSELt and the wgmma pipelines off rather than checking again,
    each in every process, where a trapping pipeline costs ~35 s."""
    done = _suite(tmp_path, "versions")
    assert (tmp_path / "switches.env").read_text() == "export SDSENGINE_CUSPARSELT=0\nexport SDSENGINE_WGMMA=0\n", \
        done.stdout + done.stderr


def test_suite_builds_the_extension_beside_the_kernel_tests_and_goes_on_where_it_fails(tmp_path):
    """install puts the package in place without the extension, then the Triton kernels' tests (which need no more
    and time nothing) run in the background while install_cuda builds it; the first timed step waits for them.
    A failed build does not stop the later steps (a stand-in python that logs what it is asked to run)."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(f'''#!/bin/bash
case "$*" in
  *"pip install"*) [ "${{SDSENGINE_BUILD_CUDA:-}}" = 0 ] && echo install >> {log} ;;
  *"pytest"*"tests/kernels"*) echo tests start >> {log}; sleep 3; echo tests end >> {log}; echo PASSED ;;
  *"setup.py build_ext --inplace"*) echo build >> {log}; exit 1 ;;
  *bench_e2e*) echo e2e >> {log} ;;
esac
''')
    fake.chmod(0o755)
    done = _suite(tmp_path, "install kernel_tests e2e", python=fake)
    calls = log.read_text().splitlines()
    assert calls[0] == "install" and set(calls[1:3]) == {"tests start", "build"}, calls
    assert calls[3:] == ["tests end", "e2e"], calls
    steps = [line.split("\t")[:2] for line in (tmp_path / "suite_steps.tsv").read_text().splitlines()[1:]]
    assert steps == [["install", "ok"], ["install_cuda", "failed"], ["kernel_tests", "ok"], ["e2e", "no-results"]], \
        done.stdout + done.stderr
    assert "=== kernel_tests: budget" in done.stdout and "PASSED" in done.stdout
    assert not (tmp_path / "kernel_tests.log").exists()


def test_gpu_tests_run_the_wgmma_cases_first_then_the_rest_under_four_workers(tmp_path):
    """The gpu_tests step is two pytest runs: the wgmma kernel's isolated cases alone, then, with what they turned
    off (appended to the switches file) in the environment, the rest under 4 xdist workers; the step fails where
    either run failed (a stand-in python that logs its calls; its `import xdist` succeeds)."""
    fake, log = tmp_path / "python", tmp_path / "calls.log"
    fake.write_text(f'''#!/bin/bash
echo "$* | WGMMA=${{SDSENGINE_WGMMA:-}}" >> {log}
case "$*" in
  *"-k test_wgmma"*) echo "export SDSENGINE_WGMMA=wgmma" >> "$SUITE_SWITCHES"; exit ${{FIRST_RC:-0}} ;;
  *"-k not"*) exit 0 ;;
esac
''')
    fake.chmod(0o755)
    for first_rc, status in (("0", "ok"), ("1", "failed")):
        log.unlink(missing_ok=True)
        env = dict(os.environ, SUITE_STEPS="gpu_tests", RESULTS=str(tmp_path), PYTHON=str(fake), SUITE_SECONDS="60",
                   FIRST_RC=first_rc)
        env.pop("OUT", None)
        done = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh")], capture_output=True, text=True, env=env,
                              timeout=120)
        calls = [line for line in log.read_text().splitlines() if line.startswith("-m pytest")]
        assert len(calls) == 2, done.stdout + done.stderr
        assert "-n 1 " in calls[0] and "tests/test_ops.py -k test_wgmma_kernel_against_fp32" in calls[0]
        assert "-n 4 " in calls[1] and "-k not test_wgmma_kernel_against_fp32" in calls[1]
        assert calls[1].endswith("WGMMA=wgmma")
        steps = [line.split("\t")[:2] for line in (tmp_path / "suite_steps.tsv").read_text().splitlines()[1:]]
        assert steps == [["gpu_tests", status]], done.stdout + done.stderr


def test_the_full_spmm_sweep_runs_only_when_named(tmp_path):
    """spmm_sweep (issue 4's 13 token counts) does not fit beside the rest in one device call: the default steps
    leave it out, and SUITE_STEPS=spmm_sweep runs it (on a CPU bench_spmm finds no GPU and exits 1)."""
    suite = (BENCHMARKS / "gpu_suite.sh").read_text()
    default = re.search(r"SUITE_STEPS=\$\{SUITE_STEPS:-(.*)\}", suite).group(1)
    assert "$BENCHES" in default and "spmm_sweep" not in default and "OPTIONAL" not in default
    done = _suite(tmp_path, "spmm_sweep")
    steps = [line.split("\t")[:2] for line in (tmp_path / "suite_steps.tsv").read_text().splitlines()[1:]]
    assert steps == [["spmm_sweep", "failed"]], done.stdout + done.stderr
    assert "bench_spmm: no CUDA GPU visible" in done.stdout


def test_the_ncu_step_profiles_under_ncu_and_summarizes_its_csv(tmp_path, monkeypatch):
    """SUITE_STEPS=ncu: ncu ($NCU; here a stand-in that records its arguments and prints a CSV) runs
    ncu_kernels.py with the clocks left alone, its CSV is kept, and the summary's records are the step's results."""
    fake = tmp_path / "bin" / "ncu"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/ncu_args\ncat <<'CSV'\n{NCU_CSV}CSV\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NCU", str(fake))
    done = _suite(tmp_path, "ncu")
    steps = [line.split("\t")[:2] for line in (tmp_path / "suite_steps.tsv").read_text().splitlines()[1:]]
    assert steps == [["ncu", "ok"]], done.stdout + done.stderr
    args = (tmp_path / "ncu_args").read_text()
    assert "--clock-control none" in args and "--profile-from-start off" in args
    assert args.rstrip().endswith("benchmarks/ncu_kernels.py")
    assert (tmp_path / "ncu_kernels.csv").read_text() == NCU_CSV
    assert [r["kernel"] for r in json.loads((tmp_path / "ncu.json").read_text())] == ["_compress_kernel",
                                                                                       "gemv2T_kernel"]


def test_suite_names_an_unknown_step(tmp_path):
    done = _suite(tmp_path, "install gpu_test")
    assert done.returncode == 2
    assert "unknown step 'gpu_test'" in done.stderr and "gpu_tests" in done.stderr
    assert not (tmp_path / "suite_steps.tsv").exists()


FAKE_SDSENGINE = r'''#!/usr/bin/env bash
# Stands in for sdsengine in quality.sh: prune writes a run report of $PRUNE_SECONDS, eval a perplexity, or
# fails where $FAIL_EVAL is set.
cmd=$1; shift
while [ $# -gt 0 ]; do
  case $1 in --out) out=$2; shift ;; --json) json=$2; shift ;; esac
  shift
done
case $cmd in
  prune) mkdir -p "$out" && echo "{\"seconds\": $PRUNE_SECONDS}" > "$out/sdsengine.json" ;;
  eval) [ -z "${FAIL_EVAL:-}" ] && echo '{"results": {"wikitext2": {"ppl": 5.0}}}' > "$json" ;;
esac
'''


def _quality_env(tmp_path, out, runs, script=FAKE_SDSENGINE, **extra):
    """The environment for quality.sh with `script` standing in for sdsengine on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sdsengine").write_text(script)
    (bin_dir / "sdsengine").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "QUALITY_OUT": str(out), "SDSENGINE_RUNS": str(runs), "ZS_TASKS": "", **extra}


# Also records each call's arguments, one per line, in $ARGS.prune / $ARGS.eval
RECORDING_SDSENGINE = FAKE_SDSENGINE.replace("cmd=$1; shift", 'printf "%s\\n" "$@" > "$ARGS.$1"\ncmd=$1; shift')


def test_quality_sh_replaces_record_and_report_together(tmp_path):
    """A run whose evaluation fails leaves the earlier record and its report as they were: never the old
    perplexity beside the new run's report."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = _quality_env(tmp_path, out, runs, PRUNE_SECONDS="12")
    command = ["bash", str(BENCHMARKS / "quality.sh"), "x_2-4", "--method", "wanda", "--sparsity", "2:4"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert json.loads((out / "x_2-4.prune.json").read_text()) == {"seconds": 12}
    assert json.loads((out / "x_2-4.json").read_text())["prune_wall_s"] == 12
    failed = subprocess.run(command, env={**env, "PRUNE_SECONDS": "99", "FAIL_EVAL": "1"}, capture_output=True)
    assert failed.returncode != 0
    assert json.loads((out / "x_2-4.prune.json").read_text()) == {"seconds": 12}
    assert json.loads((out / "x_2-4.json").read_text())["prune_wall_s"] == 12


def test_quality_sh_runs_and_records_its_commands_word_for_word(tmp_path):
    """Paths with spaces and --ignore patterns reach sdsengine as given (a pattern matching a file in the
    repository root, where quality.sh runs, is not globbed), and the record holds a command a shell gives
    back the same words."""
    out, runs = tmp_path / "q out", tmp_path / "r uns"
    env = _quality_env(tmp_path, out, runs, RECORDING_SDSENGINE, PRUNE_SECONDS="1", ARGS=str(tmp_path / "args"))
    flags = ["--method", "wanda", "--ignore", "README*"]
    subprocess.run(["bash", str(BENCHMARKS / "quality.sh"), "x_2-4", *flags], env=env, check=True,
                   capture_output=True)
    pruned = (tmp_path / "args.prune").read_text().splitlines()
    assert pruned[:5] == ["prune", *flags] and pruned[-3:] == ["--overwrite", "--resume-dir",
                                                               str(runs / "x_2-4.progress")]
    record = json.loads((out / "x_2-4.json").read_text())
    assert shlex.split(record["prune_command"])[1:] == pruned[:-2]
    assert shlex.split(record["eval_command"])[1:] == (tmp_path / "args.eval").read_text().splitlines()
    assert str(out / "x_2-4.eval.json") in shlex.split(record["eval_command"])


def test_quality_sh_takes_another_model(tmp_path):
    """MODEL (a path with a space here) is the model a prune starts from and the one a dense NAME evaluates;
    a pruned NAME evaluates its own saved model."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    model = str(tmp_path / "other model.gguf")
    env = _quality_env(tmp_path, out, runs, RECORDING_SDSENGINE, PRUNE_SECONDS="1", ARGS=str(tmp_path / "args"),
                       MODEL=model)
    quality = ["bash", str(BENCHMARKS / "quality.sh")]
    subprocess.run([*quality, "x_2-4", "--method", "wanda"], env=env, check=True, capture_output=True)
    assert (tmp_path / "args.prune").read_text().splitlines()[:5] == ["prune", "--model", model, "--method", "wanda"]
    evaluated = (tmp_path / "args.eval").read_text().splitlines()
    assert evaluated[:3] == ["eval", "--model", str(runs / "x_2-4")] and model not in evaluated
    subprocess.run([*quality, "dense"], env=env, check=True, capture_output=True)
    assert (tmp_path / "args.eval").read_text().splitlines()[:3] == ["eval", "--model", model]
    assert shlex.split(json.loads((out / "dense.json").read_text())["eval_command"])[1:4] == ["eval", "--model", model]


@pytest.mark.parametrize("name", ["bench_e2e", "bench_lean"])
def test_model_benchmarks_name_the_transformers_they_need(benchmark, name, monkeypatch, tmp_path):
    """setup.py admits transformers 4.45; these call from_config(dtype=) and logits_to_keep, which came later: on an
    older one they failed deep in a model's forward (a TypeError) after building it."""
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.55.2")
    with pytest.raises(SystemExit, match=r"needs transformers >= 4\.56 .*; this is 4\.55\.2"):
        benchmark(name).main(["--model", str(tmp_path)] if name == "bench_lean" else [])


def test_grouped_records_time_both_sides_on_the_same_routed_rows(benchmark, monkeypatch):
    """The grouped measurement (sdsengine bench on a mixture, bench_grouped) on the CPU, the kernel's reference and a
    per-expert loop standing in for the GPU's grouped kernel and torch._grouped_mm: the fields, the ratios, and a
    wrong answer flagged."""
    from sdsengine import bench
    monkeypatch.setattr(ops, "run_grouped", fake_grouped_kernel([]))

    def grouped_mm(x, w_t, offs):  # rows offs[e - 1]:offs[e] through expert e
        starts = [0, *offs.tolist()[:-1]]
        out = torch.zeros(x.shape[0], w_t.shape[2], dtype=x.dtype)
        for e, (start, stop) in enumerate(zip(starts, offs.tolist())):
            out[start:stop] = x[start:stop] @ w_t[e]
        return out
    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm, raising=False)
    records = bench.measure_grouped((48, 64), 6, 2, [1, 3], torch.float32, iters=2, users="experts.down_proj",
                                    device="cpu")
    assert [r["tokens"] for r in records] == [1, 3]
    for record in records:
        assert record["status"] == "ok" and record["shape"] == "6x48x64" and record["top_k"] == 2
        assert record["speedup"] == pytest.approx(record["dense_ms"] / record["ms"])
        assert record["tbps"] > 0 and record["rel_err"] < 1e-6
    # 3 tokens: 6 rows over 6 experts, 1 each when even: the tile sized for all 3 rows is timed beside it
    assert "tiles_for_all_rows_device_ms" not in records[0] and records[1]["tiles_for_all_rows_device_ms"] > 0
    def measured():
        return bench.measure_grouped((48, 64), 6, 2, [3], torch.float32, iters=2, device="cpu")[0]
    real_kernel = ops.run_grouped
    monkeypatch.setattr(ops, "run_grouped", lambda form, x, *args: torch.zeros(x.shape[0], 48))
    assert measured()["status"] == "wrong"

    def wrong_when_tiled_for_all_rows(form, x, offsets, groups, max_rows, bias, out_features, typical_rows=None):
        y = real_kernel(form, x, offsets, groups, max_rows, bias, out_features)
        return y * 0 if typical_rows == max_rows else y
    monkeypatch.setattr(ops, "run_grouped", wrong_when_tiled_for_all_rows)
    assert measured()["status"] == "wrong"
    monkeypatch.setattr(ops, "run_grouped", real_kernel)
    monkeypatch.setattr(torch, "_grouped_mm", lambda x, w_t, offs: torch.zeros(x.shape[0], w_t.shape[2]))
    assert measured()["status"] == "baseline wrong" and measured()["rel_err"] < 1e-6  # not ours
    monkeypatch.delattr(torch, "_grouped_mm")  # a torch without it: ours still timed, unrated
    record = measured()
    assert record["status"] == "failed" and "no dense baseline" in record["error"] and record["ms"] > 0
    assert benchmark("bench_grouped").main(["--tokens", "1"]) == 1  # no GPU here: nothing measured, said so


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "hunyuan_v1_moe", "ernie4_5_moe"])
def test_sdsengine_bench_finds_a_mixtures_grouped_projections(family):
    from sdsengine.bench import expert_groups
    model = tiny_model(family)
    experts_ = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else 4
    ffn = getattr(model.config, "moe_intermediate_size", None) or model.config.intermediate_size
    hidden = model.config.hidden_size  # GPT-OSS keeps its banks transposed: the same (out, in) read back
    assert expert_groups(model) == {(experts_, 2, 2 * ffn, hidden): "experts.gate_up_proj",
                                    (experts_, 2, hidden, ffn): "experts.down_proj"}
    assert expert_groups(tiny_model("llama")) == {}


def test_sdsengine_bench_on_a_mixture_times_single_layers_and_grouped_experts():
    """`sdsengine bench --model` takes both from the loaded model: every layer shape, and the experts grouped."""
    from argparse import Namespace

    from sdsengine.bench import _shapes_from_args, expert_groups, model_shapes
    model = tiny_model("mixtral")
    args = Namespace(shapes=None, model="some/mixtral")
    assert _shapes_from_args(args, lambda name: (model, None)) == (model_shapes(model), expert_groups(model))
    assert _shapes_from_args(Namespace(shapes="64x128", model="some/mixtral"), None) == ({(64, 128): ""}, {})


def test_sdsengine_bench_leaves_out_experts_that_cannot_all_convert():
    """The grouped path needs every projection of a module converted: an ffn width past 32's multiples keeps
    gate_up per expert too."""
    from sdsengine.bench import expert_groups
    model = tiny_model("mixtral")
    experts_ = model.model.layers[0].mlp.experts
    experts_.down_proj.data = experts_.down_proj.data[..., :40]  # 40 inputs: not a multiple of 32
    experts_.gate_up_proj.data = experts_.gate_up_proj.data[:, :80]
    assert expert_groups(model) == {(4, 2, 2 * model.config.intermediate_size, model.config.hidden_size):
                                    "experts.gate_up_proj", (4, 2, model.config.hidden_size,
                                                             model.config.intermediate_size): "experts.down_proj"}


def test_a_bad_token_list_is_a_usage_error_naming_its_flag(benchmark, capsys):
    """The benchmarks' token lists go through one parser; argparse names the flag that was wrong."""
    for module, argv in (("bench_e2e", ["--decode-batches", "0"]), ("bench_spmm", ["--tokens", "1,x"])):
        with pytest.raises(SystemExit) as exit_info:
            benchmark(module).main(argv)
        assert exit_info.value.code == 2
        flag = argv[0]
        assert f"argument {flag}: takes positive integers such as 1,16,128, got '{argv[1]}'" in capsys.readouterr().err
