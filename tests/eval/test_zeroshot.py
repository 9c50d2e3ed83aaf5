"""Zero-shot evaluator: log-likelihoods against a direct computation, acc/acc_norm on a model whose
log-probabilities are set by hand, lm-eval's tokenization rules, the adapters on the real data files,
and the errors a user can meet."""
import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sdsengine.eval.tasks import Item, load_task
from sdsengine.eval.runner import evaluate
from sdsengine.eval.zeroshot import (encode_pair, evaluate_zeroshot, loglikelihoods,
                                     predictions, wants_bos)
from tiny_models import MOE_SETTINGS, VOCAB, tiny_model

# Where the Makefile points SDSENGINE_DATA_DIR by default: ../shared/data beside the repository.
DATA_DIR = Path(os.environ.get("SDSENGINE_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"offline data directory {DATA_DIR} not found; "
                                "set SDSENGINE_DATA_DIR (see ../shared/data/SOURCES.md)")

# Byte-level BPE: every byte is a token, plus these merges in priority order. " yes"/" no" become single
# tokens; "bc" outranks "ab", so "abc" encodes as a|bc while "ab" alone is one token: a boundary merge.
MERGES = [("Ġ", "y"), ("Ġy", "e"), ("Ġye", "s"), ("Ġ", "n"), ("Ġn", "o"), ("b", "c"), ("a", "b")]
MAX_POSITIONS = 48


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(scope="module")
def llama(tokenizer):
    # A large init spread makes log-probabilities differ between tokens, so a misplaced index shows.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                         initializer_range=0.5)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


class FixedLogProbs(torch.nn.Module):
    """A causal LM that predicts the same distribution everywhere, so ll(choice) = sum of per-token log p."""

    def __init__(self, logp):
        super().__init__()
        self.logp = torch.nn.Parameter(logp, requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.rows = 0

    def get_input_embeddings(self):  # the vocabulary the token ids are checked against
        return SimpleNamespace(num_embeddings=self.logp.shape[0])

    def forward(self, input_ids, **kwargs):
        self.rows += input_ids.shape[0]
        return SimpleNamespace(logits=self.logp.expand(*input_ids.shape, -1))


def fixed_model(tokenizer, logp_by_token):
    """log p = the given values for the given tokens, the rest of the probability spread evenly."""
    ids = {tokenizer.convert_tokens_to_ids(tok): lp for tok, lp in logp_by_token.items()}
    rest = (1 - sum(math.exp(lp) for lp in ids.values())) / (len(tokenizer) - len(ids))
    logp = torch.full((len(tokenizer),), math.log(rest))
    for i, lp in ids.items():
        logp[i] = lp
    return FixedLogProbs(logp)


@torch.no_grad()
def direct_ll(model, ids, n_cont):
    """Unbatched reference: sum of log p of the last n_cont tokens of `ids`, from the logits of one pass."""
    logp = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n_cont, len(ids)))


# ---- log-likelihood ------------------------------------------------------------------------------------

def test_batched_loglikelihood_matches_direct_computation(llama, tokenizer):
    cases = [("Question: is the sky blue?\nAnswer:", " yes"), ("Question: is the sky blue?\nAnswer:", " no"),
             ("Q", " a much longer answer, padded rows around it"), ("x y z", " w"),
             ("Question: pick\nAnswer:", " the first"), ("Question: pick\nAnswer:", " the second one")]
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in cases]
    batched = loglikelihoods(llama, pairs, batch_size=4, progress=False)
    for (ctx, cont), got in zip(cases, batched):
        whole = tokenizer.encode(ctx + cont, add_special_tokens=False)
        n_cont = len(whole) - len(tokenizer.encode(ctx, add_special_tokens=False))
        assert got == pytest.approx(direct_ll(llama, whole, n_cont), abs=1e-4), (ctx, cont)


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no logits_to_keep: every position's logits come back."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, use_cache=None):
        return self.model(input_ids, use_cache=use_cache)


