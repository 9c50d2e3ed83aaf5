"""Zero-shot multiple-choice tasks as lists of `Item`s, read from the offline data directory.

Prompts follow lm-evaluation-harness (v0.4 task YAMLs), so accuracies are comparable with published
numbers. Each choice is the continuation scored after the context, with lm-eval's target delimiter " "
already prepended by the adapter.

Generic format, for any path ending in .jsonl: one JSON object per line (blank lines are skipped),

    {"context": "Question: What is 2+2?\\nAnswer:", "choices": [" 4", " 5"], "label": 0}

`choices` are appended to `context` exactly as given; nothing is added, so write the leading space
yourself, as the built-in adapters do. acc_norm divides by a choice's length in characters leaving out
one leading space (lm-eval divides by the choice without its delimiter), so a task exported from an
adapter to this format scores the same.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from sdsengine.data import EVAL_TASKS, data_file, jsonl_objects, resolve_data_dir

PIQA_FILE = "piqa/valid.jsonl"
PIQA_LABELS = "piqa/valid-labels.lst"
ARC_EASY_FILE = "arc/ARC-Easy-test.json"
BOOLQ_FILE = "boolq/dev.jsonl"


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    label: int


def load_task(name_or_path, data_dir=None, limit=None) -> list[Item]:
    """Items of a built-in task (see TASKS) or of a generic .jsonl file; `limit` keeps the first N."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    name = str(name_or_path)
    if name.endswith(".jsonl"):
        items = read_jsonl(Path(name).expanduser())
    elif name in TASKS:
        items = TASKS[name](resolve_data_dir(data_dir, required=True))
    else:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (zero-shot), "
                         f"{', '.join(EVAL_TASKS)} (perplexity), or a path ending in .jsonl (generic format, see "
                         "sdsengine/eval/tasks.py)")
    return items[:limit]


# ---- built-in tasks ------------------------------------------------------------------------------------

def piqa(data_dir: Path) -> list[Item]:
    docs = [doc for _, doc in jsonl_objects(data_file(data_dir, PIQA_FILE))]
    labels = data_file(data_dir, PIQA_LABELS).read_text(encoding="utf-8").split()
    if len(labels) != len(docs):
        raise ValueError(f"{data_dir / PIQA_LABELS} has {len(labels)} labels for {len(docs)} PIQA questions")
    return [Item(f"Question: {doc['goal']}\nAnswer:", (" " + doc["sol1"], " " + doc["sol2"]), int(label))
            for doc, label in zip(docs, labels)]


def arc_easy(data_dir: Path) -> list[Item]:
    docs = json.loads(data_file(data_dir, ARC_EASY_FILE).read_text(encoding="utf-8"))
    return [_arc_item(doc) for doc in docs]


def _arc_item(doc: dict) -> Item:
    # Labels are letters for most questions and digits for some; the answer is found by position.
    labels = doc["choices"]["label"]
    if doc["answerKey"] not in labels:
        raise ValueError(f"ARC question {doc['id']}: answerKey {doc['answerKey']!r} is not among {labels}")
    choices = tuple(" " + text for text in doc["choices"]["text"])
    return Item(f"Question: {doc['question']}\nAnswer:", choices, labels.index(doc["answerKey"]))


def boolq(data_dir: Path) -> list[Item]:
    # lm-eval reads SuperGLUE's BoolQ, whose passages open with "<article title> -- "; the original
    # Google release holds the title in its own field, so the SuperGLUE passage is rebuilt here.
    return [Item(f"{doc['title']} -- {doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
                 (" no", " yes"), int(doc["answer"]))
            for _, doc in jsonl_objects(data_file(data_dir, BOOLQ_FILE))]


TASKS = {"piqa": piqa, "arc_easy": arc_easy, "boolq": boolq}


# ---- generic JSONL ---------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[Item]:
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    items = [generic_item(obj, f"{path}:{number}") for number, obj in jsonl_objects(path)]
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def generic_item(obj, where: str) -> Item:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with context, choices, label; got {type(obj).__name__}")
    missing = [key for key in ("context", "choices", "label") if key not in obj]
    if missing:
        raise ValueError(f"{where}: missing key {', '.join(missing)} (each line needs context, choices, label)")
    context, choices, label = obj["context"], obj["choices"], obj["label"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: context must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least two non-empty strings, got {choices!r}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: label must be an integer index into choices, got {label!r}")
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: label {label} out of range for {len(choices)} choices (0..{len(choices) - 1})")
    return Item(context, tuple(choices), label)
