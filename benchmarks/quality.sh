#!/usr/bin/env bash
# Quality runs behind the README's tables, by the published protocol: the embedded SmolLM2-135M,
# calibration 128 x 2048 C4 windows (seed 0), WikiText-2 test perplexity at seqlen 2048 (whole set).
#
#   bash benchmarks/quality.sh NAME [prune flags...]
#   bash benchmarks/quality.sh dense                                   # no pruning
#   bash benchmarks/quality.sh sparsegpt_2-4 --method sparsegpt --sparsity 2:4
#
# Writes benchmarks/results/quality/NAME.json (eval results + the exact commands, wall times) and
# NAME.prune.json (the run report: recipe, per-layer sparsity and error, time, peak memory).
# Then zero-shot accuracy on ZS_TASKS (default piqa,arc_easy,boolq; empty: skip) over the first ZS_LIMIT
# items of each (default 500: the whole sets cost ~30 min per model on 2 cores), added to the record
# (which is written first, so a failed or stopped zero-shot run loses no perplexity).
# TASKS (default wikitext2), CALIB ("--calib c4 --nsamples 128 --seqlen 2048 --seed 0"), EVAL_LIMIT
# (WikiText-2 windows; default all) and QUALITY_OUT (default benchmarks/results/quality) can be overridden:
# a reduced protocol must go to its own QUALITY_OUT, never beside the full-protocol results. MODEL (a hub
# id, HF directory or .gguf file; default the embedded SmolLM2-135M) is pruned, or evaluated for a dense
# NAME, instead: another model's records go to their own QUALITY_OUT too.
#
#   ZS_ONLY=1 bash benchmarks/quality.sh NAME    # zero-shot only, added to an existing NAME.json record:
#                                                # the model is runs/NAME (none for a NAME ending in dense)
# A stopped prune resumes: the same command goes on after the last finished layer (--resume-dir).
#   EVAL_ONLY=1 bash benchmarks/quality.sh NAME [prune flags...]
#       # a run stopped after its prune: evaluate the saved runs/NAME without pruning again; the record
#       # names the prune command those flags give and the prune time from the run's own report
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
tasks=${TASKS:-wikitext2}
read -ra calib <<<"${CALIB:---calib c4 --nsamples 128 --seqlen 2048 --seed 0}"
zs_tasks=${ZS_TASKS-piqa,arc_easy,boolq}; zs_limit=${ZS_LIMIT:-500}
out=${QUALITY_OUT:-benchmarks/results/quality}; runs=${SDSENGINE_RUNS:-runs}
mkdir -p "$out" "$runs"

# Each command is an argument list, run as given (no word splitting or globbing of a path with spaces or an
# --ignore pattern) and recorded as a shell would take it back
shell_words() { python -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@"; }

add_zeroshot() {  # zero-shot on the model in "$@", merged into $out/$name.json
  local zs=(sdsengine eval "$@" --tasks "$zs_tasks" --limit "$zs_limit" --json "$out/$name.zs.json")
  rm -f "$out/$name.zs.json"  # a stopped run's leftover: eval refuses to replace a file
  "${zs[@]}"
  python - "$out/$name" "$(shell_words "${zs[@]}")" <<'PY'
import json, os, sys
base, zs_cmd = sys.argv[1:]
record = json.load(open(base + ".json"))
record["results"].update(json.load(open(base + ".zs.json"))["results"])
record["zeroshot_command"] = zs_cmd
json.dump(record, open(base + ".json", "w"), indent=2)
os.remove(base + ".zs.json")
PY
}

base_model=(${MODEL:+--model "$MODEL"})  # the model a prune starts from, and a dense NAME's
model_args=(${base_model[@]+"${base_model[@]}"})
if [ -n "${ZS_ONLY:-}" ]; then
  [ -f "$out/$name.json" ] || { echo "quality.sh: no record $out/$name.json to add zero-shot results to" >&2; exit 2; }
  if [[ $name != *dense ]]; then
    [ -d "$runs/$name" ] || { echo "quality.sh: no saved model $runs/$name" >&2; exit 2; }
    model_args=(--model "$runs/$name")
  fi
  add_zeroshot ${model_args[@]+"${model_args[@]}"}
  exit 0
fi
prune_cmd=""
prune_s=0
report=""
if [ $# -gt 0 ]; then
  prune=(sdsengine prune ${base_model[@]+"${base_model[@]}"} "$@" "${calib[@]}" --out "$runs/$name" --overwrite)
  prune_cmd=$(shell_words "${prune[@]}")
  if [ -z "${EVAL_ONLY:-}" ]; then
    "${prune[@]}" --resume-dir "$runs/$name.progress"  # results do not depend on it: not in the record
  fi
  [ -f "$runs/$name/sdsengine.json" ] || { echo "quality.sh: no saved model $runs/$name to evaluate" >&2; exit 2; }
  # the pruning time the run measured, over all its resumed parts
  report="$runs/$name/sdsengine.json"
  prune_s=$(python -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["seconds"]))' "$report")
  model_args=(--model "$runs/$name")
fi
evaluate=(sdsengine eval ${model_args[@]+"${model_args[@]}"} --tasks "$tasks" --seqlen 2048 \
  ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} --json "$out/$name.eval.json")
eval_cmd=$(shell_words "${evaluate[@]}")
start=$(date +%s)
rm -f "$out/$name.eval.json"
"${evaluate[@]}"
eval_s=$(( $(date +%s) - start ))
# The record and its run report are replaced together, only once the evaluation is done: a failed or
# stopped evaluation leaves the earlier pair as it was, never an old record beside a new report.
python - "$out/$name" "$prune_cmd" "$eval_cmd" "$prune_s" "$eval_s" "$report" <<'PY'
import json, os, shutil, sys
base, prune_cmd, eval_cmd, prune_s, eval_s, report = sys.argv[1:]
record = json.load(open(base + ".eval.json"))
record.update(prune_command=prune_cmd or None, eval_command=eval_cmd,
              prune_wall_s=int(prune_s), eval_wall_s=int(eval_s), zeroshot_command=None)
json.dump(record, open(base + ".json", "w"), indent=2)
if report:
    shutil.copyfile(report, base + ".prune.json")
elif os.path.exists(base + ".prune.json"):  # a run without pruning now holds this name
    os.remove(base + ".prune.json")
os.remove(base + ".eval.json")
PY
if [ -n "$zs_tasks" ]; then
  add_zeroshot ${model_args[@]+"${model_args[@]}"}
fi