# Every context is several tokens long, so no row's scored span starts at position 0.
BATCH_CASES = [("Q: and", " a longer answer, padded around it"), ("x y z", " w"),
               ("Question: is the sky blue?\nAnswer:", " yes"), ("Question: pick\nAnswer:", " the second one")]


@pytest.mark.parametrize("wrap", [False, True], ids=["logits_to_keep", "all_logits"])
def test_rows_of_different_lengths_and_spans_score_as_alone(llama, tokenizer, wrap):
    # One batch of rows whose scored spans start at different positions: each row's log-likelihood must be
    # read at its own positions whether the model returns every position's logits or only the last ones.
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in BATCH_CASES]
    model = WithoutLogitsToKeep(llama) if wrap else llama
    batched = loglikelihoods(model, pairs, batch_size=len(pairs), progress=False)
    for (ctx, cont), got in zip(pairs, batched):
        assert got == pytest.approx(direct_ll(llama, ctx + cont, len(cont)), abs=1e-4), (ctx, cont)


DENSE_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "granite",
                  "cohere", "starcoder2", "stablelm", "phi", "persimmon", "gpt_neox", "falcon", "bloom", "gptj", "opt",
                  "gpt2"]


@pytest.mark.parametrize("family", DENSE_FAMILIES + list(MOE_SETTINGS))
def test_every_familys_kept_logits_score_as_its_full_logits(family):
    # Some families scale or cap the logits after the projection (granite, cohere, gemma2): the positions that
    # logits_to_keep keeps must give what the full logits give there.
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(VOCAB, (n_ctx,), generator=generator).tolist(),
              torch.randint(VOCAB, (n_cont,), generator=generator).tolist())
             for n_ctx, n_cont in [(9, 3), (5, 1), (7, 6)]]
    kept = loglikelihoods(model, pairs, batch_size=len(pairs), progress=False)
    assert kept == pytest.approx(loglikelihoods(WithoutLogitsToKeep(model), pairs, progress=False), abs=1e-5)


def test_the_vocabulary_projection_skips_positions_before_the_scored_ones(llama, tokenizer):
    pairs = [encode_pair(tokenizer, "Question: is the sky blue?\nAnswer:", choice) for choice in (" yes", " no")]
    rows = []
    hook = llama.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        loglikelihoods(llama, pairs, progress=False)
    finally:
        hook.remove()
    assert rows == [1]  # one shared row ending in the one-token answers: only its last position is projected


def test_long_context_is_truncated_from_the_left(llama, tokenizer):
    context = "Passage: " + "lorem ipsum " * 10 + "\nAnswer:"  # longer than the 48-position window
    ctx, cont = encode_pair(tokenizer, context, " yes")
    assert len(ctx) + len(cont) > MAX_POSITIONS + 1
    kept = (ctx + cont)[-(MAX_POSITIONS + 1):]  # the last token is only scored, never fed in
    assert loglikelihoods(llama, [(ctx, cont)], progress=False)[0] == pytest.approx(
        direct_ll(llama, kept, len(cont)), abs=1e-4)


def test_empty_context_conditions_on_eos(llama, tokenizer):
    ctx, cont = encode_pair(tokenizer, "", " yes")
    assert ctx == [tokenizer.eos_token_id]
    assert loglikelihoods(llama, [(ctx, cont)], progress=False)[0] == pytest.approx(
        direct_ll(llama, ctx + cont, len(cont)), abs=1e-4)


def test_an_item_with_a_context_per_choice_scores_each_choice_after_its_own(llama, tokenizer):
    # Winogrande's form: the same continuation after each filled-in blank.
    item = Item("", (" is big.", " is big."), 1, ("The cup fits because the cup", "The cup fits because the box"))
    records = []
    evaluate_zeroshot(llama, tokenizer, [item], progress=False, samples=records)
    for context, got in zip(item.contexts, records[0]["loglikelihoods"]):
        whole = tokenizer.encode(context + " is big.", add_special_tokens=False)
        n_cont = len(whole) - len(tokenizer.encode(context, add_special_tokens=False))
        assert got == pytest.approx(direct_ll(llama, whole, n_cont), abs=1e-4), context
    assert records[0]["loglikelihoods"][0] != pytest.approx(records[0]["loglikelihoods"][1], abs=1e-4)
    assert records[0]["contexts"] == list(item.contexts)


