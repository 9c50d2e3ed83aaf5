"""Markdown tables of the quality runs in benchmarks/results/quality (written by quality.sh).

    python benchmarks/quality_table.py [RESULTS_DIR]            # every run, one row each
    python benchmarks/quality_table.py --versus [RESULTS_DIR]   # SDS and BESA against their base pruners
    python benchmarks/quality_table.py --glance [RESULTS_DIR]   # one row per method, one column per pattern
    python benchmarks/quality_table.py --readme README.md docs/QUALITY.md   # regenerate every marked table

A record is NAME.json (eval results and commands) beside NAME.prune.json (the run report). --versus pairs
each SDS or BESA run with the base run of its pattern (SDS: its --base; BESA: Wanda, whose masks it starts
from), the record named [PREFIX]BASE_PATTERN, where PREFIX is what every record name of the folder starts
with up to an underscore (r16_ in quality_reduced) and PATTERN the run's own (2-4, 4-8, 50), and lists the
SDS pairs the issue asks for even where they are not measured yet, so that a missing number shows as missing.
--glance gives each method's perplexity and zero-shot mean at every pattern, from the record GLANCE names
for it. Prune seconds are each run report's own (see prune_seconds); peak memory is the run's (peak_rss).

--readme rewrites, in each file named, each table that follows a marker line `<!-- quality_table.py [ARGS] -->`
with this script's output for ARGS (a results folder in ARGS is relative to the file's folder), and nothing
else. A test checks that the marked tables of README.md and docs/QUALITY.md equal that output, so a record
added without this step fails CI.
"""
import json
import os
import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quality"
PATTERNS = ("2-4", "4-8", "50")
SDS_BASES = ("sparsegpt", "wanda")
METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "sds", "besa")
# The record of what an SDS --base runs, where it is not BASE_P: `--base besa` runs BESA at today's defaults,
# which besa-lr-checks_2-4 names in full (besa_2-4 holds BESA's old N:M defaults; besa_4-8 runs today's)
BASE_RECORDS = {("besa", "2-4"): "besa-lr-checks_2-4"}
TARGETS = {  # (method, base, pattern): the perplexity targets the SDS and BESA issues set
    ("sds", "sparsegpt", "2-4"): "≤ 0.85",
    ("sds", "wanda", "2-4"): "≤ 0.75",
    ("besa", "wanda", "2-4"): "< 1",
    ("besa", "wanda", "50"): "< 1, and below sparsegpt_50",
}

# --glance: a method's record at a pattern (P), at today's defaults where one is measured; BESA's 2:4 record
# names today's N:M defaults in full, its 4:8 record runs them, and its 50% record predates the layer guard
# (--guard off); SDS's N:M records name its N:M default --swaps 1 in full
GLANCE = [("dense", "dense"), ("magnitude", "magnitude_P"), ("Wanda", "wanda_P"), ("SparseGPT", "sparsegpt_P"),
          ("BESA", "besa-lr-checks_2-4 besa_4-8 besa_50"),
          ("SDS(Wanda)", "sds-wanda-swaps_2-4 sds-wanda-swaps_4-8 sds-wanda_50"),
          ("SDS(SparseGPT)", "sds-sparsegpt-swaps_2-4 sds-sparsegpt-swaps_4-8 sds-sparsegpt_50"),
          ("SDS(BESA)", "sds-besa-swaps_2-4 sds-besa-swaps_4-8 sds-besa_50")]


def rows(results=RESULTS):
    for path in sorted(results.glob("*.json")):
        if path.name.endswith(".prune.json"):
            continue
        run = json.loads(path.read_text())
        prune = results / f"{path.stem}.prune.json"
        report = json.loads(prune.read_text()) if prune.exists() else None
        yield path.stem, run, report


def perplexity(run):
    wiki = run["results"].get("wikitext2")
    return wiki["ppl"] if wiki else None


def zeroshot(run):
    """{task: result} of the multiple-choice tasks in a record."""
    return {k: v for k, v in run["results"].items() if "acc" in v}


