"""Registers that an in-flight wgmma still reads, overwritten before it is waited for: a check on SASS text.

wgmma.sp reads its A fragment and metadata registers asynchronously, until a wgmma.wait_group covers it, and
ptxas does not keep them intact by itself (on 11-30 it reused an in-flight stage's metadata register at a
loop's back edge). For each HGMMA group (its last HGMMA carries `gsb0`), this follows the code onward, taking
each backward branch once (the next loop iteration) and falling through forward ones, until a
`WARPGROUP.DEPBAR.LE gsb0, N` leaves at most N later groups outstanding, and reports any instruction on the
way that writes one of the group's A or metadata registers. A heuristic over one path per group, not a proof:
it can miss a write on a forward branch's taken side, and it reads the destination as the first operand.
"""
import re

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_HGMMA = re.compile(r"HGMMA\.SP\.\S+ R\d+, R(\d+), gdesc\[[^\]]*\], R\d+, R(\d+), 0x[01](, gsb0)?")
_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)")
_BRANCH = re.compile(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)")
_NO_DEST = ("ST", "RED", "ATOM", "SYNCS", "BAR", "BRA", "EXIT", "WARPGROUP", "HGMMA", "NOP", "MEMBAR", "FENCE",
            "UTMA", "UBLKCP", "DEPBAR", "BSSY", "BSYNC", "CCTL", "ERRBAR", "CGAERRBAR", "UCGABAR", "BPT", "RET", "CALL")


def instructions(sass):
    """[(address, text without its predicate, predicated)] of one function's SASS, in order."""
    out = []
    for address, text in _LINE.findall(sass):
        bare = re.sub(r"^@!?U?P\w+\s+", "", text)
        out.append((int(address, 16), bare, bare != text))
    return out


def _written(text):
    """Registers the instruction writes, by its first operand and its width."""
    opcode, _, operands = text.partition(" ")
    if opcode.startswith(_NO_DEST) or not re.match(r"R\d", operands):
        return set()
    first = int(re.match(r"R(\d+)", operands).group(1))
    width = 4 if ".128" in opcode else 2 if (".64" in opcode or ".WIDE" in opcode or opcode == "CS2R") else 1
    return set(range(first, first + width))


def overwrites(sass, max_steps=5000):
    """[(hgmma address, writing address, instruction, registers)] for each group whose operands are overwritten
    while it may be in flight."""
    code = instructions(sass)
    index = {address: i for i, (address, *_) in enumerate(code)}
    found, group = [], set()
    for i, (address, text, _) in enumerate(code):
        m = _HGMMA.search(text)
        if not m:
            continue
        a, e = int(m.group(1)), int(m.group(2))
        group |= set(range(a, a + 4)) | {e}
        if m.group(3):  # the group is committed here
            hit = _first_overwrite(code, index, i + 1, group, max_steps)
            found += [(address, *hit)] if hit else []
            group = set()
    return found


def _first_overwrite(code, index, i, registers, max_steps):
    later, taken = 0, set()  # groups committed after ours; backward branches already taken
    for _ in range(max_steps):
        if i >= len(code):
            return None
        address, text, predicated = code[i]
        if (m := _WAIT.search(text)) and later >= int(m.group(1), 16):
            return None  # at most N groups outstanding, and N later ones exist: ours is done
        if (m := _HGMMA.search(text)) and m.group(3):
            later += 1
        if hit := _written(text) & registers:
            return address, text, sorted(hit)
        if text == "EXIT" and not predicated:
            return None
        b = _BRANCH.search(text)
        if b and text.startswith("BRA"):
            target = int(b.group(1), 16)
            if target < address and address not in taken:  # the next iteration of a loop, once
                taken.add(address)
                i = index[target]
                continue
            if target > address and not predicated:
                i = index[target]
                continue
        i += 1
    return None