# ---- acc and acc_norm ----------------------------------------------------------------------------------

def test_acc_and_acc_norm_on_hand_set_log_probs(tokenizer):
    # log p: " "=-2, x=-1, z=-2. ll(" x") = -3 and ll(" zzzz") = -10: acc picks " x".
    # acc_norm by lm-eval's lengths 1 and 4: -3 < -2.5, picks " zzzz". Counting the space (2 and 5) it
    # would pick " x" (-1.5 > -2), so this also checks that the delimiter is left out.
    model = fixed_model(tokenizer, {"Ġ": -2.0, "x": -1.0, "z": -2.0})
    items = [Item("Q: one?\nA:", (" x", " zzzz"), 0), Item("Q: two?\nA:", (" zzzz", " x"), 1),
             Item("Q: three?\nA:", (" x", " zzzz"), 1)]
    lls = loglikelihoods(model, [encode_pair(tokenizer, it.context, c) for it in items for c in it.choices],
                         batch_size=2, progress=False)
    assert lls == pytest.approx([-3, -10, -10, -3, -3, -10], abs=1e-5)
    assert predictions(items, lls) == [(0, 1), (1, 0), (0, 1)]
    samples = []
    result = evaluate_zeroshot(model, tokenizer, items, batch_size=2, progress=False, samples=samples)
    assert (result["acc"], result["acc_norm"], result["n"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3), 3)
    assert result["acc_stderr"] == pytest.approx(math.sqrt(2 / 9 / 2))
    # one record per item: what it was asked, what each choice scored, what was answered
    assert [(r["index"], r["label"], r["pred"], r["pred_norm"]) for r in samples] == [(0, 0, 0, 1), (1, 1, 1, 0),
                                                                                        (2, 1, 0, 1)]
    assert [r["choices"] for r in samples] == [list(it.choices) for it in items]
    assert [ll for r in samples for ll in r["loglikelihoods"]] == pytest.approx(lls, abs=1e-5)


def test_acc_norm_divides_by_characters_not_bytes():
    # " é" is 1 character but 2 bytes: -1.8 / 1 < -1.0 / 1, yet -1.8 / 2 > -1.0 / 1.
    items = [Item("c", (" é", " z"), 1)]
    assert predictions(items, [-1.8, -1.0]) == [(1, 1)]


def test_one_item_has_no_stderr_and_writes_valid_json(tokenizer):
    result = evaluate_zeroshot(fixed_model(tokenizer, {"x": -1.0}), tokenizer, [Item("c", (" x", " y"), 0)],
                               progress=False)
    assert result["acc_stderr"] is None and json.loads(json.dumps(result, allow_nan=False)) == result


def test_ties_go_to_the_first_choice():
    assert predictions([Item("c", (" ab", " cd"), 0)], [-2.0, -2.0]) == [(0, 0)]


def test_choices_with_one_token_answers_share_a_forward_row(tokenizer):
    model = fixed_model(tokenizer, {"Ġyes": -1.0, "Ġno": -2.0})
    items = [Item("Question: a?\nAnswer:", (" no", " yes"), 1), Item("Question: b?\nAnswer:", (" no", " yes"), 0)]
    result = evaluate_zeroshot(model, tokenizer, items, progress=False)
    assert model.rows == 2  # one row per context, not per choice
    assert (result["acc"], result["acc_norm"]) == (0.5, 0.5)


# ---- tokenization ----------------------------------------------------------------------------------------

def test_continuation_tokens_come_from_the_whole_encoding(tokenizer):
    assert encode_pair(tokenizer, "Answer:", " yes") == (tokenizer.encode("Answer:"), tokenizer.encode(" yes"))


