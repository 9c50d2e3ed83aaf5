"""The calibration activations' size, known before any work, and the refusal when they cannot fit."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdsengine
from sdsengine.config import SDSConfig, WandaConfig
from sdsengine.pipeline import adapters, memory
from sdsengine.pipeline.capture import capture_layer_inputs
from tiny_models import needs_fused_experts, tiny_model, tiny_tokens

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_equals_the_captured_buffers(family, dtype):
    model = tiny_model(family).to(dtype)
    samples = tiny_tokens(3, 16)
    inps, _ = capture_layer_inputs(model, samples, CPU, CPU)
    buffer = inps.numel() * inps.element_size()
    assert memory.activation_bytes(model, 3, 16, dense_stream=False) == 2 * buffer
    assert memory.activation_bytes(model, 3, 16, dense_stream=True) == 4 * buffer


def _weights(model):
    return [adapters.get_weight(m).clone() for layer in adapters.decoder_layers(model)
            for m in adapters.linear_modules(layer).values()]


@pytest.mark.parametrize("config, buffers", [(WandaConfig(sparsity="2:4"), 2),
                                             (SDSConfig(sparsity="2:4", base="wanda", iters=2, teacher="dense"), 4)])
def test_refused_before_any_work_when_they_cannot_fit(monkeypatch, config, buffers):
    """With room for exactly the buffers the method keeps it runs; one byte less and it stops, naming the
    sizes and the remedy, with the model untouched. Wanda keeps two buffers, SDS with the
    dense teacher four (the dense stream)."""
    samples = tiny_tokens(4, 32)
    model = tiny_model("llama")
    need = buffers * 4 * 32 * model.config.hidden_size * 4
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    before = _weights(model)
    with pytest.raises(ValueError, match=r"activations of 4 windows x 32 tokens need .* MiB on cpu.*--nsamples"):
        sdsengine.prune(model, config, samples, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    sdsengine.prune(model, config, samples, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_sizes_read_in_mib_or_gib():
    assert memory.describe(3 * 2 ** 20) == "3.0 MiB"
    assert memory.describe(5 * 2 ** 29) == "2.50 GiB"


def test_unknown_free_memory_does_not_refuse(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    memory.check_fits(10 ** 15, CPU, "activations", "lower them")


def test_host_free_memory_is_read():
    """Where /proc/meminfo exists (Linux, as here and in CI) the reading is a real one: a broken reader
    returning None would silently turn the refuse-before-work check off."""
    free = memory.available_bytes(CPU)
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo on this system")
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert isinstance(free, int) and 0 < free <= total


def _peak_rise(code, *argv):
    """Run `code` with argv in a fresh process (tests/ on its path) after `hwm()` is defined; returns what it prints
    last."""
    prelude = ("def hwm():\n    with open('/proc/self/status') as f:\n"
               "        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))\n")
    done = subprocess.run([sys.executable, "-c", prelude + code, *argv], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")

_CAPTURE_PEAK = """
import torch
from sdsengine.pipeline.capture import capture_layer_inputs
from tiny_models import tiny_model, tiny_tokens

