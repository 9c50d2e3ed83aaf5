"""Compare models' zero-shot answers item by item, from `sdsengine eval --samples` files.

    python benchmarks/zeroshot_answers.py REF.jsonl OTHER.jsonl [...] [--json OUT]

Per task and file: the items, acc, how often each answer was given (by choice text, for tasks whose items
all offer the same choices, such as BoolQ's " no" / " yes"), and the share of items answered as REF
answered them. Accuracy alone cannot tell a model that moved toward REF's answers from one that moved
away from them. Standard library only.
"""
import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def read_samples(path) -> dict:
    """{task: [record, ...]} from one --samples file, in item order."""
    tasks = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            tasks[record["task"]].append(record)
    return dict(tasks)


def compare(reference: dict, other: dict) -> dict:
    """{task: summary} over the tasks both files hold; items are matched by index and must agree on labels."""
    summaries = {}
    for task in reference.keys() & other.keys():
        ref, mine = _by_index(reference[task]), _by_index(other[task])
        common = sorted(ref.keys() & mine.keys())
        if any(ref[i]["label"] != mine[i]["label"] for i in common):
            raise ValueError(f"{task}: the files disagree on labels; were they made from the same items?")
        records = [mine[i] for i in common]
        summaries[task] = {
            "n": len(records),
            "acc": sum(r["pred"] == r["label"] for r in records) / max(len(records), 1),
            "answers": _answer_shares(records),
            "agreement": sum(mine[i]["pred"] == ref[i]["pred"] for i in common) / max(len(common), 1),
        }
    return summaries


def _by_index(records):
    return {r["index"]: r for r in records}


def _answer_shares(records):
    """{choice text: share of items answered with it}, or {} where the items' choices differ."""
    if not records or any(r["choices"] != records[0]["choices"] for r in records):
        return {}
    counts = Counter(records[0]["choices"][r["pred"]] for r in records)
    return {choice: counts[choice] / len(records) for choice in records[0]["choices"]}


def table(rows: dict) -> str:
    """rows: {file: {task: summary}} -> Markdown."""
    lines = ["| file | task | n | acc % | answers (share %) | same answer as the first file % |",
             "|---|---|---|---|---|---|"]
    for name, tasks in rows.items():
        for task, s in sorted(tasks.items()):
            answers = ", ".join(f"{c.strip() or repr(c)} {100 * v:.1f}" for c, v in s["answers"].items())
            lines.append(f"| {name} | {task} | {s['n']} | {100 * s['acc']:.1f} | {answers} | "
                         f"{100 * s['agreement']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="--samples files; the first is the reference")
    parser.add_argument("--json", default=None, help="also write the summaries as JSON here")
    args = parser.parse_args(argv)
    samples = {f: read_samples(f) for f in args.files}
    reference = samples[args.files[0]]
    rows = {f: compare(reference, s) for f, s in samples.items()}
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
