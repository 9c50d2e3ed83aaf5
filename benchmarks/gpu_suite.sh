#!/usr/bin/env bash
# The GPU suite: one command for a CUDA machine (the lent H100/H200 included: no internet, python3 with torch,
# triton, nvcc and ninja already there), from the repository root or anywhere:
#
#   bash benchmarks/gpu_suite.sh
#
#   1. install      pip install --no-deps --no-build-isolation --no-index -e . without the extension (seconds), then
#                   install_cuda: setup.py build_ext --inplace builds sdsengine._C with ninja (where it fails, the
#                   other steps run without it), while kernel_tests (5.) runs beside it and `versions`
#   2. versions     nvidia-smi, nvcc, torch/triton/CUDA/driver, and which 2:4 matmul backends self-check ok
#   3. e2e, spmm    benchmarks/bench_e2e.py (last, lean too: no dense copies) and bench_spmm.py, cut down to
#                   fit, first: the figures the issues ask for; with the wgmma.sp pipelines off (never
#                   verified on hardware: a trap would end the process), so mma.sp, cuSPARSELt and dense
#                   (the sweeps below time wgmma)
#   4. wanda, compress, nm_mask   benchmarks/bench_<name>.py: Triton vs the PyTorch reference (nm_mask: the N:M
#                   mask every method's N:M step takes on a GPU)
#   5. kernel_tests pytest tests/kernels (CUDA tensors take the Triton kernels: SDSENGINE_KERNELS=auto), 8 workers,
#                   in the background from the end of install to the first benchmark (it needs no extension and
#                   times nothing; its output is printed when it ends)
#   6. gpu_tests    pytest -m gpu on the rest of tests/ (conftest.py skips these where no GPU is visible): the
#                   wgmma kernel's isolated cases first, then the rest under 4 workers; a wgmma pipeline that
#                   fails its isolated cases is off for the rest and for the later steps too. Both test
#                   steps write <step>_skips.tsv (each skipped test and why); the summary names the skips
#                   that are not by design (CUTLASS off 8.x, wgmma off 9.0)
#   7. dispatch     benchmarks/bench_dispatch.py: SparseLinear's host cost per call against nn.Linear's, alone and
#                   in a small 8-layer Llama
#   8. methods      benchmarks/bench_methods.py: each pruning method's seconds per layer and peak GPU memory on one
#                   random Llama-2-7B-shaped layer, 64 x 2048 random tokens (issues 5 and 6), baselines, BESA, SDS
#   9. wgmma_tiles, wgmma_tma  benchmarks/sweep_wgmma.py: the Hopper wgmma.sp kernel's tile widths against
#                   dense (9.0 only), its cp.async pipelines, then its TMA ones in a process of their own
#  10. spmm_bf16    bench_spmm.py in bf16 at 1 and 2048 tokens (wgmma pipelines as checked)
#  11. decode_xbuf  benchmarks/sweep_decode.py: the mma.sp decode kernel with X staged in one buffer (default) or two
#                   (the next chunk's copies in flight while one multiplies), 1-32 tokens, fp16, against dense
#  12. sparsegpt    bench_sparsegpt.py (its reference loops are slow; measured: target met)
#  Then, where time is left, what no issue names (a device call holds the steps above first):
#  13. grouped      benchmarks/bench_grouped.py: a mixture's experts in one launch, our grouped 2:4 kernel (what a
#                   packed mixture runs up to 32 routed rows per expert) against torch._grouped_mm, Qwen3-30B-A3B and
#                   Mixtral-8x7B experts
#  14. e2e_moe      bench_e2e.py on a Qwen3-30B-A3B-shaped mixture (4 layers, 128 experts, 8 per token): packed
#                   experts (the grouped kernel: decode and the 512-token prefill) against transformers' grouped dense
#                   run, decode in CUDA graphs, prefill eager
#  15. e2e_full     bench_e2e.py with all 32 decoder layers (as many as fit; wgmma off, as in e2e): it checks the
#                   estimate in NOTES.md that the 8-layer cut changes the decode ratio little (measured 12-04:
#                   1.28x against 8 layers' 1.22x)
#  16. the summary  benchmarks/summarize.py: key ratios, targets met, and what failed or was skipped
#  Only when named in SUITE_STEPS (it does not fit beside the rest in one device call):
#      spmm_sweep   bench_spmm.py over issue 4's whole sweep: tokens 1, 2, 4, ..., 4096 (13 counts), fp16 and bf16,
#                   every backend that passed its check (about 3 minutes; SUITE_STEPS=spmm_sweep after a suite run
#                   on the same machine, whose install and check results it reuses)
#      e2e_compiled bench_e2e.py as e2e, with both models' decode steps through torch.compile (inductor) before
#                   their CUDA graphs: what a user's compiled model gets (inductor's compiles take minutes)
#      sweep_tiles  benchmarks/sweep_tiles.py on the Wanda kernels: the unstructured one's warps per row (512 to
#                   4096 elements a warp) and the N:M one's tiles (8 to 32 rows, 128 to 512 columns, 4 or 8 warps),
#                   then the compress kernel's (8 to 32 rows, 64 to 256 columns, 4 or 8 warps; 4096x11008 missed
#                   its target on 12-04) on two Llama shapes: the data behind the tile constants of kernels/wanda.py
#                   and kernels/compress.py
#      ncu          benchmarks/ncu_kernels.py under Nsight Compute (clocks as the card has them): one call each of the
#                   kernels that miss their targets (fused Wanda 2:4 and 50%, compress, our decode kernel at 1 and 16
#                   tokens) beside a copy and dense, their bandwidth, occupancy and stalls as % of peak, into
#                   ncu.json/.md (ncu_kernels.csv: ncu's own output); $NCU, else ncu on PATH or under /opt/nvidia
#
# SUITE_STEPS="install gpu_tests" runs only those steps (names as above; default: all but spmm_sweep and
# e2e_compiled), to re-run what failed after a fix within a short device lease; only the selected steps' results
# files are replaced (the summary names the files from an earlier run, with how their steps ended then:
# suite_steps_earlier.tsv), and the backends' check results of the last `versions` are reused.
# Each step runs under `timeout` with its own budget (seconds, below) and never past SUITE_SECONDS in all
# (default 560: a device call allows 600); a step that fails, times out or finds no time left is recorded and
# the suite goes on; a benchmark step that exits 0 without its results file is recorded as no-results. The
# kernel benchmarks stop starting new cases at 3/4 of their budget.
# Writes into $RESULTS (default benchmarks/results) <step>.{json,md} for the benchmark steps, removing older
# ones first, and suite_steps.tsv (step, status, rc, seconds). Where $OUT is set (the device
# machine), also $OUT/suite.log, $OUT/results.tar.gz (those results, refreshed after every step) and
# $OUT/summary.txt.
# Exit status: 0 when every step ended ok, else 1.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUITE_SECONDS=${SUITE_SECONDS:-560}
RESULTS=${RESULTS:-benchmarks/results}
STEPS=$RESULTS/suite_steps.tsv EARLIER=$RESULTS/suite_steps_earlier.tsv
BENCHES="e2e spmm wanda compress nm_mask dispatch methods wgmma_tiles wgmma_tma spmm_bf16 decode_xbuf sparsegpt"
BENCHES="$BENCHES grouped e2e_moe e2e_full"
OPTIONAL_BENCHES="spmm_sweep e2e_compiled sweep_tiles ncu"  # run only when named
ALL_STEPS="install versions kernel_tests gpu_tests $BENCHES $OPTIONAL_BENCHES"
SUITE_STEPS=${SUITE_STEPS:-install versions kernel_tests gpu_tests $BENCHES}
for s in $SUITE_STEPS; do
  case " $ALL_STEPS " in *" $s "*) ;; *) echo "gpu_suite: unknown step '$s' in SUITE_STEPS; steps: $ALL_STEPS" >&2; exit 2 ;; esac
