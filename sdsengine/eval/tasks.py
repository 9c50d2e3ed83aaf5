"""Zero-shot multiple-choice tasks as lists of `Item`s, from the offline data directory or the hub.

Prompts, datasets and splits follow lm-evaluation-harness (v0.4 task YAMLs), so accuracies are comparable
with published numbers. Each choice is the continuation scored after the context, with lm-eval's target
delimiter " " already prepended by the adapter. Where rows come from: with a data directory (argument or
SDSENGINE_DATA_DIR), piqa, arc_easy and boolq read the original release files it ships (see
../shared/data/SOURCES.md), and every other task reads `<data dir>/<task>/<split>.jsonl`, rows in the hub
dataset's own schema (what `datasets.load_dataset(...).to_json(path)` writes); without one, the hub dataset
lm-eval reads, through `datasets`.

Generic format, for any path ending in .jsonl: one JSON object per line (blank lines are skipped),

    {"context": "Question: What is 2+2?\\nAnswer:", "choices": [" 4", " 5"], "label": 0}

`choices` are appended to `context` exactly as given; nothing is added, so write the leading space
yourself, as the built-in adapters do. acc_norm divides by a choice's length in characters leaving out
one leading space (lm-eval divides by the choice without its delimiter), so a task exported from an
adapter to this format scores the same.
"""
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdsengine.data import EVAL_TASKS, data_file, hub_dataset, jsonl_objects, resolve_data_dir, utf8_text

PIQA_FILE = "piqa/valid.jsonl"
PIQA_LABELS = "piqa/valid-labels.lst"
ARC_EASY_FILE = "arc/ARC-Easy-test.json"
BOOLQ_FILE = "boolq/dev.jsonl"


class ItemError(ValueError):
    """An Item that cannot be scored; the loaders add the file and line, or the dataset and row. `label`: the
    label is at fault (a built-in task's row from a split without answers)."""

    def __init__(self, message, label=False):
        super().__init__(message)
        self.label = label


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    label: int
    # One context per choice, in place of `context`, all scored on the same continuation (Winogrande:
    # the sentence up to its blank filled by each option; lm-eval's multiple-input tasks).
    contexts: tuple[str, ...] = ()

    def __post_init__(self):
        # Checked here, so that an item built by hand is refused rather than silently scored (a label past
        # the choices is never right; a bool or a string label never equals a prediction).
        choices, label = self.choices, self.label
        if not isinstance(self.context, str):
            raise ItemError(f"context must be a string, got {type(self.context).__name__}")
        if (not isinstance(choices, (tuple, list)) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise ItemError(f"choices must be a list of at least two non-empty strings, got {choices!r}")
        if isinstance(label, bool) or not isinstance(label, int):
            raise ItemError(f"label must be an integer index into choices, got {label!r}", label=True)
        if not 0 <= label < len(choices):
            raise ItemError(f"label {label} out of range for {len(choices)} choices (0..{len(choices) - 1})",
                            label=True)
        if self.contexts and len(self.contexts) != len(choices):
            raise ItemError(f"an item with {len(choices)} choices needs as many contexts, got {len(self.contexts)}")
        for field, text in self._texts():
            _check_text(field, text)
        object.__setattr__(self, "choices", tuple(choices))  # a list given would make the frozen item unhashable
        object.__setattr__(self, "contexts", tuple(self.contexts))

    def _texts(self):
        yield "context", self.context
        yield from ((f"choice {i}", c) for i, c in enumerate(self.choices))
        yield from ((f"context {i}", c) for i, c in enumerate(self.contexts))

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) scored for each choice, in order."""
        return list(zip(self.contexts or (self.context,) * len(self.choices), self.choices))


def _check_text(field, text):
    # JSON's "\ud800" is a lone surrogate: valid JSON, but no text; the tokenizer would fail on it later with
    # an opaque TypeError.
    if not isinstance(text, str):
        raise ItemError(f"{field} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ItemError(f"{field} holds a lone surrogate {text[exc.start]!r} at character {exc.start}, which is "
                        "no text (an escape such as \\ud800 without its pair)") from None


def load_task(name_or_path, data_dir=None, limit=None) -> list[Item]:
    """Items of a built-in task (see TASKS) or of a generic .jsonl file; `limit` keeps the first N."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    name = check_task_name(name_or_path)
    if name.endswith(".jsonl"):
        items = read_jsonl(Path(name).expanduser())
    else:
        items = _builtin(name, resolve_data_dir(data_dir))
    return items[:limit]


