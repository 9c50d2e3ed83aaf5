"""Zero-shot multiple-choice accuracy by log-likelihood, computed as lm-evaluation-harness does.

For an item with context c and choices x_1..x_k, ll_j = sum_t log p(x_j[t] | c, x_j[<t]) over the tokens of
x_j (an item with one context per choice, Winogrande's, conditions x_j on its own c_j). acc takes
argmax_j ll_j; acc_norm takes argmax_j ll_j / len(x_j), the length in characters without the leading " "
delimiter (lm-eval's `lls / completion_len` over doc_to_choice). Ties go to the first choice, as with
np.argmax. Stderr is the standard error of the mean over items (lm-eval's mean_stderr; None for one item).

Tokenization follows lm-eval's HF model: no special tokens (Gemma models excepted: lm-eval gives them their
BOS, without which they score far worse), trailing context whitespace moved onto the continuation, the
continuation's tokens taken from encode(context + continuation) after the context's.
Where the tokenizer merges across the boundary, context and continuation are encoded apart instead
(lm-eval v0.4 splits the whole encoding at the context's length regardless). An empty context is
replaced by the BOS token, or EOS where there is none, and so is a context the tokenizer encodes to no
tokens. Sequences longer than the model's window lose tokens from the left. evaluate_zeroshot runs the
model in eval mode (and leaves it in the mode it came in); loglikelihoods expects it there.
"""
import contextlib
import inspect
import itertools
import math
from collections import defaultdict

import torch
from tqdm import tqdm

from sdsengine.eval.checks import eval_device, non_finite
from sdsengine.eval.streamed import final_states
from sdsengine.eval.tasks import TASKS, Item, load_task
from sdsengine.pipeline.adapters import check_ids, eval_mode

__all__ = ["Item", "TASKS", "load_task", "evaluate_zeroshot", "encode_task", "encode_items", "encode_pair",
           "check_pair_ids", "wants_bos", "loglikelihoods", "predictions", "item_records", "model_max_length"]

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer names a window
BATCH_SIZE = 8  # inputs per forward by default (--batch-size)


def evaluate_zeroshot(model, tokenizer, items, batch_size=BATCH_SIZE, device=None, max_length=None,
                      desc="zero-shot", progress=True, samples=None, weights=None, pairs=None) -> dict:
    """acc, acc_norm and their standard errors over `items` (a list of Item), and n. `samples`: a list that
    receives one record per item (see item_records), for looking at answers rather than scores. weights: as
    loglikelihoods'. pairs: the items' encode_task, where the caller has it (eval/runner.py encodes every task's
    before any runs)."""
    if not items:
        raise ValueError("no items to evaluate")
    max_length = max_length or model_max_length(model, tokenizer)
    pairs = encode_task(model, tokenizer, items, max_length, desc) if pairs is None else pairs
    with eval_mode(model):
        lls = loglikelihoods(model, pairs, batch_size, device, max_length, desc, progress, weights)
    preds = predictions(items, lls)
    if samples is not None:
        samples.extend(item_records(items, lls, preds))
    acc = sum(pred == item.label for (pred, _), item in zip(preds, items)) / len(items)
    acc_norm = sum(pred == item.label for (_, pred), item in zip(preds, items)) / len(items)
    return {"acc": acc, "acc_stderr": _stderr(acc, len(items)),
            "acc_norm": acc_norm, "acc_norm_stderr": _stderr(acc_norm, len(items)), "n": len(items)}


# ---- tokenization ----------------------------------------------------------------------------------------

def encode_task(model, tokenizer, items, max_length=None, desc="zero-shot") -> list[tuple[list[int], list[int]]]:
    """encode_items as `model` is scored: with the BOS it wants, in its window (default: model_max_length)."""
    return encode_items(tokenizer, items, wants_bos(model), max_length or model_max_length(model, tokenizer), desc)


def encode_items(tokenizer, items, bos, max_length, desc) -> list[tuple[list[int], list[int]]]:
    """Every choice's encode_pair, item after item; a choice that cannot be scored (no tokens, longer than
    the window, an empty context with nothing to condition on) is named by task, item and choice here,
    before any model time."""
    pairs = []
    for index, item in enumerate(items):
        for choice, (context, continuation) in enumerate(item.requests()):
            try:
                pair = encode_pair(tokenizer, context, continuation, bos)
                _window(*pair, max_length)
            except ValueError as exc:
                raise ValueError(f"{desc}: item {index}, choice {choice}: {exc}") from None
            pairs.append(pair)
    return pairs