done
selected() { case " $SUITE_STEPS " in *" ${1%_cuda} "*) return 0 ;; *) return 1 ;; esac; }  # install_cuda: install's
FILES="suite_steps.tsv"
for b in $BENCHES $OPTIONAL_BENCHES; do selected "$b" && FILES="$FILES $b.json $b.md"; done
selected e2e && FILES="$FILES e2e_prefill_profile.md"  # the e2e step's --profile tables
selected ncu && FILES="$FILES ncu_kernels.csv"  # ncu's own output, behind ncu.json
selected versions && FILES="$FILES switches.env"
for t in kernel_tests gpu_tests; do selected "$t" && FILES="$FILES ${t}_skips.tsv"; done  # each skip and why
BENCH_ARGS=${BENCH_ARGS:-}  # more flags for the kernel benchmarks, e.g. --smoke for a quick dry run
# SDSENGINE_JIT=0: a failed install must not start torch's JIT build in every step (minutes each, and a killed
# build leaves a lock file that makes the next one wait forever)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} SDSENGINE_JIT=0 PIP_DISABLE_PIP_VERSION_CHECK=1
# the tests: no CUDA device is an error, not 1600 skips that end ok (tests/conftest.py)
export SDSENGINE_GPU_SUITE=1
VERSIONS='import os, shlex
from concurrent.futures import ThreadPoolExecutor
import torch
from sdsengine import ops
from sdsengine.bench import gpu_info
def keep(settings):
    switches = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in settings.items())
    open(os.environ["SWITCHES"], "w").write(switches)
    return switches
