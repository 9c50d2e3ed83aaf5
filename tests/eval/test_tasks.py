"""Built-in zero-shot tasks beyond the offline release files: rows from the hub (faked here: no network) or
exported to the data directory, turned into lm-eval's prompts (the hub rows of the tasks the data directory
ships: test_zeroshot.py, beside their release files' adapters)."""
import json
import sys

import pytest

from sdsengine import data
from sdsengine.eval.tasks import Item, load_task

# The first HellaSwag validation row (ActivityNet), and a WikiHow-style one with its bracketed artifacts.
HELLASWAG_ROWS = [
    {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
     "ctx_b": "[step] Scrub", "endings": ["[substeps] Use a brush.", " Wait  an hour. "], "label": "0"},
]


def test_hellaswag_prompts_are_lm_evals(hub):
    hub.rows = HELLASWAG_ROWS
    first, wikihow = load_task("hellaswag")
    assert hub.calls == [(("Rowan/hellaswag", None), {"split": "validation"})]
    assert first == Item("Roof shingle removal: A man is sitting on a roof. He",
                         (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                          " is holding a rubik's cube.", " starts pulling up roofing on a roof."), 3)
    # " [title]" becomes ". ", other brackets go, double spaces close; ctx_b is capitalized (rest lowered).
    # The space a removed bracket leaves at the start stays (stripping comes first), as in lm-eval.
    assert wikihow == Item("Home and Garden: How to clean a grill. Heat the grill. scrub",
                           ("  Use a brush.", " Wait an hour."), 0)


def test_winogrande_fills_the_blank_with_each_option(hub):
    hub.rows = [{"sentence": "The trophy doesn't fit into the brown suitcase because _ is too large.",
                 "option1": "the trophy", "option2": "the suitcase", "answer": "1"}]
    [item] = load_task("winogrande")
    assert hub.calls == [(("allenai/winogrande", "winogrande_xl"), {"split": "validation"})]
    assert item.contexts == ("The trophy doesn't fit into the brown suitcase because the trophy",
                             "The trophy doesn't fit into the brown suitcase because the suitcase")
    assert item.choices == (" is too large.", " is too large.") and item.label == 0
    assert item.requests() == list(zip(item.contexts, item.choices))


def test_openbookqa_arc_challenge_and_rte(hub):
    hub.rows = [{"id": "7-980", "question_stem": "The sun is responsible for",
                 "choices": {"text": ["puppies learning new tricks", "plants sprouting"], "label": ["A", "B"]},
                 "answerKey": "B"}]
    assert load_task("openbookqa") == [Item("The sun is responsible for",
                                            (" puppies learning new tricks", " plants sprouting"), 1)]
    hub.rows = [{"id": "q1", "question": "Which is a metal?", "choices": {"text": ["wood", "iron"],
                 "label": ["1", "2"]}, "answerKey": "2"}]
    assert load_task("arc_challenge") == [Item("Question: Which is a metal?\nAnswer:", (" wood", " iron"), 1)]
    hub.rows = [{"sentence1": "A cat sat.", "sentence2": "An animal sat.", "label": 0}]
    assert load_task("rte") == [Item("A cat sat.\nQuestion: An animal sat. True or False?\nAnswer:",
                                     (" True", " False"), 0)]
    assert [call[0] for call in hub.calls] == [("allenai/openbookqa", "main"), ("allenai/ai2_arc", "ARC-Challenge"),
                                               ("nyu-mll/glue", "rte")]
    assert [call[1]["split"] for call in hub.calls] == ["test", "test", "validation"]


