"""Data-parallel pruning (pipeline/parallel.py) in real process groups: two CPU processes under gloo.

Each check runs in both processes of one group (torch.multiprocessing), which write what they hold; the test
compares it with a one-process run on the same windows, and the two processes with each other."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sdsengine
from sdsengine import checkpoint, models
from sdsengine.algorithms.stats import Hessian, InputNorms
from sdsengine.pipeline import parallel, sequential

from tiny_models import save_tiny_tokenizer, tiny_config, tiny_model, tiny_tokens

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
CASES = {  # family, config
    "wanda 2:4": ("llama", sdsengine.WandaConfig(sparsity="2:4")),
    "sparsegpt 50%": ("llama", sdsengine.SparseGPTConfig(sparsity=0.5)),
    "sds 2:4": ("llama", sdsengine.SDSConfig(sparsity="2:4", iters=4, refit=4)),
    # the dense stream, linear groups (SDS's default order) and a mixture's experts, each with its own statistics;
    # no swaps: their greedy exchanges flip with sums taken in another order, as one process's do with the windows
    # reversed (250 of this model's 62400 weights)
    "sds 2:4 dense teacher, mixture": ("qwen2_moe", sdsengine.SDSConfig(sparsity="2:4", iters=4, refit=4,
                                                                        teacher="dense", swaps=0)),
    # BESA: two processes learn as one process with --batch 2 (one window each a step; 5 windows: the last step's
    # in one process only); N:M with its checks of the hard-mask loss
    "besa 50%": ("llama", sdsengine.BESAConfig(sparsity=0.5)),
    "besa 2:4 dense model": ("llama", sdsengine.BESAConfig(sparsity="2:4", nm_checks=3, target="dense_model")),
    "sds on besa 2:4": ("llama", sdsengine.SDSConfig(sparsity="2:4", base="besa", iters=4, refit=4)),
}


def _in_group(rank, store, out, job, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.save(job(*args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_in_group(tmp_path, job, *args):
    """[what job(*args) returned in each process of a group of WORLD], in rank order (job: a module-level function,
    which the processes import)."""
    out = tmp_path / "result"
    mp.spawn(_in_group, args=(str(tmp_path / "store"), str(out), job, args), nprocs=WORLD)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 8, generator=g)
    return x, x + 0.1 * torch.randn(6, 5, 8, generator=g)


def _merge_statistics():
    """Each process's statistics of its share of the windows, merged; the dense stream's (C, T) only in the
    first process's share, as a mixture's expert may see it."""
    x, dense_x = _inputs()
    mine = torch.tensor_split(torch.arange(6), WORLD)[parallel.rank()]
    hessian, norms, lopsided = Hessian(8, "cpu"), InputNorms(8, "cpu"), Hessian(8, "cpu")
    for j in mine:
        hessian.add_batch(x[j], dense_x[j])
        norms.add_batch(x[j])
        lopsided.add_batch(x[j], dense_x[j] if parallel.rank() == 0 else None)
    for s in (hessian, norms, lopsided):
        s.merge(parallel.summed)
    return hessian, norms, lopsided


def test_statistics_merged_across_processes_equal_one_process(tmp_path):
    x, dense_x = _inputs()
    whole, norms, first_only = Hessian(8, "cpu"), InputNorms(8, "cpu"), Hessian(8, "cpu")
    for j in range(6):
        whole.add_batch(x[j], dense_x[j])
        norms.add_batch(x[j])
    for j in torch.tensor_split(torch.arange(6), WORLD)[0]:
        first_only.add_batch(x[j], dense_x[j])
    for hessian, merged_norms, lopsided in run_in_group(tmp_path, _merge_statistics):
        assert hessian.tokens == merged_norms.tokens == lopsided.tokens == whole.tokens == 30
        for name in "HCT":
            torch.testing.assert_close(getattr(hessian, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged_norms.sq, norms.sq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lopsided.H, whole.H, rtol=1e-5, atol=1e-6)
        # the dense stream's sums hold the first process's tokens, averaged over all tokens
        torch.testing.assert_close(lopsided.C, first_only.C * first_only.tokens / 30, rtol=1e-5, atol=1e-6)


def _shared_unevenly():
    """q/k/v share one object in process 0; in process 1, which saw no tokens, each holds its own."""
    if parallel.rank() == 0:
        shared = InputNorms(4, "cpu")
        shared.add_batch(torch.ones(3, 4))
        stats = {"q": shared, "k": shared, "v": shared, "o": InputNorms(4, "cpu")}
    else:
        stats = {name: InputNorms(4, "cpu") for name in "qkvo"}
    stats["o"].add_batch(torch.full((2, 4), 2.0))
    parallel.merge_stats(stats)
    return {name: (id(s), s.tokens, s.sq.tolist()) for name, s in stats.items()}


def test_shared_statistics_are_summed_once(tmp_path):
    for held in run_in_group(tmp_path, _shared_unevenly):
        assert held["q"][0] == held["k"][0] == held["v"][0] != held["o"][0]
        assert held["q"][1:] == (3, [3.0] * 4)  # once, not three times
        assert held["o"][1:] == (4, [16.0] * 4)


def _prune(case, device="cpu", skeleton=False):
    family, config = CASES[case]
    model = tiny_model(family)
    if skeleton and parallel.rank() > 0:  # as the CLI's processes after the first: no weights, each layer lent
        model = models.skeleton(model.config)
    result = sdsengine.prune(model, dataclasses.replace(config, device=device), tiny_tokens(nsamples=5),
                             progress=False)
    return {"weights": {k: v for k, v in model.state_dict().items() if v.is_floating_point() and not v.is_meta},
            "errors": [layer.error for layer in result.layers], "report": result.report,  # experts' banks too
            "skeleton": all(p.is_meta for p in model.parameters())}


@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_prune_matches_one_process(case, tmp_path):
    _check_data_parallel(case, "cpu", tmp_path)


@pytest.mark.parametrize("case", ["wanda 2:4", "sparsegpt 50%", "sds 2:4 dense teacher, mixture",
                                  "besa 2:4 dense model"])
def test_a_process_holding_a_skeleton_is_lent_each_layer(case, tmp_path):
    """The second process holds the model without weights (parameters on the meta device); the first lends it each
    layer for the layer's turn: the first's result is the one of two processes holding the model (the linears the
    second prunes, its windows' statistics and gradients included), and the second holds no weights after."""
    _check_data_parallel(case, "cpu", tmp_path, skeleton=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case, skeleton", [("sparsegpt 50%", False), ("sds 2:4", False), ("wanda 2:4", True)])
def test_data_parallel_prune_on_a_gpu_matches_one_process(case, skeleton, tmp_path):
    """The pipeline's CUDA side of a group (statistics, weights and fallbacks on the GPU, objects sent from it; layers
    lent to a skeleton there): both processes on one GPU under gloo (NCCL takes a GPU per process; the lent machine
    has one)."""
    _check_data_parallel(case, "cuda", tmp_path, skeleton)


def _check_data_parallel(case, device, tmp_path, skeleton=False):
    family, config = CASES[case]
    model = tiny_model(family)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "batch_of", lambda asked: WORLD)  # BESA's steps: as the group's (--batch 2)
        alone = sdsengine.prune(model, dataclasses.replace(config, device=device), tiny_tokens(nsamples=5),
                                progress=False)
    first, second = run_in_group(tmp_path, _prune, case, device, skeleton)
    assert not first["skeleton"] and second["skeleton"] == skeleton
    for key, value in second["weights"].items():
        assert torch.equal(value, first["weights"][key]), key  # every process holds the same model
    kept = agree = 0
    for key, weight in model.state_dict().items():
        if key in first["weights"]:
            got = first["weights"][key]
            agree += ((weight != 0) == (got != 0)).sum().item()
            kept += weight.numel()
            assert (weight - got).abs().max() <= 1e-3 * weight.abs().max(), key
            if "layers" not in key:
                assert torch.equal(weight, got)
    assert agree / kept > 0.999  # masks differ at near ties only (sums taken in another order)
    for a, b in zip(first["errors"], [layer.error for layer in alone.layers]):
        assert a == pytest.approx(b, rel=1e-4)
    parallel_info = first["report"]["data_parallel"]
    assert parallel_info["processes"] == WORLD and parallel_info["windows"] == [3, 2]
    assert len(parallel_info["memory"]) == WORLD


def _refusal(config, nsamples, resume_dir=None):
    return _refusal_of(lambda: sdsengine.prune(tiny_model("llama"), config, tiny_tokens(nsamples=nsamples),
                                               progress=False, resume_dir=resume_dir))


def test_a_besa_batch_the_processes_cannot_share_is_refused(tmp_path):
    for message in run_in_group(tmp_path, _refusal, sdsengine.BESAConfig(sparsity=0.5, batch=3), 4):
        assert "--batch 3 in a group of 2 processes" in message and "pass a multiple of 2" in message


RESUMED = sdsengine.SDSConfig(sparsity="2:4", base="wanda", iters=5, refit=3, teacher="dense")  # a dense stream too


class _Stopped(BaseException):  # as a kill would: no handler of Exception catches it
    pass


def _three_layers():
    config = tiny_config("llama")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _resumable(progress, stop_at):
    """A group's prune of a 3-layer Llama with --resume-dir `progress` (None: without), the second process holding a
    skeleton, stopped in both processes as they reach layer `stop_at` (None: never)."""
    model = _three_layers()
    if parallel.rank() > 0:
        model = models.skeleton(model.config)
    real, calls = sequential._prune_layer, []

    def prune_layer(i, *args, **kwargs):
        calls.append(i)
        if i == stop_at:
            raise _Stopped
        return real(i, *args, **kwargs)
    sequential._prune_layer = prune_layer  # in this spawned process only
    try:
        result = sdsengine.prune(model, RESUMED, tiny_tokens(3, 48), progress=False, resume_dir=progress)
    except _Stopped:
        return None
    return {"calls": calls, "weights": {k: v for k, v in model.state_dict().items() if not v.is_meta},
            "errors": [layer.error for layer in result.layers], "resumed": result.report.get("resumed")}


def test_a_group_stopped_then_resumed_equals_an_unbroken_group(tmp_path):
    """Each process keeps its own windows' activations (the dense stream's too), the first the weights and the
    manifest; the same group run again goes on from the last finished layer, bit for bit the unbroken run. Another
    number of processes is refused, naming it."""
    progress = tmp_path / "progress"
    for run in "abc":
        (tmp_path / run).mkdir()
    run_in_group(tmp_path / "a", _resumable, str(progress), 2)
    # listed once both processes have stopped: each deletes its older activations after the manifest moves on
    assert sorted(p.name for p in progress.iterdir()) == ["activations-0002-0of2.pt", "activations-0002-1of2.pt", "layer-0000.pt",
                                   "layer-0001.pt", "progress.json"]
    with pytest.raises(ValueError, match="progress of another run .*processes: 2 there, 1 here"):
        sdsengine.prune(_three_layers(), RESUMED, tiny_tokens(3, 48), progress=False,
                        resume_dir=progress)
    resumed, _ = run_in_group(tmp_path / "b", _resumable, str(progress), None)
    unbroken, _ = run_in_group(tmp_path / "c", _resumable, None, None)
    assert resumed["calls"] == [2] and resumed["resumed"]["from_layer"] == 2
    assert resumed["errors"] == unbroken["errors"]
    for key, value in unbroken["weights"].items():
        assert torch.equal(value, resumed["weights"][key]), key


def _wanda_with_a_skeleton(family):
    model = tiny_model(family)
    if parallel.rank() > 0:
        model = models.skeleton(model.config)
    sdsengine.prune(model, CASES["wanda 2:4"][1], tiny_tokens(nsamples=4), progress=False)
    return model.state_dict() if parallel.rank() == 0 else all(p.is_meta for p in model.parameters())


# what each forward reads before layer 0 differs: OPT's learned positions and projections, BLOOM's embedding norm,
# GPT-2's position table, Gemma 3's embedding scale (a buffer), DeepSeek-V3's dense first layer beside its experts
@pytest.mark.parametrize("family", ["opt", "bloom", "gpt2", "gemma3", "deepseek_v3"])
def test_a_skeleton_is_lent_what_each_family_reads(family, tmp_path):
    model = tiny_model(family)
    sdsengine.prune(model, CASES["wanda 2:4"][1], tiny_tokens(nsamples=4), progress=False)
    first, skeleton_after = run_in_group(tmp_path, _wanda_with_a_skeleton, family)
    assert skeleton_after and first.keys() == model.state_dict().keys()
    for key, weight in model.state_dict().items():
        assert ((weight != 0) == (first[key] != 0)).float().mean() > 0.99, key


def _streamed_or_saved(source, out, streamed):
    """A group's SparseGPT 2:4 of the checkpoint at source, saved to out: streamed from its files, or loaded (whole in
    the first process, a skeleton in the other) and saved."""
    config, tokens = sdsengine.SparseGPTConfig(sparsity="2:4"), tiny_tokens(nsamples=4)
    if streamed:
        return sdsengine.prune_checkpoint(source, out, config, tokens, progress=False).report["decoder_sparsity"]
    model, tokenizer, _ = models.load_model(source, skeleton=parallel.rank() > 0)
    result = sdsengine.prune(model, config, tokens, tokenizer, progress=False)
    if parallel.rank() == 0:
        checkpoint.save_checkpoint(model, tokenizer, out, result.report)
    return result.report["decoder_sparsity"]


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_a_group_streams_the_checkpoint_as_it_prunes_it_loaded(family, tmp_path):
    """The first process reads and writes the files and lends each layer to the other, which loads nothing (a
    mixture's experts as their linears)."""
    source = tmp_path / "source"
    tiny_model(family).save_pretrained(source)
    save_tiny_tokenizer(source)
    loaded = run_in_group(tmp_path, _streamed_or_saved, str(source), str(tmp_path / "loaded"), False)
    streamed = run_in_group(tmp_path, _streamed_or_saved, str(source), str(tmp_path / "streamed"), True)
    assert streamed == loaded and loaded[0] == 0.5
    written = [sorted((tmp_path / d).glob("*.safetensors")) for d in ("loaded", "streamed")]
    assert len(written[1]) == 3  # a file per layer and one for the rest
    tensors = [{k: v for f in files for k, v in load_file(f).items()} for files in written]
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def _streamed_resumable(source, out, progress, stop_at):
    """_streamed_or_saved's streamed prune with --resume-dir `progress`, stopped in both processes as they reach layer
    `stop_at` (None: never); what the report says was resumed, or "stopped"."""
    real = sequential._prune_layer

    def prune_layer(i, *args, **kwargs):
        if i == stop_at:
            raise _Stopped
        return real(i, *args, **kwargs)
    sequential._prune_layer = prune_layer  # in this spawned process only
    try:
        result = sdsengine.prune_checkpoint(source, out, sdsengine.SparseGPTConfig(sparsity="2:4"),
                                            tiny_tokens(nsamples=4), progress=False, resume_dir=progress)
    except _Stopped:
        return "stopped"
    return result.report.get("resumed")


def test_a_streaming_group_stopped_then_resumed_writes_the_unbroken_groups_checkpoint(tmp_path):
    source, progress = tmp_path / "source", str(tmp_path / "progress")
    _three_layers().save_pretrained(source)
    save_tiny_tokenizer(source)
    for run in "abc":
        (tmp_path / run).mkdir()
    stopped = run_in_group(tmp_path / "a", _streamed_resumable, str(source), str(tmp_path / "out"), progress, 2)
    assert stopped == ["stopped", "stopped"] and not (tmp_path / "out").exists()
    resumed = run_in_group(tmp_path / "b", _streamed_resumable, str(source), str(tmp_path / "out"), progress, None)
    assert resumed[0]["from_layer"] == 2 and not Path(progress).exists()
    run_in_group(tmp_path / "c", _streamed_or_saved, str(source), str(tmp_path / "loaded"), False)
    written = [{k: v for f in sorted((tmp_path / d).glob("*.safetensors")) for k, v in load_file(f).items()}
               for d in ("loaded", "out")]
    assert written[0].keys() == written[1].keys()
    assert all(torch.equal(written[0][k], written[1][k]) for k in written[0])


def _magnitude(skeleton):
    model = tiny_model("llama")
    if skeleton and parallel.rank() > 0:
        model = models.skeleton(model.config)
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), progress=False)
    return {k: v for k, v in model.state_dict().items() if not v.is_meta}


