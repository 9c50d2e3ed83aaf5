"""Runs a list of evaluation tasks, perplexity and zero-shot, and formats their results."""
import contextlib

from sdsengine.config import check_device
from sdsengine.data import EVAL_TASKS, check_eval_source, eval_tokens
from sdsengine.pipeline.adapters import check_ids, check_seqlen, eval_mode

from .checks import eval_device
from .perplexity import check_windows, perplexity
from .perplexity import streamed_groups as perplexity_groups
from .streamed import one_pass
from .tasks import TASKS, check_task_name, load_task
from .zeroshot import BATCH_SIZE, check_pair_ids, encode_task, evaluate_zeroshot
from .zeroshot import streamed_groups as zeroshot_groups

TASK_HELP = (f"comma-separated: perplexity tasks {', '.join(EVAL_TASKS)}; zero-shot tasks {', '.join(TASKS)}, "
             "or a .jsonl file of {context, choices, label}")


def evaluate(model, tokenizer, tasks, seqlen=2048, limit=None, data_dir=None, device=None, progress=True,
             samples=None, items=None, weights=None, batch_size=BATCH_SIZE) -> dict:
    """{task: result}: perplexity tasks give ppl, nll, tokens, windows, seqlen, protocol; zero-shot ones acc,
    acc_norm, n. `tasks`: a list of names, or one comma-separated string as --tasks takes. `limit` caps
    windows (perplexity) or items (zero-shot). `samples`: a dict that receives, per zero-shot task, its
    per-item records (zeroshot.item_records). `items`: zero-shot items already read by
    load_zeroshot(tasks, data_dir, limit) (the CLI reads them before loading the model). The model runs in
    eval mode and is left in the mode it came in. weights: a streaming.WeightStream that lends a skeleton `model` its
    weights a layer at a time (on `device`, by default the CPU: eval/streamed.py). batch_size: zero-shot inputs per
    forward (a streamed model runs each alone)."""
    # Check and load every task's input first: a bad name, file, length or device fails before any model time.
    tasks = task_list(tasks)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size (--batch-size) must be a positive number of inputs, got {batch_size!r}")
    if device is not None:
        check_device(device)
    device = eval_device(model, device, weights)  # the model's, unless another is asked (refused: move the model)
    check_perplexity(tasks, seqlen, limit, data_dir)
    if any(t in EVAL_TASKS for t in tasks):
        check_seqlen(model, seqlen)
    items = load_zeroshot(tasks, data_dir, limit) if items is None else items
    streams = {t: eval_tokens(tokenizer, t, data_dir, seqlen) for t in tasks if t in EVAL_TASKS}
    for task, (ids, _) in streams.items():
        check_ids(model, ids, f"{task}: the tokenizer's ids (is it the model's tokenizer?)")
    # a choice that cannot be scored (longer than the window, ids past the vocabulary) is named before any task runs
    pairs = {task: encode_task(model, tokenizer, items[task], desc=task) for task in tasks if task in items}
    for task, task_pairs in pairs.items():
        check_pair_ids(model, task_pairs, task)

    def run(task):
        if task in items:
            records = samples.setdefault(task, []) if samples is not None else None
            return evaluate_zeroshot(model, tokenizer, items[task], batch_size, device, desc=task, progress=progress,
                                     samples=records, weights=weights, pairs=pairs[task])
        ids, protocol = streams[task]
        return {**perplexity(model, ids, seqlen, device, limit, progress, weights), "protocol": protocol}

    with eval_mode(model), _shared_pass(model, tokenizer, tasks, pairs, streams, seqlen, limit, weights, device,
                                        progress):
        return {task: run(task) for task in tasks}


def _shared_pass(model, tokenizer, tasks, pairs, streams, seqlen, limit, weights, device, progress):
    """A streamed model's tasks, several of them, in one pass over its layers (streamed.one_pass): the model's weights
    are read once rather than once per task. pairs: each zero-shot task's encode_task."""
    if weights is None or len(tasks) < 2:
        return contextlib.nullcontext()
    groups = [g for task in tasks for g in (
        zeroshot_groups(model, tokenizer, pairs[task]) if task in pairs else
        perplexity_groups(streams[task][0], seqlen, limit))]
    return one_pass(model, groups, weights, device, progress)


def evaluate_checkpoint(model, tasks, seqlen=2048, limit=None, data_dir=None, device="cpu", dtype=None,
                        progress=True, samples=None, items=None) -> dict:
    """evaluate(load_model(model, dtype), tasks, ...) read from the files of `model` (a safetensors checkpoint
    directory or a hub id) a decoder layer at a time, once for all the tasks (once per task where their windows' hidden
    states do not fit together: streamed.one_pass): the host holds one layer's weights (the embeddings and head for
    their turns) beside the hidden states of the tasks' windows (a zero-shot task's: of its distinct inputs), so a
    model larger than its memory is evaluated. The result is the loaded model's: perplexity to
    the last bit; zero-shot, each input run alone, as the loaded model's at batch size 1 (eval/streamed.py)."""
    from sdsengine.models import load_model, weights_directory
    from sdsengine.nn.convert import is_compressed_checkpoint
    from sdsengine.pipeline import streaming
    if is_compressed_checkpoint(model):
        raise ValueError(f"{model} is a compressed checkpoint (written by sdsengine convert): streaming reads the "
                         "dense safetensors checkpoint it was converted from; evaluate this one loaded (drop "
                         "--stream-weights)")
    tasks = task_list(tasks)
    check_perplexity(tasks, seqlen, limit, data_dir)  # before the model's config is read
    items = load_zeroshot(tasks, data_dir, limit) if items is None else items
    skeleton, tokenizer, source = load_model(model, dtype, skeleton=True)
    weights = streaming.WeightStream(skeleton, streaming.checkpoint_files(weights_directory(source)), every=True)
    return evaluate(skeleton, tokenizer, tasks, seqlen, limit, data_dir, device, progress, samples, items, weights)


def task_list(tasks) -> list:
    """The tasks as a list without repeats (a task named twice runs once), from a list or a comma-separated
    string (a string iterated would be read as one-letter task names)."""
    if isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",") if t.strip()]
    elif isinstance(tasks, (list, tuple)):
        names = list(tasks)
    else:
        raise TypeError(f"tasks must be a list of task names or a comma-separated string, got {type(tasks).__name__}")
    if not names:
        raise ValueError(f"--tasks (tasks= in Python) names no task: {tasks!r}")
    for name in names:  # every name before any task's data is looked for (the hub's, say)
        if name not in EVAL_TASKS:
            check_task_name(name)
    return list(dict.fromkeys(names))


def check_perplexity(tasks, seqlen, limit=None, data_dir=None):
    """The perplexity tasks' window, limit and offline files, before the model is loaded (a 7B takes minutes)
    and before any task runs."""
    for task in tasks:
        if task in EVAL_TASKS:
            check_windows(seqlen, limit)
            check_eval_source(task, data_dir)


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
    if "ppl" in result:  # None: the mean nll overflows exp
        return f"{result['ppl']:.2f}" if result["ppl"] is not None else f"overflow (nll {result['nll']:.1f})"
    return f"{100 * result['acc']:.1f} / {100 * result['acc_norm']:.1f}"