print(gpu_info())
if torch.cuda.is_available():  # the child checks (each only where the build and GPU have it) two at once: the
    cuda = torch.device("cuda")  # wgmma pipelines in a thread while cuSPARSELt is checked, then kept with the
    with ThreadPoolExecutor(1) as pool:  # pipelines off until theirs ends: a hang must not cost it that
        wgmma = pool.submit(ops._why_not, "wgmma", cuda, torch.float16)
        if ops._why_not("cusparselt", cuda, torch.float16) is None:
            ops.capture_error("cusparselt")  # whether layers set for CUDA graphs may take it
        keep({**ops.checked_switches(), "SDSENGINE_WGMMA": "0"})
        wgmma.result()
info = ops.probe("cuda", self_check=True)
print("2:4 matmul backends:", info["backends"], "cuSPARSELt form:", info.get("cusparselt_form"))
print("child-check results passed on to later steps:\n" + keep(ops.checked_switches()))'
# The backends' child checks (cuSPARSELt's forms and CUDA-graph capture, the wgmma pipelines) run once, in
# `versions`; later steps take their results from these settings instead of checking again in every process
# (seconds each, and a hanging pipeline's trap would cost ~35 s per process). gpu_tests appends what its
# isolated cases turn off.
# Kept with the results, so that a SUITE_STEPS re-run without `versions` reuses them.
export SWITCHES=$RESULTS/switches.env SUITE_SWITCHES=$RESULTS/switches.env
NO_WGMMA="env SDSENGINE_WGMMA=0"  # for the steps that must not meet an unverified pipeline

fit() {  # fit BUDGET: the budget, or what is left of SUITE_SECONDS if less
  local left=$((SUITE_SECONDS - SECONDS))
  echo $(($1 < left ? $1 : left))
}

save() {  # this run's results so far to $OUT, so that a call cut off at its limit still returns them
  [ -n "${OUT:-}" ] || return 0
  (cd "$RESULTS" && tar czf "$OUT/results.tar.gz" $(ls $FILES suite_steps_earlier.tsv 2>/dev/null))
}