def test_a_skeleton_is_lent_the_layers_of_a_method_without_data(tmp_path):
    """Magnitude: every process prunes each layer itself, a skeleton's lent."""
    model = tiny_model("llama")
    sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), progress=False)
    first, second = run_in_group(tmp_path, _magnitude, True)
    assert not second and first.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, first[key]), key


def _other_model(family):
    model = tiny_model(family if parallel.rank() == 0 else "qwen2")
    return _refusal_of(lambda: sdsengine.prune(model, CASES["wanda 2:4"][1], tiny_tokens(nsamples=4),
                                               progress=False))


def _refusal_of(run):
    try:
        run()
    except ValueError as exc:
        return str(exc)


def test_processes_holding_different_models_are_refused(tmp_path):
    for message in run_in_group(tmp_path, _other_model, "llama"):
        assert "process 1 holds another model than the first: model.layers.0.self_attn.q_proj.bias" in message


def test_a_skeleton_alone_or_first_is_refused(tmp_path):
    model = models.skeleton(tiny_model("llama").config)
    with pytest.raises(ValueError, match=r"parameters are on the meta device \(a skeleton, no weights\): load the"):
        sdsengine.prune(model, CASES["wanda 2:4"][1], tiny_tokens(nsamples=4), progress=False)
    for message in run_in_group(tmp_path, _skeleton_first):
        assert "(the first process of a group lends the others the weights)" in message