def test_trailing_context_space_moves_to_the_continuation(tokenizer):
    assert encode_pair(tokenizer, "Answer: ", "yes") == encode_pair(tokenizer, "Answer:", " yes")


def test_gemma_models_are_scored_after_a_bos_as_lm_eval_does(llama, tokenizer, monkeypatch):
    items = [Item("Question: a?\nAnswer:", (" no", " yes"), 1)]
    prefixed = [encode_pair(tokenizer, items[0].context, c, bos=True) for c in items[0].choices]
    assert [ctx for ctx, _ in prefixed] == [[tokenizer.eos_token_id] + tokenizer.encode("Question: a?\nAnswer:")] * 2
    assert not wants_bos(llama)
    monkeypatch.setattr(llama.config, "model_type", "gemma3_text")
    assert wants_bos(llama)
    samples = []
    evaluate_zeroshot(llama, tokenizer, items, progress=False, samples=samples)
    assert samples[0]["loglikelihoods"] == pytest.approx(loglikelihoods(llama, prefixed, progress=False), abs=1e-5)


def test_merge_across_the_boundary_encodes_the_parts_apart(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("abc")) == ["a", "bc"]
    ctx, cont = encode_pair(tokenizer, "ab", "c")
    assert tokenizer.convert_ids_to_tokens(ctx) == ["ab"] and tokenizer.convert_ids_to_tokens(cont) == ["c"]