keep_earlier_steps() {  # the rows of the steps not selected now, as they last ended (the last table's rows over
  local rows           # those kept before it): a re-run must not erase an earlier step's timeout
  rows=$(cat "$EARLIER" "$STEPS" 2>/dev/null | awk -F'\t' -v selected=" $SUITE_STEPS " '
    NF >= 4 && $1 != "step" { s = $1; sub(/_cuda$/, "", s); if (!index(selected, " " s " ")) row[$1] = $0 }
    END { for (s in row) print row[s] }' | sort)
  { printf 'step\tstatus\trc\tseconds\n'; [ -z "$rows" ] || printf '%s\n' "$rows"; } >"$EARLIER"
}

step() {  # step NAME BUDGET COMMAND...: run it under timeout, record its status, save the results
  local name=$1 budget start=$SECONDS rc status
  selected "$name" || return 0
  budget=$(fit "$2"); shift 2
  echo "=== $name: budget ${budget}s, $((SUITE_SECONDS - SECONDS))s of the suite left ==="
  if [ "$budget" -lt 10 ]; then
    status=skipped rc=-
    echo "$name: skipped, no time left"
  else
    timeout -k 10 "$budget" "$@"
    rc=$?
    case $rc in 0) status=ok ;; 5) status=no-tests ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    # a benchmark that measured nothing (no GPU, no backend passed its check) exits 0 too
    case " $BENCHES $OPTIONAL_BENCHES " in
      *" $name "*) [ "$status" != ok ] || [ -s "$RESULTS/$name.json" ] || status=no-results ;;
    esac
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" $((SECONDS - start)) >>"$STEPS"
  [ -n "${IN_BACKGROUND:-}" ] || save  # one tar at a time: join saves for a background step
}

in_background() {  # in_background STEP ARGS...: `step STEP ARGS...` in the background, its output held until join
  selected "$2" || return 0
  BACKGROUND_LOG=$RESULTS/$2.log
  (IN_BACKGROUND=1 "$@") >"$BACKGROUND_LOG" 2>&1 &
  BACKGROUND_PID=$!
}

join() {  # wait for the background step (before anything timed), then show its output
  [ -n "${BACKGROUND_PID:-}" ] || return 0
  echo "=== waiting for the background step ($((SUITE_SECONDS - SECONDS))s of the suite left) ==="
  wait "$BACKGROUND_PID"
  cat "$BACKGROUND_LOG" && rm -f "$BACKGROUND_LOG"
  BACKGROUND_PID=
  save
}

bench() {  # bench NAME BUDGET ARGS...: a kernel benchmark, told to start no case after 3/4 of its budget
  local name=$1 budget
  budget=$(fit "$2"); shift 2
  step "$name" "$budget" "$PY" "benchmarks/bench_$name.py" --name "$name" --out "$RESULTS" \
    --budget $((budget * 3 / 4)) $BENCH_ARGS "$@"
}

gpu_tests() {  # the GPU tests in two pytest runs: the wgmma kernel's 512 isolated cases first, in child processes
  # (a pipeline that fails one is turned off in $SWITCHES for the rest), then the other ~1150, in-process, under 4
  # xdist workers ($WORKERS: xdist's flags, or none) where one ran them all in order on 12-04 (103 s with the first)
  # -v: a step cut off by its timeout still shows how far it got and what had failed
  local wgmma=test_wgmma_kernel_against_fp32 first rest
  "$PY" -m pytest -v ${WORKERS:+$WORKERS 1} --durations=5 -p no:cacheprovider -m gpu tests/test_ops.py -k "$wgmma"
  first=$?
  [ -s "$SWITCHES" ] && . "$SWITCHES"
  "$PY" -m pytest -v ${WORKERS:+$WORKERS 4} --durations=25 -p no:cacheprovider -m gpu tests --ignore=tests/kernels \
    -k "not $wgmma"
  rest=$?
  return $((rest ? rest : first))
}
export -f gpu_tests