def _skeleton_first():
    model = tiny_model("llama")
    if parallel.rank() == 0:
        model = models.skeleton(model.config)
    return _refusal_of(lambda: sdsengine.prune(model, CASES["wanda 2:4"][1], tiny_tokens(nsamples=4),
                                               progress=False))


def _short_of_host_memory():
    """A prune in a machine whose host memory holds one process's activations and not both processes'."""
    from sdsengine.pipeline import memory
    one = memory.activation_bytes(tiny_model("llama"), 3, tiny_tokens(nsamples=5).shape[1], False)  # 3 windows of 5
    memory.available_bytes = lambda device: int(1.5 * one)  # in this spawned process only
    return _refusal(CASES["wanda 2:4"][1], 5)


def test_the_host_memory_a_machines_processes_share_is_checked_for_all_of_them(tmp_path):
    for message in run_in_group(tmp_path, _short_of_host_memory):
        assert "and this machine's other processes" in message and "lower --nsamples or --seqlen" in message


def test_too_few_windows_are_refused(tmp_path):
    for message in run_in_group(tmp_path, _refusal, CASES["wanda 2:4"][1], 1):
        assert "1 calibration windows cannot be shared by 2 processes" in message


def test_linears_spread_by_their_cost(monkeypatch):
    """A Llama-2-7B layer's linears over 3 processes: the three 11008-wide ones first, one each, then the 4096
    squares to the least loaded; the same owners whatever order the names come in."""
    monkeypatch.setattr(parallel, "world", lambda: 3)
    shapes = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096), "gate": (11008, 4096),
              "up": (11008, 4096), "down": (4096, 11008)}
    weights = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    owners = parallel._owners(weights)
    assert owners == {"down": 0, "gate": 1, "up": 2, "k": 1, "o": 2, "q": 1, "v": 2}
    assert parallel._owners(dict(reversed(weights.items()))) == owners


