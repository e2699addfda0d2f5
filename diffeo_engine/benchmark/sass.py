"""SASS accounting for the static cost report: parse a ``cuobjdump -sass`` listing, class
its instructions, find its loops and weight each instruction by the launcher's loop trips.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["CLASSES", "parse_sass", "sass_cost"]

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")

CLASSES = (
    ("global load", ("LDG",)),
    ("global store", ("STG",)),
    ("local (spill)", ("LDL", "STL")),
    ("shared", ("LDS", "STS", "LDSM", "STSM")),
    ("special function", ("MUFU",)),
    ("fp32", ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND")),
    ("fp64", ("DADD", "DMUL", "DFMA", "DSETP")),
    ("conversion", ("F2I", "I2F", "F2F", "I2FP", "F2FP", "F2IP", "FRND")),
    ("integer", ("IMAD", "IADD3", "IADD", "LOP3", "SHF", "ISETP", "LEA", "IMNMX", "IABS",
                 "VIADD", "VIMNMX", "POPC", "FLO", "BREV", "IMUL", "SGXT", "BMSK", "LOP")),
    ("move / select", ("MOV", "SEL", "PRMT", "S2R", "CS2R", "P2R", "R2P", "LDC", "S2UR",
                       "R2UR", "PLOP3")),
    ("uniform datapath", ("U",)),
    ("shuffle / vote", ("SHFL", "VOTE", "MATCH", "REDUX")),
    ("control", ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "BAR", "WARPSYNC", "NOP",
                 "YIELD", "DEPBAR", "MEMBAR", "ERRBAR", "CCTL", "ELECT")),
)  # fmt: skip


def _class_of(opcode: str) -> str:
    base = opcode.split(".")[0]
    for name, prefixes in CLASSES:
        if name == "uniform datapath":
            if base.startswith("U") and base not in ("UNKNOWN",):
                return name
            continue
        if base in prefixes:
            return name
    return "other"


def _width(opcode: str) -> int:
    """Bits per thread of a global access: ``.128``/``.64``/``.U8``/``.U16``, else 32."""
    for token, bits in ((".128", 128), (".64", 64), (".U8", 8), (".S8", 8), (".U16", 16),
                        (".S16", 16)):  # fmt: skip
        if token in opcode:
            return bits
    return 32


def parse_sass(text: str) -> list[dict]:
    """Instructions ``{addr, op, pred, rest}`` of the first function in a SASS listing."""
    out = []
    for m in _LINE.finditer(text):
        out.append(
            {"addr": int(m.group(1), 16), "pred": (m.group(2) or "").strip(), "op": m.group(3),
             "rest": m.group(4)}
        )  # fmt: skip
    return out


def _target(ins: dict) -> int | None:
    m = re.match(r"\s*(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins["rest"])
    return int(m.group(1), 16) if m and m.group(1) else None


def _loops(code: list[dict]) -> list[tuple[int, int]]:
    """Index ranges ``[start, end]`` of loops: a branch back to an earlier instruction."""
    index = {ins["addr"]: k for k, ins in enumerate(code)}
    loops = []
    for k, ins in enumerate(code):
        if ins["op"].startswith("BRA"):
            t = _target(ins)
            if t is not None and t <= ins["addr"] and t in index:
                loops.append((index[t], k))
    return sorted(loops, key=lambda r: (r[0], -r[1]))


def _nest(loops: list[tuple[int, int]]) -> list[dict]:
    roots: list[dict] = []
    stack: list[dict] = []
    for start, end in loops:
        node = {"range": (start, end), "children": []}
        while stack and not (stack[-1]["range"][0] <= start and end <= stack[-1]["range"][1]):
            stack.pop()
        (stack[-1]["children"] if stack else roots).append(node)
        stack.append(node)
    return roots


def sass_cost(text: str, loops_plan: tuple) -> dict:
    """Static SASS counts, and dynamic counts per thread with the launcher's loop trips.

    Loops that store nothing to global memory are libdevice slow paths (``sinf``/``cosf``
    range reduction for arguments beyond ~1e5 radians, never reached by Box-Muller's
    angles in ``[0, 2 pi)``): they and the branch that guards them count zero times, as do
    subroutines reached by ``CALL`` (slow paths of ``sqrt``/division). The remaining loops
    must nest like ``loops_plan``; each instruction then counts once per enclosing trip.
    """
    code = [ins for ins in parse_sass(text) if ins["op"] != "NOP"]
    # subroutines (CALL targets) sit after the last EXIT: slow paths, counted zero times
    calls = [_target(i) for i in code if i["op"].startswith("CALL")]
    first_sub = min((t for t in calls if t is not None), default=None)
    weight = [1.0] * len(code)
    for k, ins in enumerate(code):
        if first_sub is not None and ins["addr"] >= first_sub:
            weight[k] = 0.0
        if ins["op"] == "BRA" and _target(ins) == ins["addr"]:
            weight[k] = 0.0  # the self-loop after EXIT
    loops = [(s, e) for s, e in _loops(code) if weight[e] > 0]
    main, rare = [], []
    for s, e in loops:
        stores = any(code[k]["op"].startswith("STG") for k in range(s, e + 1))
        (main if stores else rare).append((s, e))
    index = {ins["addr"]: k for k, ins in enumerate(code)}
    for s, e in rare:
        lo, hi = s, e
        for k in range(s - 1, max(s - 64, -1), -1):  # the forward branch around the slow path
            t = _target(code[k]) if code[k]["op"].startswith("BRA") else None
            if code[k]["pred"] and t is not None and t > code[e]["addr"] and t in index:
                lo, hi = k + 1, max(hi, index[t] - 1)
                break
        for k in range(lo, hi + 1):
            weight[k] = 0.0
    tree = _nest(main)
    plan = loops_plan if _match(tree, loops_plan) else _collapse(loops_plan)
    matched = _match(tree, plan)
    if matched:
        _apply(tree, plan, weight)
    static = Counter(_class_of(i["op"]) for i in code if not i["op"].startswith("NOP"))
    dynamic: Counter = Counter()
    widths: Counter = Counter()
    static_widths: Counter = Counter()
    for k, ins in enumerate(code):
        dynamic[_class_of(ins["op"])] += weight[k]
        if ins["op"].startswith(("LDG", "STG")):
            key = f"{ins['op'][:3]}.{_width(ins['op'])}"
            widths[key] += weight[k]
            static_widths[key] += 1
    return {
        "static_instructions": len(code),
        "static_mix": dict(sorted(static.items())),
        "loops_matched": matched,
        "main_loops": len(main),
        "slow_path_loops": len(rare),
        "dynamic_per_thread": sum(weight) if matched else None,
        "dynamic_mix_per_thread": dict(sorted(dynamic.items())) if matched else None,
        "global_access_widths_static": dict(sorted(static_widths.items())),
        "global_access_widths_per_thread": dict(sorted(widths.items())) if matched else None,
    }


def _collapse(plan: tuple) -> tuple:
    """The plan with loops of at most one trip per program replaced by their bodies: the
    compiler turns such a loop into a branch (e.g. a tile loop over one tile)."""
    out: tuple = ()
    for trips, inner in plan:
        out += _collapse(inner) if trips <= 1 else ((trips, _collapse(inner)),)
    return out


def _match(tree: list[dict], plan: tuple) -> bool:
    if len(tree) != len(plan):
        return False
    return all(_match(node["children"], inner) for node, (_, inner) in zip(tree, plan))


def _apply(tree: list[dict], plan: tuple, weight: list[float]) -> None:
    for node, (trips, inner) in zip(tree, plan):
        start, end = node["range"]
        for k in range(start, end + 1):
            weight[k] *= trips
        _apply(node["children"], inner, weight)
