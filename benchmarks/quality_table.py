"""Markdown table of the quality runs in benchmarks/results/quality (written by quality.sh).

    python benchmarks/quality_table.py [RESULTS_DIR]
"""
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quality"


def rows(results=RESULTS):
    for path in sorted(results.glob("*.json")):
        if path.name.endswith(".prune.json"):
            continue
        run = json.loads(path.read_text())
        prune = results / f"{path.stem}.prune.json"
        report = json.loads(prune.read_text()) if prune.exists() else None
        yield path.stem, run, report


def line(name, run, report):
    wiki = run["results"].get("wikitext2", {})
    tasks = {k: v for k, v in run["results"].items() if "acc" in v}
    zeroshot = [f"{k} {100 * v['acc']:.1f}/{100 * v['acc_norm']:.1f}" for k, v in tasks.items()]
    average = f"{100 * sum(v['acc'] for v in tasks.values()) / len(tasks):.1f}" if tasks else "-"
    prune_s = f"{run['prune_wall_s']}" if run.get("prune_command") else "-"
    mem = report["memory"]["cpu_peak_rss_gib"] if report else "-"
    sparsity = f"{report['overall_sparsity']:.3f}" if report else "0"
    command = run.get("prune_command") or run["eval_command"]
    ppl = f"{wiki['ppl']:.2f}" if wiki else "-"
    return f"| {name} | {sparsity} | {ppl} | {' '.join(zeroshot) or '-'} | {average} | {prune_s} | {mem} | `{command}` |"


def main(argv=sys.argv[1:]):
    results = Path(argv[0]) if argv else RESULTS
    print("| run | counted sparsity | WikiText-2 ppl | zero-shot acc/acc_norm % | zero-shot mean acc % "
          "| prune wall s | peak RSS GiB | command |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run, report in rows(results):
        print(line(name, run, report))


if __name__ == "__main__":
    sys.exit(main())