@pytest.mark.parametrize("resumable", [False, True])
def test_torchrun_prunes_in_each_process_and_saves_once(tmp_path, resumable):
    """`torchrun -m sdsengine.cli prune` with 2 CPU processes (gloo): one checkpoint, one summary, and the run
    report's account of the processes; with --resume-dir, its progress gone once the checkpoint is saved."""
    tiny_model("llama").save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("a " * 2000)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "sdsengine.cli", "prune", "--model", str(tmp_path / "model"), "--method", "sparsegpt",
               "--sparsity", "2:4", "--calib", str(tmp_path / "calib.txt"), "--nsamples", "3", "--seqlen", "16",
               "--out", str(out)] + (["--resume-dir", str(tmp_path / "progress")] if resumable else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved to") == 1 and not (tmp_path / "progress").exists()
    report = json.loads((out / "sdsengine.json").read_text())
    assert report["data_parallel"]["processes"] == WORLD and report["data_parallel"]["windows"] == [2, 1]
    assert report["data_parallel"]["backend"] == "gloo" and report["recipe"]["device"] == "cpu"
    assert report["overall_sparsity"] == 0.5


GROUP_LEFT = """
import os, sys
from sdsengine.models import load_model
from sdsengine.pipeline import parallel
with parallel.joined("cpu"):
    load_model(sys.argv[1], needs_tokenizer=False)
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"]), "w") as f:  # one file each: prints interleave
    f.write(str(sum("gloo" in name for name in threads)))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process's threads from /proc")
def test_the_group_is_gone_when_its_processes_leave_it(tmp_path):
    """A model loaded inside the group (transformers then imports torch.distributed.nn, whose default arguments held
    the group) must not keep it alive past destroy_process_group: its gloo threads ran into the interpreter's exit
    and aborted the process now and then."""
    tiny_model("llama").save_pretrained(tmp_path / "model")
    (tmp_path / "job.py").write_text(GROUP_LEFT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               str(tmp_path / "job.py"), str(tmp_path / "model"), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    left = {r: (tmp_path / f"rank{r}").read_text() for r in range(WORLD)}  # gloo threads after the group, per process
    assert left == dict.fromkeys(range(WORLD), "0"), left


def test_a_numbered_gpu_or_more_processes_than_gpus_under_torchrun_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="each process takes the GPU of its LOCAL_RANK; pass --device cuda"):
        with parallel.joined("cuda:1"):
            pass
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="torchrun started 2 processes on this machine and 1 GPU"):
        with parallel.joined("cuda"):
            pass