def test_a_merge_into_the_unknown_token_encodes_the_parts_apart():
    """A word-level vocabulary reads both "b" and the merged "ba" as its unknown token: the whole text's tokens then
    start with the context's and hold no more, and the answer is encoded alone."""
    vocab = {"[UNK]": 0, "a": 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert words.encode("a b a ba") == words.encode("a b a b") == [1, 0, 1, 0]
    assert encode_pair(words, "a b a b", "a") == ([1, 0, 1, 0], [1])


def test_a_context_the_tokenizer_drops_whole_is_an_empty_context(tokenizer):
    dropping = copy.deepcopy(tokenizer)  # a normalizer that drops control characters, as BERT's does
    dropping.backend_tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    assert dropping.encode("\x01", add_special_tokens=False) == []
    assert encode_pair(dropping, "\x01", " yes") == encode_pair(dropping, "", " yes")  # was an empty context


# ---- what a caller can get wrong -------------------------------------------------------------------------

def test_ids_past_the_models_vocabulary_are_named_not_an_index_error(model, tokenizer):
    # The byte-level tokenizer's 264 tokens against the 64 of `model`: "Q" and " yes" lie past 64.
    with pytest.raises(ValueError, match=r"mine: the tokenizer's ids \(is it the model's tokenizer\?\) must lie "
                                         r"in \[0, 64\) \(the model's vocabulary\), got 48\.\.260"):
        evaluate_zeroshot(model, tokenizer, [Item("Q", (" yes", " no"), 0)], desc="mine", progress=False)


def test_a_model_in_training_mode_is_scored_in_eval_mode_and_left_as_it_came(llama, tokenizer):
    dropping = copy.deepcopy(llama)
    for layer in dropping.model.layers:  # random scores in training mode
        layer.self_attn.attention_dropout = 0.5
    items = [Item("Question: is the sky blue?\nAnswer:", (" yes", " no"), 0)]
    expected, got = [], []
    evaluate_zeroshot(dropping, tokenizer, items, progress=False, samples=expected)
    dropping.train()
    evaluate_zeroshot(dropping, tokenizer, items, progress=False, samples=got)
    assert got[0]["loglikelihoods"] == pytest.approx(expected[0]["loglikelihoods"], abs=1e-5)
    assert dropping.training and dropping.model.layers[0].self_attn.training


@pytest.mark.parametrize("tokenizer_eos, item, message", [
    ("<eos>", Item("Q", (" yes", " yes" * 60), 0), r"mine: item 1, choice 1: a continuation of 60 tokens does "
                                                    r"not fit the 48-token window"),
    (None, Item("", (" yes", " no"), 0), r"mine: item 1, choice 0: an empty context needs a BOS or EOS token"),
])
def test_an_item_that_cannot_be_scored_is_named_by_task_item_and_choice(llama, tokenizer, tokenizer_eos, item,
                                                                        message):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = tokenizer_eos
    with pytest.raises(ValueError, match=message):
        evaluate_zeroshot(llama, tokenizer, [Item("Q", (" yes", " no"), 0), item], desc="mine", progress=False)


# ---- generic JSONL and the task API ---------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_generic_jsonl_round_trip_and_evaluate(tmp_path, tokenizer):
    rows = [{"context": "Q: one?\nA:", "choices": [" x", " zzzz"], "label": 0},
            {"context": "Q: two?\nA:", "choices": [" zzzz", " x"], "label": 1}]
    path = write_jsonl(tmp_path / "mine.jsonl", rows[:1] + [""] + rows[1:])  # blank lines are skipped
    assert load_task(str(path)) == [Item(r["context"], tuple(r["choices"]), r["label"]) for r in rows]
    assert load_task(path, limit=1) == load_task(path)[:1]
    flipped = write_jsonl(tmp_path / "flipped.jsonl", [{**row, "label": 1 - row["label"]} for row in rows])
    model = fixed_model(tokenizer, {"Ġ": -2.0, "x": -1.0, "z": -2.0})  # acc picks " x", acc_norm " zzzz"
    results = evaluate(model, tokenizer, [str(path), str(flipped)], progress=False)
    assert list(results) == [str(path), str(flipped)]
    assert [(r["acc"], r["acc_norm"], r["n"]) for r in results.values()] == [(1.0, 0.0, 2), (0.0, 1.0, 2)]


@pytest.mark.parametrize("line, message", [
    ('{"context": "c", "choices": [" a", " b"]}', r"bad\.jsonl:2: missing key label"),
    ('{"context": "c", "choices": [" a", " b"], "label": 2}', r"bad\.jsonl:2: label 2 out of range for 2 choices"),
    ('{"context": "c", "choices": [" a", " b"], "label": true}', r"bad\.jsonl:2: label must be an integer"),
    ('{"context": "c", "choices": " a", "label": 0}', r"bad\.jsonl:2: choices must be a list"),
    ('{"context": 3, "choices": [" a", " b"], "label": 0}', r"bad\.jsonl:2: context must be a string"),
    ('["c", [" a", " b"], 0]', r"bad\.jsonl:2: expected an object"),
    ('{"context": "c",', r"bad\.jsonl:2: not valid JSON"),
])
def test_malformed_jsonl_names_file_line_and_problem(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"context": "c", "choices": [" a", " b"], "label": 1}', line])
    with pytest.raises(ValueError, match=message):
        load_task(str(path))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'; known tasks: piqa, arc_easy, boolq, arc_challenge, "
                                         r"hellaswag, winogrande, openbookqa, rte \(zero-shot\), "
                                         r"wikitext2, c4, ptb \(perplexity\)"):
        load_task("mmlu")


def test_missing_data_directory_names_path_and_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'absent'}.*--data-dir .*or set SDSENGINE_DATA_DIR"):
        load_task("piqa", data_dir=tmp_path / "absent")


def test_missing_data_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'arc' / 'ARC-Easy-test.json'} not found"):
        load_task("arc_easy", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="task file .*absent.jsonl not found"):
        load_task(str(tmp_path / "absent.jsonl"))


