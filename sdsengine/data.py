"""Calibration and evaluation token streams, from the hub (`datasets`) or an offline data directory.

Offline files (see ../shared/data/SOURCES.md) are used whenever a data directory is given, by argument or
by the SDSENGINE_DATA_DIR environment variable; otherwise the hub is used through `datasets`.
"""
import importlib.util
import json
import os
import random
from pathlib import Path

import torch

C4_TRAIN = "c4/c4_en_train_00000_first1000.jsonl"
C4_HELD_OUT = 800  # offline: documents [0, 800) calibrate, [800, 1000) are the held-out C4 proxy
WIKI_TEST = "wikitext2/wiki.test.orig.raw"
WIKI_VALID = "wikitext2/wiki.valid.raw"
PTB_TEST = "ptb/ptb.test.txt"
EVAL_TASKS = ("wikitext2", "c4", "ptb")


DATA_ENV = "SDSENGINE_DATA_DIR"
DATA_HINT = (f"pass --data-dir (data_dir= in Python) or set {DATA_ENV} (the offline data directory, see "
             "../shared/data/SOURCES.md)")


def resolve_data_dir(data_dir=None, required=False) -> Path | None:
    """The offline data directory (argument, else $SDSENGINE_DATA_DIR); None means use the hub."""
    given = data_dir or os.environ.get(DATA_ENV)
    if not given:
        if required:
            raise FileNotFoundError(f"no data directory given: {DATA_HINT}")
        return None
    path = Path(given).expanduser()
    if not path.is_dir():
        source = "the data_dir argument" if data_dir else DATA_ENV
        raise FileNotFoundError(f"data directory {path} (from {source}) does not exist: {DATA_HINT}")
    return path