def export(folder, task, split, rows):
    """rows written as DATA_DIR/<task>/<split>.jsonl, as datasets' to_json writes an export."""
    (folder / task).mkdir()
    (folder / task / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_offline_rows_exported_from_the_hub_are_read_from_the_data_directory(tmp_path, hub):
    export(tmp_path, "hellaswag", "validation", HELLASWAG_ROWS)
    hub.rows = HELLASWAG_ROWS
    assert load_task("hellaswag", data_dir=tmp_path) == load_task("hellaswag")
    assert load_task("hellaswag", data_dir=tmp_path, limit=1) == load_task("hellaswag")[:1]
    assert len(hub.calls) == 2  # the data directory's file took the hub's place


def test_a_missing_export_names_the_file_and_how_to_write_it(tmp_path, hub):
    with pytest.raises(FileNotFoundError, match=r"winogrande/validation\.jsonl not found: .*datasets\.load_dataset"
                                                r"\('allenai/winogrande', 'winogrande_xl', split='validation'\)"
                                                r"\.to_json\("):
        load_task("winogrande", data_dir=tmp_path)
    assert hub.calls == []


def test_no_data_directory_and_no_datasets_package_names_both_ways_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    monkeypatch.delenv("SDSENGINE_DATA_DIR", raising=False)
    with pytest.raises(RuntimeError, match=r"`datasets` is not installed: pass --data-dir .*SDSENGINE_DATA_DIR"):
        load_task("boolq")
    with pytest.raises(RuntimeError, match="`datasets` is not installed"):
        data.hub_dataset("wikitext", "wikitext-2-raw-v1", split="test")


@pytest.mark.parametrize("task, split, rows, message", [
    ("hellaswag", "validation", [], r"hellaswag: .*hellaswag/validation\.jsonl holds no rows"),
    ("hellaswag", "validation", HELLASWAG_ROWS[:1] + [{"ctx": "no such schema"}],
     r"hellaswag/validation\.jsonl, line 2: not a row this task can read \(KeyError: 'activity_label'\); "
     r"the rows are Rowan/hellaswag's"),
    ("rte", "validation", [{"sentence1": "a.", "sentence2": "b.", "label": -1}],
     r"rte/validation\.jsonl, line 1: label -1 out of range for 2 choices \(0\.\.1\) \(lm-eval scores the "
     r"validation split"),
    ("winogrande", "validation", [{"sentence": "No blank.", "option1": "a", "option2": "b", "answer": "1"}],
     r"winogrande/validation\.jsonl, line 1: not a row this task can read \(ValueError: its sentence has no "
     r"blank"),
])
def test_bad_exported_rows_are_named_by_file_and_line(tmp_path, hub, task, split, rows, message):
    export(tmp_path, task, split, rows)
    with pytest.raises(ValueError, match=message):
        load_task(task, data_dir=tmp_path)


def test_bad_hub_rows_are_named_by_dataset_and_row(hub):
    hub.rows = HELLASWAG_ROWS + [{**HELLASWAG_ROWS[0], "label": ""}]  # the test split carries no labels
    with pytest.raises(ValueError, match=r"hellaswag: hub dataset Rowan/hellaswag \(default, validation\), row 2: "
                                         r"not a row this task can read \(ValueError: invalid literal"):
        load_task("hellaswag")


def test_an_item_needs_a_context_for_every_choice():
    with pytest.raises(ValueError, match="an item with 3 choices needs as many contexts, got 2"):
        Item("", (" a", " b", " c"), 0, ("x", "y"))


@pytest.mark.parametrize("args, message", [
    (("Q", (" a", " b"), 2), r"label 2 out of range for 2 choices \(0\.\.1\)"),
    (("Q", (" a", " b"), -1), r"label -1 out of range for 2 choices"),
    (("Q", (" a", " b"), "0"), r"label must be an integer index into choices, got '0'"),
    (("Q", (" a", " b"), True), r"label must be an integer index into choices, got True"),
    (("Q", (" a",), 0), r"choices must be a list of at least two non-empty strings, got \(' a',\)"),
    (("Q", (" a", ""), 0), r"choices must be a list of at least two non-empty strings"),
    (("Q", (" a", 3), 0), r"choices must be a list of at least two non-empty strings"),
    (("Q", " ab", 0), r"choices must be a list of at least two non-empty strings, got ' ab'"),
    ((None, (" a", " b"), 0), r"context must be a string, got NoneType"),
    (("Q", (" a", " \ud800"), 0), r"choice 1 holds a lone surrogate '\\ud800' at character 1"),
    (("", (" a", " b"), 0, ("x", 5)), r"context 1 must be a string, got int"),
])
def test_an_item_built_by_hand_that_cannot_be_scored_is_refused(args, message):
    with pytest.raises(ValueError, match=message):  # each was scored (a label past the choices: never right)
        Item(*args)


@pytest.mark.parametrize("field, row", [
    ("context", {"context": "Q \ud800", "choices": [" a", " b"], "label": 0}),
    ("choice 0", {"context": "Q", "choices": ["\ud800", " b"], "label": 0}),
])
def test_a_jsonl_row_with_a_lone_surrogate_names_its_line_and_field(tmp_path, field, row):
    path = tmp_path / "mine.jsonl"
    good = {"context": "Q", "choices": [" a", " b"], "label": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")  # json writes the escape "\ud800": valid JSON
    with pytest.raises(ValueError, match=rf"mine\.jsonl:2: {field} holds a lone surrogate"):
        load_task(str(path))  # was a TypeError in the tokenizer, at evaluation


def test_a_hub_row_with_a_lone_surrogate_names_its_row_and_field(hub):
    hub.rows = [{"sentence1": "a.", "sentence2": "b \ud800.", "label": 0}]
    with pytest.raises(ValueError, match=r"rte: hub dataset nyu-mll/glue \(rte, validation\), row 0: context holds "
                                         r"a lone surrogate '\\ud800' at character 15, which is no text"):
        load_task("rte")
