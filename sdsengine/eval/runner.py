"""Runs a list of evaluation tasks, perplexity and zero-shot, and formats their results."""
from sdsengine.config import check_device
from sdsengine.data import EVAL_TASKS, eval_tokens
from sdsengine.pipeline.adapters import check_seqlen

from .checks import model_device
from .perplexity import perplexity
from .tasks import TASKS, load_task
from .zeroshot import evaluate_zeroshot

TASK_HELP = (f"comma-separated: perplexity tasks {', '.join(EVAL_TASKS)}; zero-shot tasks {', '.join(TASKS)}, "
             "or a .jsonl file of {context, choices, label}")


def evaluate(model, tokenizer, tasks, seqlen=2048, limit=None, data_dir=None, device=None, progress=True,
             samples=None, items=None) -> dict:
    """{task: result}: perplexity tasks give ppl, tokens, windows, seqlen, protocol; zero-shot ones acc,
    acc_norm, n. `limit` caps windows (perplexity) or items (zero-shot). `samples`: a dict that receives,
    per zero-shot task, its per-item records (zeroshot.item_records). `items`: zero-shot items already
    read by load_zeroshot(tasks, data_dir, limit) (the CLI reads them before loading the model)."""
    # Check and load every task's input first: a bad name, file, length or device fails before any model time.
    if device is not None:
        check_device(device)
    device = model_device(model, device)  # the model's, unless another is asked (refused: move the model)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of windows or items, got {limit}")
    if any(t in EVAL_TASKS for t in tasks):
        if seqlen < 2:
            raise ValueError(f"perplexity needs windows of at least 2 tokens (seqlen), got {seqlen}")
        check_seqlen(model, seqlen)
    tasks = list(dict.fromkeys(tasks))  # a task named twice runs once
    items = load_zeroshot(tasks, data_dir, limit) if items is None else items
    streams = {t: eval_tokens(tokenizer, t, data_dir, seqlen) for t in tasks if t in EVAL_TASKS}
    results = {}
    for task in tasks:
        if task in items:
            records = samples.setdefault(task, []) if samples is not None else None
            results[task] = evaluate_zeroshot(model, tokenizer, items[task], device=device, desc=task,
                                              progress=progress, samples=records)
        else:
            ids, protocol = streams[task]
            results[task] = {**perplexity(model, ids, seqlen, device, limit, progress), "protocol": protocol}
    return results


def load_zeroshot(tasks, data_dir=None, limit=None) -> dict:
    """{task: its items} for the zero-shot tasks among `tasks`; an unknown name or a missing file fails here."""
    return {t: load_task(t, data_dir, limit) for t in dict.fromkeys(tasks) if t not in EVAL_TASKS}


def results_table(rows: dict) -> str:
    """rows: {label: {task: result}} -> a Markdown table (ppl, or acc / acc_norm in %)."""
    tasks = list(dict.fromkeys(t for r in rows.values() for t in r))
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