cpu = torch.device("cpu")
model = tiny_model("llama")
capture_layer_inputs(model, tiny_tokens(2, 128), cpu, cpu)  # first-call work off the measurement
before = hwm()
inps, _ = capture_layer_inputs(model, tiny_tokens(256, 128), cpu, cpu)
print((hwm() - before) / (inps.numel() * inps.element_size()))
"""


@linux_only
def test_capture_holds_the_activations_once():
    """Capturing layer 0's inputs raises the process's peak memory by one activation buffer, not two (the
    windows collected, then concatenated, held them twice, and that set a whole prune's peak)."""
    assert _peak_rise(_CAPTURE_PEAK) < 1.4


_FINGERPRINT_PEAK = """
import torch
from sdsengine.config import WandaConfig
from sdsengine.pipeline import resume

class Model:
    def __init__(self, weight):
        self.weight = weight
    def state_dict(self):
        return {"embed": self.weight}

resume.SUM_CHUNK = 1 << 16
samples = torch.zeros(1, 8, dtype=torch.long)
resume.fingerprint(Model(torch.ones(1 << 10)), WandaConfig(), samples)  # first-call work off the measurement
weight = torch.randn(1 << 22)
before = hwm()
resume.fingerprint(Model(weight), WandaConfig(), samples)
print((hwm() - before) / (weight.numel() * weight.element_size()))
"""


@linux_only
def test_fingerprint_sums_in_slices():
    """The resume fingerprint's float64 sums take a slice at a time: no float64 copy of a whole weight (with
    its absolute values, 4x the fp32 weight) on top of a run's activations."""
    assert _peak_rise(_FINGERPRINT_PEAK) < 0.5


def test_reported_peak_never_falls_when_the_kernel_reading_does(monkeypatch):
    # Linux's peak RSS can read a little lower later (approximate per-CPU RSS counters); CI saw 1.484 then 1.483.
    from sdsengine import report
    readings = iter([2 ** 20 * 3 // 2, 2 ** 20 * 3 // 2 - 1024, 2 ** 20 * 2])
    monkeypatch.setattr(report, "_cpu_peak_kib", 0)
    monkeypatch.setattr(report, "_peak_rss_kib", lambda: next(readings))
    peaks = [report.peak_memory("cpu")["cpu_peak_rss_gib"] for _ in range(3)]
    assert peaks == [1.5, 1.5, 2.0]


@linux_only
def test_a_process_reports_its_own_peak_not_its_parents():
    """ru_maxrss starts at the parent's peak in a forked process: a benchmark that built a 4.9 GiB model read every
    prune it started as 4.9 GiB."""
    parent = ("import subprocess, sys\n"
              "held = bytearray(1 << 30)\n"
              "held[::4096] = b'1' * len(held[::4096])\n"  # every page touched: resident
              "code = 'from sdsengine import report; print(report.peak_memory(\"cpu\")[\"cpu_peak_rss_gib\"])'\n"
              "print(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout)\n")
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert 0 < float(done.stdout.split()[-1]) < 0.9  # the child's own (its imports), not the parent's 1 GiB


def test_a_resumed_runs_peak_includes_the_earlier_processes_layers(monkeypatch):
    # The layers pruned before a resume carry their process's peaks; the report's run peak is the highest.
    from sdsengine import report
    from sdsengine.pipeline.sequential import LayerReport
    monkeypatch.setattr(report, "peak_memory", lambda device: {"cpu_peak_rss_gib": 2.0})
    earlier = [LayerReport(index=i, seconds=1.0, memory={"cpu_peak_rss_gib": peak})
               for i, peak in enumerate((2.5, 2.4))]
    later = [LayerReport(index=2, seconds=1.0, memory={"cpu_peak_rss_gib": 1.9})]
    assert report.run_peak("cpu", earlier + later) == {"cpu_peak_rss_gib": 2.5}
    assert report.run_peak("cpu", later) == {"cpu_peak_rss_gib": 2.0}



_READ_PEAK = """
import sys
import torch
from sdsengine import tensorfiles

found = tensorfiles.file_header(sys.argv[1])
tensorfiles.read_tensor(found["small"], torch.bfloat16)  # first-call work off the measurement
before = hwm()
read = tensorfiles.read_tensor(found["w"], torch.bfloat16)
print((hwm() - before) / (1 << 27))
"""


@linux_only
def test_a_streamed_tensor_is_read_without_a_copy_in_the_files_dtype(tmp_path):
    """read_tensor's peak: the result (half the float32 tensor, in bfloat16) and one 64 MiB slice, where safetensors'
    get_tensor (the float32 tensor) and the cast held 1.5 times the tensor."""
    from safetensors.torch import save_file  # written here: the file's tensors would count in the reader's peak
    save_file({"w": torch.ones(1 << 25), "small": torch.ones(64)}, tmp_path / "w.safetensors")  # w: 128 MiB
    assert _peak_rise(_READ_PEAK, str(tmp_path / "w.safetensors")) < 1.1  # times the float32 tensor's bytes


_WANDA_PEAK = """
import torch
from sdsengine import kernels

weight, norm = torch.empty(11008, 4096).normal_(), torch.rand(4096)
kernels.wanda_prune(torch.randn(64, 64), torch.rand(64), nm=(2, 4))  # first-call work off the measurement
before = hwm()
pruned, mask = kernels.wanda_prune(weight, norm, nm=(2, 4))
print((hwm() - before) / (weight.numel() * weight.element_size()))
"""


@linux_only
def test_wanda_on_the_cpu_takes_a_block_of_rows_at_a_time():
    """Wanda's reference (the CPU's path) a block of rows at a time: the outputs (the pruned weight, 1x, and its mask,
    0.25x) and a block's scores and indices, where the whole weight's held 3.25x an fp32 weight."""
    assert _peak_rise(_WANDA_PEAK) < 1.8  # times the weight's bytes


_COMPRESS_PEAK = """
import torch
from sdsengine.nn.sparse_linear import SparseLinear

weight = torch.randn(11008, 4096, dtype=torch.bfloat16)
weight.view(-1, 4)[:, :2] = 0
SparseLinear.from_dense(torch.zeros(64, 64, dtype=torch.bfloat16))  # first-call work off the measurement
before = hwm()
layer = SparseLinear.from_dense(weight)
print((hwm() - before) / (weight.numel() * weight.element_size()))
"""


@linux_only
def test_a_weight_compressed_on_the_cpu_takes_a_block_of_rows_at_a_time():
    """SparseLinear.from_dense on the CPU (convert's, and a streamed convert's peak): its check and compression take a
    block of rows at a time, where the whole weight's int64 temporaries were 13x a bf16 weight (1.1 GB here), and the
    layer takes the compressed tensors as they are made (its own buffers filled by a copy held them twice: 1.8x)."""
    assert _peak_rise(_COMPRESS_PEAK) < 1.5  # times the weight's bytes: the compressed weight, a block's temporaries


_LOAD_PEAK = """
import sys
from pathlib import Path

import torch
from torch import nn
import sdsengine

skeleton = nn.Sequential(*[nn.Linear(4096, 4096, device="meta", dtype=torch.bfloat16) for _ in range(8)])
before = hwm()
sdsengine.load_compressed(sys.argv[1], model=skeleton)
print((hwm() - before) / (Path(sys.argv[1]) / "sdsengine_compressed.safetensors").stat().st_size)
"""


@linux_only
def test_a_compressed_checkpoint_loads_holding_its_tensors_once(tmp_path):
    """load_compressed (safetensors' load_file, whose tensors on the host lie in the mapped file) holds the file's
    bytes once at most: a copy of each tensor beside them measured 1.37x (tried in the thirtieth session)."""
    import sdsengine
    from torch import nn
    model = nn.Sequential(*[nn.Linear(4096, 4096, dtype=torch.bfloat16) for _ in range(8)])  # 151 MB compressed
    with torch.no_grad():
        for layer in model:
            layer.weight.view(-1, 4)[:, :2] = 0
    sdsengine.save_compressed(sdsengine.convert(model, ignore=()), tmp_path / "packed")
    del model
    assert _peak_rise(_LOAD_PEAK, str(tmp_path / "packed")) < 1.3  # times the file's bytes


_STREAMED_EVAL_PEAK = """
import sys
import torch
from sdsengine.eval.perplexity import perplexity
from sdsengine.models import load_model
from sdsengine.pipeline import adapters, streaming
from tiny_models import tiny_model

small = tiny_model("llama")
perplexity(small, torch.randint(0, 96, (1, 64)), 32, progress=False)  # first-call work off the measurement
model, _, _ = load_model(sys.argv[1], needs_tokenizer=False, skeleton=True)
weights = streaming.WeightStream(model, streaming.checkpoint_files(sys.argv[1]), every=True)
layer = sum(p.numel() * p.element_size() for p in adapters.decoder_layers(model)[0].parameters())
before = hwm()
perplexity(model, torch.randint(0, 96, (1, 4 * 32)), 32, progress=False, weights=weights)
print((hwm() - before) / layer)
"""


@linux_only
def test_a_streamed_evaluation_holds_one_layer_at_a_time(tmp_path):
    """eval --stream-weights: the host holds the decoder layer whose turn it is (and the windows' hidden states, small
    here), not the model's six. Measured 1.4-1.7 layers (what the allocator keeps of the freed layers varies)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=96, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")  # 6 layers of 64 MiB in float32
    assert _peak_rise(_STREAMED_EVAL_PEAK, str(tmp_path / "model")) < 2.5  # times one layer's bytes


_STREAMED_MIXTURE_PEAK = """
import sys
import sdsengine
from sdsengine.models import load_model
from sdsengine.pipeline import adapters
from tiny_models import tiny_model

sdsengine.prune(tiny_model("qwen3_moe"), sdsengine.MagnitudeConfig(sparsity="2:4"), progress=False)  # first-call work
model, _, _ = load_model(sys.argv[1], needs_tokenizer=False, skeleton=True)
layer = sum(p.numel() * p.element_size() for p in adapters.decoder_layers(model)[0].parameters())
before = hwm()
sdsengine.prune_checkpoint(sys.argv[1], sys.argv[2], sdsengine.MagnitudeConfig(sparsity="2:4"), progress=False)
print((hwm() - before) / layer)
"""


@linux_only
def test_a_streamed_prune_of_a_mixture_holds_about_one_layer_at_a_time(tmp_path):
    """prune --stream-weights of a mixture whose experts are stored one by one: each expert's tensors are read into
    their rows of the layer's banks, its experts' linears are views of them, and each expert's tensors are written
    from those views. Measured 1.3-1.5 layers here; 3.0-3.3 while transformers built the banks (its steps hold their
    inputs beside their outputs) and each bank was stacked and split back as it was written; the six layers of the
    model would be more than 6."""
    from tiny_models import mixture_of_large_layers, save_tiny_tokenizer
    mixture_of_large_layers().save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    assert _peak_rise(_STREAMED_MIXTURE_PEAK, str(tmp_path / "model"), str(tmp_path / "out")) < 2.2  # layers


_LOADED_MIXTURE_PEAK = """
import sdsengine
from sdsengine.pipeline import adapters
from tiny_models import mixture_of_large_layers, tiny_model

sdsengine.prune(tiny_model("qwen3_moe"), sdsengine.MagnitudeConfig(sparsity="2:4"), progress=False)  # first-call work
model = mixture_of_large_layers()
layer = sum(p.numel() * p.element_size() for p in adapters.decoder_layers(model)[0].parameters())
before = hwm()
sdsengine.prune(model, sdsengine.MagnitudeConfig(sparsity="2:4"), progress=False)
print((hwm() - before) / layer)
"""


@linux_only
@needs_fused_experts
def test_a_loaded_mixtures_prune_copies_no_expert():
    """A mixture pruned where it sits: its experts' linears are views of the banks, pruned in place. Copies of every
    expert, stacked back into new banks on leaving, raised the peak by 1.1 layers here (the allocator keeps the freed
    copies; a real mixture's showed GiBs); now 0.2."""
    assert _peak_rise(_LOADED_MIXTURE_PEAK) < 0.6  # times one layer's bytes


_LOADED_MIXTURE_SAVE_PEAK = """
import sys
from sdsengine.checkpoint import save_checkpoint
from sdsengine.pipeline import adapters
from tiny_models import mixture_of_large_layers, tiny_model

save_checkpoint(tiny_model("qwen3_moe"), None, sys.argv[1] + "/first", {})  # first-call work
model = mixture_of_large_layers()
layer = sum(p.numel() * p.element_size() for p in adapters.decoder_layers(model)[0].parameters())
before = hwm()
save_checkpoint(model, None, sys.argv[1] + "/out", {})
print((hwm() - before) / layer)
"""


@linux_only
@needs_fused_experts
def test_a_loaded_mixture_is_saved_without_copies_of_its_banks(tmp_path):
    """Each expert's tensors written from views of the banks (mixture_save.py). transformers' save_pretrained copied
    every gate_up bank at once (two thirds of each layer's bytes): 3.9 layers here; now 0.05."""
    assert _peak_rise(_LOADED_MIXTURE_SAVE_PEAK, str(tmp_path)) < 0.5  # times one layer's bytes


_NON_FINITE_PEAK = """
import torch
from sdsengine.pipeline.sequential import non_finite

weight = torch.randn(1 << 24)
non_finite(torch.randn(64))  # first-call work off the measurement
before = hwm()
assert non_finite(weight) == 0
print((hwm() - before) / (weight.numel() * weight.element_size()))
"""


@linux_only
def test_counting_inf_and_nan_takes_a_small_slice_at_a_time():
    """Every weight a stream lends is checked for inf/NaN: torch.isfinite's temporaries (the absolute values, masks) of
    16M-value slices took a streamed layer's lending from 1.25x the layer to 2.2x."""
    assert _peak_rise(_NON_FINITE_PEAK) < 0.6  # times the 64 MiB tensor's bytes: up to 0.36 measured, 2.25 before