def zeroshot_mean(run):
    tasks = zeroshot(run)
    return 100 * sum(v["acc"] for v in tasks.values()) / len(tasks) if tasks else None


def peak_rss(report):
    """The run's peak RSS: for a resumed run, the peak of every part, which the layers that earlier
    processes pruned hold in their own reports (the run's own figure covers only its last process)."""
    if not report:
        return None
    layers = [layer.get("memory", {}).get("cpu_peak_rss_gib") for layer in report.get("layers", [])]
    return max([report["memory"]["cpu_peak_rss_gib"], *filter(None, layers)])


def prune_seconds(run, report):
    """The pruning time the run measured (its report's seconds: calibration capture and every layer, over
    all resumed parts; no model load, tokenization or save); a record without a report: its prune_wall_s
    (quality.sh copies the report's seconds there; records older than the report took the wall time)."""
    if report:
        return round(report["seconds"])
    return run.get("prune_wall_s") if run and run.get("prune_command") else None


def line(name, run, report):
    tasks = zeroshot(run)
    scores = [f"{k} {100 * v['acc']:.1f}/{100 * v['acc_norm']:.1f}" for k, v in tasks.items()]
    sparsity = f"{report['overall_sparsity']:.3f}" if report else "-" if run.get("prune_command") else "0"
    command = run.get("prune_command") or run["eval_command"]
    return (f"| {name} | {sparsity} | {_num(perplexity(run), '.2f')} | {' '.join(scores) or '-'} "
            f"| {_num(zeroshot_mean(run), '.1f')} | {_num(prune_seconds(run, report))} | {_num(peak_rss(report))} "
            f"| `{command}` |")


def pair_of(report):
    """(method, base, pattern) of an SDS or BESA run (BESA's base: Wanda, whose mask it starts from), None
    for any other."""
    recipe = report["recipe"] if report else {}
    method, pattern = recipe.get("method"), _pattern(recipe.get("sparsity"))
    if method == "sds":
        return method, recipe["base"], pattern
    if method == "besa":
        return method, "wanda", pattern
    return None


def _pattern(sparsity):
    """A recipe's sparsity as record names spell it: "2:4" -> 2-4, 0.5 -> 50."""
    if sparsity is None:
        return None
    return str(sparsity).replace(":", "-") if ":" in str(sparsity) else f"{100 * float(sparsity):g}"


def versus_lines(results=RESULTS):
    """One row per SDS/BESA run against its base; the issue's SDS pairs included when not yet measured."""
    runs = {name: (run, report) for name, run, report in rows(results)}
    prefix = _common_prefix(runs)
    pairs = {name: pair_of(report) for name, (_, report) in runs.items()}
    pairs = {name: pair for name, pair in pairs.items() if pair}
    for pattern in PATTERNS:
        for base in SDS_BASES:
            pairs.setdefault(f"{prefix}sds-{base}_{pattern}", ("sds", base, pattern))
    order = sorted(pairs, key=lambda n: (_rank(pairs[n][2]), n))
    return [_versus_line(name, pairs[name], runs, prefix) for name in order]


def _common_prefix(names):
    """What every name starts with, up to and including its last underscore (r16_ in quality_reduced); none
    where that holds a method's name (a folder of one method's runs)."""
    common = os.path.commonprefix(list(names))
    prefix = common[:common.rfind("_") + 1]
    return "" if any(method in prefix for method in METHODS) else prefix


def _rank(pattern):
    return PATTERNS.index(pattern) if pattern in PATTERNS else len(PATTERNS)


def _versus_line(name, pair, runs, prefix=""):
    """The row of run `name` against its base's record: [prefix]BASE_PATTERN, or [prefix] and BASE_RECORDS'
    name for (BASE, PATTERN) where it has one."""
    base, target = prefix + BASE_RECORDS.get(pair[1:], f"{pair[1]}_{pair[2]}"), TARGETS.get(pair, "")
    if name not in runs:
        return f"| {name} | {base} | not measured | | | {target} | | | |"
    run, report = runs[name]
    base_run, base_report = runs.get(base, (None, None))
    ppl, base_ppl = perplexity(run), base_run and perplexity(base_run)
    ratio = f"{ppl / base_ppl:.3f}" if ppl and base_ppl else "-"
    zs, base_zs = zeroshot_mean(run), base_run and zeroshot_mean(base_run)
    seconds = prune_seconds(run, report), prune_seconds(base_run, base_report)
    return (f"| {name} | {base} | {_num(ppl, '.2f')} | {_num(base_ppl, '.2f')} | {ratio} | {target} "
            f"| {_pair(zs, base_zs, '.1f')} | {_pair(*seconds)} | {_pair(peak_rss(report), peak_rss(base_report))} |")