def data_file(data_dir: Path, relative: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data directory must hold {relative}; {DATA_HINT}")
    return path


# ---- raw text -----------------------------------------------------------------------------------------

def wikitext_rows(path: Path) -> list[str]:
    """Rebuild HF wikitext-2-raw-v1 rows from an original release file (SOURCES.md)."""
    lines = utf8_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline, not with an empty row
    return ["" if not line.strip() else line + "\n" for line in lines]


def wikitext_text(split, data_dir):
    if data_dir:
        return "\n\n".join(wikitext_rows(data_file(data_dir, WIKI_TEST if split == "test" else WIKI_VALID)))
    return "\n\n".join(hub_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def c4_documents(data_dir, split):
    """Offline: the local C4 train sample, its first 800 documents for train, the rest as held-out proxy."""
    if data_dir:
        path = data_file(data_dir, C4_TRAIN)
        docs = []
        for number, obj in jsonl_objects(path):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{number}: a C4 line must be an object with a string 'text' field")
            docs.append(obj["text"])
        return docs[:C4_HELD_OUT] if split == "train" else docs[C4_HELD_OUT:]
    if split == "train":
        files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        return hub_dataset("allenai/c4", data_files=files, split="train")["text"]
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    return hub_dataset("allenai/c4", data_files=files, split="validation")["text"][:1100]


def ptb_text(data_dir):
    """PTB test sentences joined by spaces (SparseGPT's protocol); offline, the sentences are the lines of
    the original release file, stripped as the hub's ptb_text_only strips them."""
    if data_dir:
        sentences = utf8_text(data_file(data_dir, PTB_TEST)).splitlines()
    else:
        sentences = hub_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"]
    return " ".join(sentence.strip() for sentence in sentences)


def jsonl_objects(path: Path):
    """(line number, parsed object) for each non-blank line; a parse error names the file and line."""
    for number, line in enumerate(utf8_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None


def utf8_text(path: Path) -> str:
    """The file's text; one that is not UTF-8 is named (Python's own error names only the byte)."""
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is no text
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def file_text(path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for number, obj in jsonl_objects(path):
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: a calibration line must be an object with a string 'text' "
                                 f"field, got {json.dumps(obj)[:80]}")
            texts.append(text)
        return "\n\n".join(texts)
    if path.suffix == ".txt":
        return utf8_text(path)
    raise ValueError(f"calibration file {path} must be .txt or .jsonl (objects with a 'text' field)")


def hub_dataset(*args, **kwargs):
    """datasets.load_dataset(*args, **kwargs), or an error naming the offline alternative."""
    check_hub_reader()
    import datasets
    return datasets.load_dataset(*args, **kwargs)


def check_hub_reader():
    """Raise unless `datasets` (what reads the hub's data) is installed: asked before loading a model too,
    where no data directory is given, so that its absence is not found minutes later."""
    if importlib.util.find_spec("datasets") is None:
        raise RuntimeError("no data directory given and `datasets` is not installed: pass --data-dir (data_dir= "
                           f"in Python), set {DATA_ENV}, or pip install datasets")


# ---- calibration -------------------------------------------------------------------------------------

CALIBRATION_FILES = {"c4": C4_TRAIN, "wikitext2": WIKI_VALID}  # offline, by dataset name


def check_calibration_source(config):
    """Raise unless the calibration data that config names can be read: a known name (with its file, when
    a data directory is used) or an existing .txt/.jsonl file. The CLI asks before loading the model."""
    if config.dataset in CALIBRATION_FILES:
        data_dir = resolve_data_dir(config.data_dir)
        if data_dir:
            data_file(data_dir, CALIBRATION_FILES[config.dataset])
        else:
            check_hub_reader()
        return
    if not config.dataset.endswith((".txt", ".jsonl")):
        raise ValueError(f"unknown calibration dataset {config.dataset!r}: use c4, wikitext2 or a .txt/.jsonl path")
    if not Path(config.dataset).expanduser().is_file():
        raise FileNotFoundError(f"calibration file not found: {config.dataset}")


def calibration_samples(tokenizer, config) -> torch.Tensor:
    """(nsamples, seqlen) token windows drawn at random with config.seed."""
    check_calibration_source(config)
    data_dir = resolve_data_dir(config.data_dir)
    rng = random.Random(config.seed)
    if config.dataset == "c4" and not data_dir:
        return _windows_from_documents(tokenizer, c4_documents(data_dir, "train"), config, rng)
    if config.dataset == "c4":
        # The local sample holds too few documents longer than 2048 tokens (27) for SparseGPT's
        # per-document sampler; windows come from the documents joined into one stream instead.
        text = "\n\n".join(c4_documents(data_dir, "train"))
    elif config.dataset == "wikitext2":
        text = wikitext_text("validation" if data_dir else "train", data_dir)
    else:  # a .txt or .jsonl file (check_calibration_source)
        text = file_text(config.dataset)
    return _windows_from_stream(token_stream(tokenizer, text), config, rng)


TOKENIZE_PIECE = 1 << 22  # characters: a fast tokenizer's buffers take ~135 bytes per character it encodes


def token_stream(tokenizer, text) -> torch.Tensor:
    """The text's token ids, encoded a piece of at most TOKENIZE_PIECE characters at a time, each piece ending
    after a newline where it can, so that a large calibration file costs its ids, not the tokenizer's buffers
    for all of it (a 60 MB file took 8.4 GB). A shorter text is one piece, encoded as a whole; special tokens
    (a BOS) only at the start."""
    ids, start = [], 0
    while True:
        end = len(text)
        if end - start > TOKENIZE_PIECE:
            end = text.rfind("\n", start, start + TOKENIZE_PIECE) + 1 or start + TOKENIZE_PIECE
        later = {"add_special_tokens": False} if ids else {}
        ids.append(tokenizer(text[start:end], return_tensors="pt", **later).input_ids[0])
        if end >= len(text):
            return torch.cat(ids)
        start = end


def calibration_protocol(config) -> str:
    data_dir = resolve_data_dir(config.data_dir)
    if config.dataset == "c4":
        return ("C4 train shard 0, random document then random window (SparseGPT sampler), hub" if not data_dir else
                f"C4 offline sample, documents 0-{C4_HELD_OUT - 1} joined by blank lines, random windows")
    if config.dataset == "wikitext2":
        return "WikiText-2 train, random windows (hub)" if not data_dir else "WikiText-2 validation, random windows"
    return f"{config.dataset}, random windows"


def _windows_from_documents(tokenizer, docs, config, rng):
    """SparseGPT/Wanda's C4 sampler, draw for draw: a random document, redrawn until one is longer than
    seqlen, then a random window in it. Only drawn documents are tokenized (the hub shard holds ~356k)."""
    encoded, too_short = {}, set()
    out = []
    while len(out) < config.nsamples:
        index = rng.randint(0, len(docs) - 1)
        if index not in encoded:
            encoded[index] = tokenizer(docs[index], return_tensors="pt").input_ids[0]
        doc = encoded[index]
        if doc.numel() <= config.seqlen:
            too_short.add(index)
            if len(too_short) == len(docs):
                raise ValueError(f"no C4 document is longer than seqlen={config.seqlen} tokens")
            continue
        start = rng.randint(0, doc.numel() - config.seqlen - 1)
        out.append(doc[start:start + config.seqlen])
    return torch.stack(out)


def _windows_from_stream(ids, config, rng):
    if ids.numel() // config.seqlen < config.nsamples:
        raise ValueError(f"the calibration text holds {ids.numel() // config.seqlen} windows of {config.seqlen} "
                         f"tokens, fewer than nsamples={config.nsamples}")
    if ids.numel() <= config.seqlen:  # the sampler's starts leave one token after the window
        raise ValueError(f"the calibration text holds {ids.numel()} tokens; windows of {config.seqlen} need at "
                         f"least {config.seqlen + 1}")
    starts = [rng.randint(0, ids.numel() - config.seqlen - 1) for _ in range(config.nsamples)]
    return torch.stack([ids[s:s + config.seqlen] for s in starts])


# ---- evaluation ---------------------------------------------------------------------------------------

EVAL_FILES = {"wikitext2": WIKI_TEST, "c4": C4_TRAIN, "ptb": PTB_TEST}  # in a data directory


def check_eval_source(task, data_dir=None):
    """Raise unless the perplexity task's text can be read offline where a data directory is used (the hub is
    only found by reading it). The CLI asks before loading the model."""
    data_dir = resolve_data_dir(data_dir)
    if data_dir:
        data_file(data_dir, EVAL_FILES[task])
    else:
        check_hub_reader()


def eval_tokens(tokenizer, task, data_dir=None, seqlen=2048) -> tuple[torch.Tensor, str]:
    """(token ids (1, N), protocol description) of an evaluation text."""
    data_dir = resolve_data_dir(data_dir)
    where = f"offline files in {data_dir}" if data_dir else "hub"
    if task == "wikitext2":
        text, what = wikitext_text("test", data_dir), "WikiText-2 raw test, rows joined with '\\n\\n'"
    elif task == "c4":
        text = " ".join(c4_documents(data_dir, "validation"))
        what = ("C4 PROXY: held-out documents 800-999 of the local C4 train sample (not C4 validation)" if data_dir
                else "C4 validation, first 1100 documents")
    elif task == "ptb":
        text, what = ptb_text(data_dir), "PTB test"
    else:
        raise ValueError(f"unknown perplexity task {task!r}; known: {', '.join(EVAL_TASKS)}")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if task == "c4" and not data_dir:
        ids = ids[:, :256 * seqlen]  # the SparseGPT protocol's 256 windows
    return ids, f"{what} ({where})"