def encode_pair(tokenizer, context: str, continuation: str, bos=False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval builds them for a causal LM; `bos`: the context starts with
    the BOS token (lm-eval's add_bos_token)."""
    # BPE vocabularies attach a space to the word after it, so "Answer: " + "yes" is scored as
    # "Answer:" + " yes".
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = _encode(tokenizer, context) if context else []
    if not ctx:  # empty, or text the tokenizer's normalizer drops whole (control characters): nothing to condition on
        return [_prefix_token(tokenizer)], _encode(tokenizer, continuation)
    prefix = [_prefix_token(tokenizer)] if bos else []
    whole = _encode(tokenizer, context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return prefix + ctx, whole[len(ctx):]
    # A token spans the boundary: splitting `whole` at len(ctx) would score context text as answer text (or, where
    # the merged token is one a lossy vocabulary reads as its unknown token, as the context's, leave no answer).
    return prefix + ctx, _encode(tokenizer, continuation)


def wants_bos(model) -> bool:
    """lm-eval's HF model turns add_bos_token on for Gemma models (their scores collapse without it), and
    leaves it off for every other causal LM."""
    return "gemma" in str(getattr(getattr(model, "config", None), "model_type", ""))


def _encode(tokenizer, text: str) -> list[int]:
    # lm-eval adds no BOS for causal LMs unless asked (add_bos_token), so the numbers compare only without it.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _prefix_token(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("an empty context needs a BOS or EOS token to condition on; the tokenizer has neither")
    return token


def model_max_length(model, tokenizer=None) -> int:
    """The context window, looked up in lm-eval's order: model config, then tokenizer, then 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (about 1e30) instead of None.
    return int(limit) if limit and limit < 1e12 else DEFAULT_MAX_LENGTH


# ---- scoring ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def loglikelihoods(model, pairs, batch_size=BATCH_SIZE, device=None, max_length=None, desc="loglikelihood",
                   progress=True, weights=None) -> list[float]:
    """Summed log-probability of each (context ids, continuation ids) pair's continuation. weights: a
    streaming.WeightStream that lends a skeleton `model` its weights a layer at a time (streamed.py; on `device`, by
    default the CPU); each input then runs alone (batch_size 1), as the loaded model's do at batch_size=1, bit for
    bit."""
    device = eval_device(model, device, weights)
    max_length = max_length or model_max_length(model)
    check_pair_ids(model, pairs, desc)
    windows, users, order = _inputs(pairs, max_length)
    keeps_logits = _keeps_logits(model)
    out = [0.0] * len(pairs)
    if weights is None or not order:
        streamed = contextlib.nullcontext()
    else:  # the stand-ins hand on one input's final states per call, in this order
        batch_size, streamed = 1, final_states(model, _by_length(order), weights, device, progress)
    with streamed, tqdm(total=len(pairs), desc=desc, unit="choice", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            requests = [[(i, windows[i][1]) for i in users[inp]] for inp in batch]
            # Only the scored positions need logits: the earliest one in the batch onwards.
            first = min(len(inp) - _span(reqs) for inp, reqs in zip(batch, requests)) if keeps_logits else 0
            logits = _forward(model, batch, device, first)
            for row, (inp, reqs) in enumerate(zip(batch, requests)):
                _score_row(logits[row], len(inp) - first, reqs, out)
                bar.update(len(reqs))
            if not all(math.isfinite(out[i]) for inp in batch for i in users[inp]):
                raise ValueError(non_finite(model, desc))
    return out


def check_pair_ids(model, pairs, desc):
    """Refuses (context, continuation) ids past the model's vocabulary (another model's tokenizer), naming `desc`."""
    if pairs:
        check_ids(model, torch.tensor([i for ctx, cont in pairs for i in (*ctx, *cont)]),
                  f"{desc}: the tokenizer's ids (is it the model's tokenizer?)")


def _inputs(pairs, max_length):
    """(windows, users, order): each pair's (model input, scored tokens), the pairs each distinct model input serves,
    and the distinct inputs in the order they run."""
    windows = [_window(ctx, cont, max_length) for ctx, cont in pairs]
    # Pairs with the same model input (one-token answers such as BoolQ's " no"/" yes") share one row.
    users = defaultdict(list)
    for index, (inp, _) in enumerate(windows):
        users[inp].append(index)
    # Longest first, as lm-eval: batches hold similar lengths, and running out of memory shows at once.
    return windows, users, sorted(users, key=lambda inp: (-len(inp), inp))


def streamed_groups(model, tokenizer, pairs, max_length=None) -> list:
    """The windows a streamed evaluate_zeroshot(model, tokenizer, items, pairs=pairs) runs (pairs: the items'
    encode_task), as final_states takes them, in its order (eval/streamed.py: several tasks' windows in one pass over
    the layers)."""
    return _by_length(_inputs(pairs, max_length or model_max_length(model, tokenizer))[2])


def _by_length(order):
    """The inputs of `order` (longest first) as one (inputs, length) id tensor per length, in that order."""
    return [torch.tensor(list(run)) for _, run in itertools.groupby(order, key=len)]


def _window(ctx, cont, max_length):
    """(model input, scored tokens): the input is context + continuation without its last token."""
    if not cont:
        raise ValueError("a continuation encodes to no tokens; choices must be non-empty")
    if len(cont) > max_length:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit the {max_length}-token window")
    full = (list(ctx) + list(cont))[-(max_length + 1):]
    return tuple(full[:-1]), tuple(cont)


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes transformers' logits_to_keep (most causal LMs since 4.50)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward(model, inputs, device, first=0):
    """The logits of the padded batch from position `first` on (a model without logits_to_keep: first=0)."""
    ids = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
    for row, inp in enumerate(inputs):
        ids[row, :len(inp)] = torch.tensor(inp)
    # Right padding needs no attention mask in a causal LM: no real token attends to a later position,
    # so pads cannot change a scored logit (lm-eval relies on the same), and the causal kernel path is kept.
    # The vocabulary projection of the unscored positions is skipped: a fifth of a small model's time, and
    # batch x length x vocabulary logits are gigabytes for a large vocabulary.
    keep = {"logits_to_keep": ids.shape[1] - first} if first else {}
    return model(ids.to(device), use_cache=False, **keep).logits


def _span(requests) -> int:
    return max(len(targets) for _, targets in requests)


def _score_row(logits, length, requests, out):
    """Write into `out` the log-likelihood of each (index, targets) whose last token ends at `length`."""
    span = _span(requests)
    logp = logits[length - span:length].float().log_softmax(-1)
    for index, targets in requests:
        ids = torch.tensor(targets, device=logp.device).unsqueeze(-1)
        out[index] = float(logp[span - len(targets):].gather(-1, ids).sum())


def predictions(items, lls) -> list[tuple[int, int]]:
    """(acc prediction, acc_norm prediction) per item, from the flat list of per-choice log-likelihoods."""
    preds = []
    for item, scores in zip(items, _per_item(items, lls)):
        normed = [score / _norm_length(choice) for score, choice in zip(scores, item.choices)]
        preds.append((_argmax(scores), _argmax(normed)))
    return preds


def item_records(items, lls, preds) -> list[dict]:
    """Per item, in order: its index, label, the acc and acc_norm predictions and each choice's
    log-likelihood (lm-eval's --log_samples, reduced to what comparing two models' answers needs)."""
    return [{"index": index, "label": item.label, "pred": pred, "pred_norm": pred_norm,
             "choices": list(item.choices), **({"contexts": list(item.contexts)} if item.contexts else {}),
             "loglikelihoods": scores}
            for index, (item, scores, (pred, pred_norm)) in enumerate(zip(items, _per_item(items, lls), preds))]


def _per_item(items, lls):
    """The flat per-choice log-likelihoods, cut into one list per item."""
    start = 0
    for item in items:
        yield lls[start:start + len(item.choices)]
        start += len(item.choices)


def _norm_length(choice: str) -> int:
    # lm-eval divides by len(doc_to_choice), the choice before the " " delimiter is put in front of it;
    # a choice of only that space would divide by zero there, here by one.
    return max(1, len(choice) - choice.startswith(" "))


def _argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _stderr(p: float, n: int) -> float | None:
    # Sample standard deviation over sqrt(n) for 0/1 scores, as lm-eval's mean_stderr. None for one item
    # (undefined there; NaN would make the --json file invalid JSON).
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
