"""Run checks in child processes, so that one which kills its process fails alone.

A kernel that traps can leave the CUDA context unusable for every later kernel of the process, and one that
hangs never returns. The backends' self-checks (ops) and the GPU tests therefore run their items in a child
Python that reports each one; when the child dies or hangs, the item it was in fails with how it ended, and
a new child goes on with the rest.

The child protocol: `python -c CODE START ITEM...`; CODE runs the items from index START, printing
"CASE i" before item i and "RESULT i text" after it, flushing each line.
"""
import re
import subprocess
import sys


def run_child(code, args=(), timeout_s=300, cwd=None):
    """(stdout, None) if `code` with `args` exited cleanly in a child Python, else (stdout, the last line of
    its error output, or how it ended)."""
    try:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        return _text(exc.stdout), f"no result within {timeout_s} s"
    except OSError as exc:
        return "", f"did not run: {exc}"
    if done.returncode == 0:
        return done.stdout, None
    return done.stdout, f"exit status {done.returncode}: {_reason(done.stderr or done.stdout)}"


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")


def _reason(output):
    """The exception's own line: a CUDA error's message is followed by lines of advice that name nothing
    (the last of them: "Compile with `TORCH_USE_CUDA_DSA` ..."). Else the last line."""
    lines = output.strip().splitlines() or ["no output"]
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1])


def run_isolated(code, items, timeout_s=300, cwd=None, family=None):
    """{item index: the text its RESULT line gave, or why it has none}. The item a child ended in gets the
    child's end; with `family` (item -> key), so do the later items of its family, unrun (a kernel that traps
    would otherwise cost a process start per item). A child that ends before its first item fails every item
    left: it could not have run any."""
    results, pending = {}, list(range(len(items)))
    while pending:
        output, failure = run_child(code, ["0", *(items[i] for i in pending)], timeout_s, cwd)
        reached = None
        for line in output.splitlines():
            kind, _, rest = line.partition(" ")
            index, _, text = rest.partition(" ")
            if kind == "CASE":
                reached = int(index)
            elif kind == "RESULT":
                results[pending[int(index)]] = text
        if failure is None:
            break
        if reached is None:
            results.update({i: f"the process ended before its first item ({failure})" for i in pending})
            break
        crashed = pending[reached]
        results.setdefault(crashed, f"the process died ({failure})")
        rest = pending[reached + 1:]
        if family is not None:
            same = [i for i in rest if family(items[i]) == family(items[crashed])]
            results.update({i: f"not run: item {crashed} of its family ended the process" for i in same})
            rest = [i for i in rest if i not in same]
        pending = rest
    return {i: results.get(i, "the process reported no result") for i in range(len(items))}


def _text(output):
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""
