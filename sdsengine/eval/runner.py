"""Runs a list of evaluation tasks and formats their results."""
from sdsengine.data import EVAL_TASKS, eval_tokens

from .perplexity import perplexity

TASK_HELP = f"comma-separated: perplexity tasks {', '.join(EVAL_TASKS)}"


def evaluate(model, tokenizer, tasks, seqlen=2048, limit=None, data_dir=None, device="cpu", progress=True) -> dict:
    """{task: result}; perplexity results hold ppl, tokens, windows, seqlen and the protocol."""
    for task in tasks:  # fail on a bad name before spending time on the good ones
        if task not in EVAL_TASKS:
            raise ValueError(f"unknown evaluation task {task!r}; {TASK_HELP}")
    results = {}
    for task in tasks:
        ids, protocol = eval_tokens(tokenizer, task, data_dir, seqlen)
        results[task] = {**perplexity(model, ids, seqlen, device, limit, progress), "protocol": protocol}
    return results


def results_table(rows: dict) -> str:
    """rows: {label: {task: result}} -> a Markdown table."""
    tasks = sorted({t for r in rows.values() for t in r})
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for label, results in rows.items():
        cells = [_cell(results.get(t)) for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(result):
    if result is None:
        return ""
    if "ppl" in result:
        return f"{result['ppl']:.2f}"
    return f"{100 * result['acc']:.1f} / {100 * result['acc_norm']:.1f}"