def test_bad_name_fails_before_any_evaluation(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", [{"context": "c", "choices": [" a", " b"], "label": 0}])
    model = fixed_model(tokenizer, {})
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluate(model, tokenizer, [str(good), "nope"], progress=False)
    assert model.rows == 0


def test_a_choice_that_cannot_be_scored_in_a_later_task_fails_before_any_evaluation(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", [{"context": "c", "choices": [" a", " b"], "label": 0}])
    long = write_jsonl(tmp_path / "long.jsonl", [{"context": "c", "choices": [" a", " b" * 100], "label": 0}])
    model = fixed_model(tokenizer, {})
    with pytest.raises(ValueError, match=r"long\.jsonl: item 0, choice 1: a continuation of \d+ tokens does not "
                                         r"fit the 64-token window"):
        evaluate(model, tokenizer, [str(good), str(long)], progress=False)
    assert model.rows == 0
    small = FixedLogProbs(torch.full((100,), -math.log(100)))  # a vocabulary without the space's token
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"context": "c", "choices": ["a", "b"], "label": 0}])
    with pytest.raises(ValueError, match=r"good\.jsonl: the tokenizer's ids \(is it the model's tokenizer\?\)"):
        evaluate(small, tokenizer, [str(plain), str(good)], progress=False)
    assert small.rows == 0


# ---- adapters on the real files ---------------------------------------------------------------------------

@needs_data
def test_piqa_adapter():
    items = load_task("piqa", DATA_DIR)
    assert len(items) == 1838 and sum(item.label for item in items) == 928
    first = items[0]
    assert first.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first.choices[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding "
                                       "made of ripped paper strips")
    assert first.choices[1].startswith(" Provide the guinea pig with a cage full of a few inches of bedding "
                                       "made of ripped jeans material")
    assert first.label == 0


@needs_data
def test_arc_easy_adapter():
    items = load_task("arc_easy", DATA_DIR)
    assert len(items) == 2376
    assert sorted({len(item.choices) for item in items}) == [3, 4, 5]
    assert items[0] == Item("Question: Which statement best explains why photosynthesis is the foundation of "
                            "most food webs?\nAnswer:",
                            (" Sunlight is the source of energy for nearly all ecosystems.",
                             " Most ecosystems are found on land instead of in water.",
                             " Carbon dioxide is more available than other gases.",
                             " The producers in all ecosystems are plants."), 0)


@needs_data
def test_boolq_adapter():
    items = load_task("boolq", DATA_DIR)
    assert len(items) == 3270 and sum(item.label for item in items) == 2033  # the paper's 62.2% "yes"
    first = items[0]
    assert first.context.startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert first.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert (first.choices, first.label) == ((" no", " yes"), 0)


@needs_data
def test_hub_rows_of_the_shipped_tasks_give_the_release_files_items(hub):
    """Hub rows written out by hand in each dataset's schema from the release files' first records: the
    adapters turn both into the same items (SuperGLUE's BoolQ passage carries the title, its label is 0/1)."""
    piqa_doc = json.loads((DATA_DIR / "piqa/valid.jsonl").read_text().splitlines()[0])
    hub.rows = [{**piqa_doc, "label": 0}]
    assert load_task("piqa") == load_task("piqa", DATA_DIR)[:1]
    boolq_doc = json.loads((DATA_DIR / "boolq/dev.jsonl").read_text().splitlines()[0])
    hub.rows = [{"question": boolq_doc["question"], "passage": boolq_doc["title"] + " -- " + boolq_doc["passage"],
                 "idx": 0, "label": int(boolq_doc["answer"])}]
    assert load_task("boolq") == load_task("boolq", DATA_DIR)[:1]
    hub.rows = json.loads((DATA_DIR / "arc/ARC-Easy-test.json").read_text())[:1]
    assert load_task("arc_easy") == load_task("arc_easy", DATA_DIR)[:1]
    assert [call[0] for call in hub.calls] == [("baber/piqa", None), ("aps/super_glue", "boolq"),
                                               ("allenai/ai2_arc", "ARC-Easy")]


@needs_data
@pytest.mark.parametrize("task", ["piqa", "arc_easy", "boolq"])
def test_limit_keeps_the_first_items(task):
    assert load_task(task, DATA_DIR, limit=5) == load_task(task, DATA_DIR)[:5]