def check_task_name(name_or_path) -> str:
    """The zero-shot task's name, if it is a built-in one or a .jsonl path; an unknown one is refused."""
    name = str(name_or_path)
    if not name.endswith(".jsonl") and name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (zero-shot), "
                         f"{', '.join(EVAL_TASKS)} (perplexity), or a path ending in .jsonl (generic format, see "
                         "sdsengine/eval/tasks.py)")
    return name


# ---- built-in tasks ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A built-in task: lm-eval's hub dataset (path, config name, split), the adapter from one of its rows
    to an Item, and, for the tasks the offline data directory ships, a reader of those release files."""
    path: str
    name: str | None
    split: str
    item: Callable[[dict], Item]
    release: Callable[[Path], list[dict]] | None = None  # data dir -> rows in the hub's schema


def _builtin(task, data_dir) -> list[Item]:
    """The task's items; a row the adapter cannot read, or whose label names no choice, is refused by where
    it came from (a test split's rows carry no answer)."""
    source = TASKS[task]
    if data_dir is None:
        where = f"hub dataset {source.path} ({source.name or 'default'}, {source.split})"
        rows = ((f"row {i}", row) for i, row in enumerate(hub_dataset(source.path, source.name, split=source.split)))
    elif source.release is not None:
        where = f"the {task} files of {data_dir}"
        rows = ((f"item {i}", row) for i, row in enumerate(source.release(data_dir)))
    else:
        path = _exported_file(task, source, data_dir)
        where = str(path)
        rows = ((f"line {number}", row) for number, row in jsonl_objects(path))
    items = [_checked_item(source, row, f"{task}: {where}, {at}") for at, row in rows]
    if not items:
        raise ValueError(f"{task}: {where} holds no rows")
    return items


def _checked_item(source, row, where) -> Item:
    try:
        item = source.item(row)
    except ItemError as exc:  # read, but no item to score
        hint = f" (lm-eval scores the {source.split} split, whose rows carry their answers)" if exc.label else ""
        raise ValueError(f"{where}: {exc}{hint}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ValueError(f"{where}: not a row this task can read ({type(exc).__name__}: {exc}); the rows "
                         f"are {source.path}'s") from None
    return item


def _exported_file(task, source, data_dir) -> Path:
    path = data_dir / task / f"{source.split}.jsonl"
    if not path.is_file():
        name = "" if source.name is None else f", {source.name!r}"
        raise FileNotFoundError(
            f"{path} not found: offline, task {task} reads the hub dataset's rows from it; write it once where "
            f"the hub is reachable: datasets.load_dataset({source.path!r}{name}, split={source.split!r})"
            f".to_json({str(path)!r}), or leave the data directory unset to read the hub")
    return path


def _piqa_item(row: dict) -> Item:
    return Item(f"Question: {row['goal']}\nAnswer:", (" " + row["sol1"], " " + row["sol2"]), int(row["label"]))


def _piqa_release(data_dir: Path) -> list[dict]:
    # The original release keeps the labels in a file of their own, one per line.
    docs = [doc for _, doc in jsonl_objects(data_file(data_dir, PIQA_FILE))]
    labels = utf8_text(data_file(data_dir, PIQA_LABELS)).split()
    if len(labels) != len(docs):
        raise ValueError(f"{data_dir / PIQA_LABELS} has {len(labels)} labels for {len(docs)} PIQA questions")
    return [{**doc, "label": int(label)} for doc, label in zip(docs, labels)]


def _arc_item(doc: dict) -> Item:
    # Labels are letters for most questions and digits for some; the answer is found by position.
    labels = doc["choices"]["label"]
    if doc["answerKey"] not in labels:
        raise ValueError(f"ARC question {doc['id']}: answerKey {doc['answerKey']!r} is not among {labels}")
    choices = tuple(" " + text for text in doc["choices"]["text"])
    return Item(f"Question: {doc['question']}\nAnswer:", choices, labels.index(doc["answerKey"]))


def _arc_easy_release(data_dir: Path) -> list[dict]:
    return json.loads(utf8_text(data_file(data_dir, ARC_EASY_FILE)))  # a hub export


def _boolq_item(row: dict) -> Item:
    return Item(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", (" no", " yes"), int(row["label"]))


def _boolq_release(data_dir: Path) -> list[dict]:
    # lm-eval reads SuperGLUE's BoolQ, whose passages open with "<article title> -- "; the original
    # Google release holds the title in its own field and the answer as a bool.
    return [{"passage": f"{doc['title']} -- {doc['passage']}", "question": doc["question"],
             "label": int(doc["answer"])} for _, doc in jsonl_objects(data_file(data_dir, BOOLQ_FILE))]


def _hellaswag_text(text: str) -> str:
    # lm-eval's clean-up of WikiHow's bracketed artifacts ("[title]", "[step]", "[header]").
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_item(row: dict) -> Item:
    context = _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return Item(context, tuple(" " + _hellaswag_text(ending) for ending in row["endings"]), int(row["label"]))


def _winogrande_item(row: dict) -> Item:
    # The blank filled by each option ends the context; the rest of the sentence is the one continuation.
    if "_" not in row["sentence"]:
        raise ValueError("its sentence has no blank '_' for the options")
    blank = row["sentence"].index("_")
    contexts = tuple(row["sentence"][:blank] + option for option in (row["option1"], row["option2"]))
    ending = " " + row["sentence"][blank + 1:].strip()
    return Item("", (ending, ending), int(row["answer"]) - 1, contexts)


def _openbookqa_item(row: dict) -> Item:
    labels = row["choices"]["label"]
    return Item(row["question_stem"], tuple(" " + text for text in row["choices"]["text"]),
                labels.index(row["answerKey"].strip()))


def _rte_item(row: dict) -> Item:
    # GLUE's label 0 is entailment, which lm-eval scores as " True".
    return Item(f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:", (" True", " False"),
                int(row["label"]))


TASKS = {
    "piqa": Source("baber/piqa", None, "validation", _piqa_item, _piqa_release),
    "arc_easy": Source("allenai/ai2_arc", "ARC-Easy", "test", _arc_item, _arc_easy_release),
    "boolq": Source("aps/super_glue", "boolq", "validation", _boolq_item, _boolq_release),
    "arc_challenge": Source("allenai/ai2_arc", "ARC-Challenge", "test", _arc_item),
    "hellaswag": Source("Rowan/hellaswag", None, "validation", _hellaswag_item),
    "winogrande": Source("allenai/winogrande", "winogrande_xl", "validation", _winogrande_item),
    "openbookqa": Source("allenai/openbookqa", "main", "test", _openbookqa_item),
    "rte": Source("nyu-mll/glue", "rte", "validation", _rte_item),
}


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
    choices = obj["choices"]
    if not isinstance(choices, list):  # JSON's list; a string would be read as its characters
        raise ValueError(f"{where}: choices must be a list of at least two non-empty strings, got {choices!r}")
    try:
        return Item(obj["context"], tuple(choices), obj["label"])
    except ItemError as exc:
        raise ValueError(f"{where}: {exc}") from None