suite() {
  mkdir -p "$RESULTS"
  keep_earlier_steps
  (cd "$RESULTS" && rm -f $FILES)  # a step that does not run must not leave an older run's numbers behind
  printf 'step\tstatus\trc\tseconds\n' >"$STEPS"
  # The package first, without the extension: the Triton kernels' tests need no more and run beside its build.
  # (pip's editable install maps sdsengine to this folder, so the module built in place is the installed one.)
  step install 60 env SDSENGINE_BUILD_CUDA=0 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
  # Under pytest-xdist where it is there (the GPU image has it), so that a test that crashes the process (SIGSEGV in
  # the extension, twice on 12-04) fails alone and a fresh worker runs the rest, instead of the step ending there.
  # The Triton kernels' tests take 8 workers: they are independent and their time is mostly each case's compile on
  # the host (184 tests, 83 s on 12-04), on cores the build leaves (4 sources). The GPU tests: gpu_tests() above.
  # --durations: where each test step's time goes, for the next cut to fit the call
  local workers=""
  "$PY" -c "import xdist" 2>/dev/null && workers="--max-worker-restart 20 -n"
  if [ -d tests/kernels ]; then
    in_background step kernel_tests 150 env SDSENGINE_SKIPS="$RESULTS/kernel_tests_skips.tsv" "$PY" -m pytest -v \
      ${workers:+$workers 8} --durations=15 -p no:cacheprovider tests/kernels
  elif selected kernel_tests; then
    printf 'kernel_tests\tskipped\t-\t0\n' >>"$STEPS"
  fi
  step install_cuda 150 "$PY" setup.py build_ext --inplace
  # what the built extension defines of libstdc++ and links against: on 12-04 gdb placed the crash of a number
  # streamed into an error message inside ostream::_M_insert<long> "from" sdsengine/_C (benchmarks/NOTES.md)
  for so in sdsengine/_C*.so; do
    [ -e "$so" ] || continue
    echo "$so defines $(nm -DC --defined-only "$so" 2>/dev/null | grep -c 'std::') std:: symbols, e.g.:"
    nm -DC --defined-only "$so" 2>/dev/null | grep -E '_M_insert|num_put|locale' | head -n 5
    ldd "$so" | grep -E 'stdc|libc10' || true
  done
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -n 2
  step versions 120 "$PY" -c "$VERSIONS"
  if selected versions && [ ! -s "$SWITCHES" ]; then  # cut off before its last line: take no chances
    echo "versions: no check results; later steps run without cuSPARSELt and the wgmma pipelines"
    printf 'export SDSENGINE_CUSPARSELT=0\nexport SDSENGINE_WGMMA=0\n' >"$SWITCHES"
  fi
  [ -s "$SWITCHES" ] && . "$SWITCHES"
  join  # nothing may run beside a timed step
  step e2e 90 $NO_WGMMA "$PY" benchmarks/bench_e2e.py --layers 8 --prefill 512 --steps 32 --profile --lean \
    --decode-batches 16 --out "$RESULTS"
  step spmm 50 $NO_WGMMA "$PY" benchmarks/bench_spmm.py --tokens 1,16,128,2048 --dtypes float16 --iters 20 \
    --out "$RESULTS"
  bench wanda 40
  bench compress 30
  bench nm_mask 25
  step gpu_tests 170 env SDSENGINE_SKIPS="$RESULTS/gpu_tests_skips.tsv" PY="$PY" WORKERS="$workers" bash -c gpu_tests
  [ -s "$SWITCHES" ] && . "$SWITCHES"
  step dispatch 40 "$PY" benchmarks/bench_dispatch.py --calls 1000 --out "$RESULTS"
  # the baselines first (3.5-5.7 s each on 12-04), that BESA's and SDS's times have theirs beside them; then BESA, the
  # one method not yet timed on a GPU (12-04: the step's limit ended it, after SDS's 67 s); then SDS with its products
  # in TF32 (--matmul tf32, new), SDS in fp32 (67 s on 12-04) last. The limit's SIGTERM leaves a `cut` record
  local methods_budget
  methods_budget=$(fit 130)
  # SDSENGINE_TRACE: each SDS and BESA step's seconds in the log as it ends (the 12-04 lease lost BESA's to the limit)
  step methods "$methods_budget" env SDSENGINE_TRACE=1 "$PY" benchmarks/bench_methods.py --layers 1 --nsamples 64 \
    --methods magnitude,wanda,sparsegpt,besa,sds-tf32,sds --budget $((methods_budget * 3 / 4)) --out "$RESULTS"
  step wgmma_tiles 30 "$PY" benchmarks/sweep_wgmma.py --tokens 512,2048,4096 --iters 10 --pipelines plain,overlap \
    --out "$RESULTS"
  step wgmma_tma 30 "$PY" benchmarks/sweep_wgmma.py --tokens 512,2048,4096 --iters 10 --pipelines tma,tma_multicast \
    --name wgmma_tma --out "$RESULTS"
  step spmm_bf16 30 "$PY" benchmarks/bench_spmm.py --tokens 1,2048 --dtypes bfloat16 --iters 20 --name spmm_bf16 \
    --out "$RESULTS"
  # the decode kernel's second X buffer, an experiment (csrc/spmm24.h): each shape's splits timed for both
  step decode_xbuf 40 "$PY" benchmarks/sweep_decode.py --tokens 1,2,4,8,16,32 --iters 20 --out "$RESULTS"
  bench sparsegpt 90
  # up to 512 tokens: the grouped path serves up to 32 routed rows per expert (nn/grouped.py), a rule set from
  # these (12-04: Mixtral-8x7B's experts lose from 64 rows, 256 tokens); 128 tokens is Mixtral's 32
  step grouped 40 "$PY" benchmarks/bench_grouped.py --tokens 1,4,16,64,128,256,512 --iters 10 --out "$RESULTS"
  # --no-prefill-graph: a packed mixture's prefill past the grouped path's regime (per expert) reads token counts
  # on the host, which no graph capture allows (Qwen3's 512 tokens are within it, timed eager as before); its
  # decode (grouped) and transformers' grouped_mm are both captured
  step e2e_moe 90 $NO_WGMMA "$PY" benchmarks/bench_e2e.py --model qwen3-30b-a3b --layers 4 --prefill 512 --steps 16 \
    --dtype bfloat16 --no-prefill-graph --name e2e_moe --out "$RESULTS"
  step e2e_full 120 $NO_WGMMA "$PY" benchmarks/bench_e2e.py --layers 32 --prefill 512 --steps 32 --name e2e_full --out "$RESULTS"
  step spmm_sweep 300 "$PY" benchmarks/bench_spmm.py --iters 10 --name spmm_sweep --out "$RESULTS"  # all tokens, dtypes
  step e2e_compiled 240 $NO_WGMMA "$PY" benchmarks/bench_e2e.py --layers 8 --prefill 512 --steps 32 --compile \
    --name e2e_compiled --out "$RESULTS"
  step sweep_tiles 180 "$PY" benchmarks/sweep_tiles.py --kernels wanda_0.5,wanda_2:4,compress \
    --shapes 4096x11008,14336x4096 --json "$RESULTS/sweep_tiles.json"
  local ncu=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)}
  step ncu 240 bash -c '"$0" --clock-control none --profile-from-start off --section SpeedOfLight \
    --section LaunchStats --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --csv \
    --page details \
    "$1" benchmarks/ncu_kernels.py >"$2/ncu_kernels.csv" && "$1" benchmarks/ncu_kernels.py --summarize \
    "$2/ncu_kernels.csv" --out "$2"' "${ncu:-ncu}" "$PY" "$RESULTS"
  echo "=== summary ($SECONDS s) ==="
  "$PY" benchmarks/summarize.py --dir "$RESULTS" --steps "$STEPS" | tee ${OUT:+"$OUT/summary.txt"}
  ! cut -f2 "$STEPS" | tail -n +2 | grep -qv '^ok$'
}

if [ -n "${OUT:-}" ]; then
  suite 2>&1 | tee "$OUT/suite.log"
  exit "${PIPESTATUS[0]}"
fi
suite