def glance_lines(results=RESULTS):
    """One row per GLANCE method: WikiText-2 perplexity (zero-shot mean %) per pattern; '-' where not measured."""
    runs = {name: run for name, run, _ in rows(results)}
    lines = []
    for method, names in GLANCE:
        cells = []
        for pattern in PATTERNS:
            run = runs.get(_glance_record(names, pattern))
            zs = run and zeroshot_mean(run)
            cells.append("-" if run is None else _num(perplexity(run), ".2f") + ("" if zs is None else f" ({zs:.1f})"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _glance_record(names, pattern):
    """The record among GLANCE's `names` (P: the pattern) for `pattern`, or the one without a pattern (dense)."""
    for name in names.replace("P", pattern).split():
        if name.endswith(f"_{pattern}") or "_" not in name:
            return name
    return None


def _num(value, fmt=""):
    return "-" if value is None else format(value, fmt)


def _pair(value, base, fmt=""):
    return f"{_num(value, fmt)} / {_num(base, fmt)}"


def render(argv, root=None):
    """The table for quality_table.py's ARGS (--versus or --glance, and/or a results folder, relative to root
    or here)."""
    versus = "--versus" in argv
    paths = [a for a in argv if a not in ("--versus", "--glance")]
    results = Path(root or Path.cwd()) / paths[0] if paths else RESULTS
    if not results.is_dir():
        raise SystemExit(f"quality_table.py: no results folder {results}")
    if "--glance" in argv:
        header = ["| method | 2:4 | 4:8 | 50% |", "|---|---|---|---|"]
        return "\n".join(header + glance_lines(results))
    if versus:
        header = ["| run | base | ppl | base ppl | × base | target | zero-shot mean % (base) | prune s (base) "
                  "| peak RSS GiB (base) |", "|---|---|---|---|---|---|---|---|---|"]
        return "\n".join(header + versus_lines(results))
    header = ["| run | counted sparsity | WikiText-2 ppl | zero-shot acc/acc_norm % | zero-shot mean acc % "
              "| prune s | peak RSS GiB | command |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(header + [line(*row) for row in rows(results)])


MARKER = re.compile(r"<!-- quality_table\.py(?P<args>[^>]*)-->")


def marked_blocks(lines):
    """(marker's line index, end of the table right below it, marker's ARGS) for each marker line."""
    for i, text in enumerate(lines):
        match = MARKER.fullmatch(text.strip())
        if match:
            end = i + 1
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            yield i, end, shlex.split(match["args"])


def rewrite_readme(path):
    """Replace each marked table of a Markdown file with its regenerated one; returns how many changed."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"quality_table.py: no file {path}")
    lines = path.read_text().split("\n")
    blocks = list(marked_blocks(lines))
    if not blocks:
        raise SystemExit(f"quality_table.py: {path} has no '<!-- quality_table.py [ARGS] -->' marker line")
    tables = [render(args, path.parent).split("\n") for _, _, args in blocks]  # all rendered before writing
    changed = 0
    for (i, end, _), table in reversed(list(zip(blocks, tables))):  # from the end: earlier indices stay valid
        changed += lines[i + 1:end] != table
        lines[i + 1:end] = table
    path.write_text("\n".join(lines))
    return changed


def main(argv=sys.argv[1:]):
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "--readme":
        if len(argv) < 2:
            raise SystemExit("usage: quality_table.py --readme FILE.md [FILE.md ...]")
        for path in argv[1:]:
            print(f"{path}: {rewrite_readme(path)} table(s) regenerated")
        return 0
    print(render(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
