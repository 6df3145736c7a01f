"""Kernel statistics of an optimized HLO module (`compiled.as_text()`), attributed to source."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}\]])([a-z][a-z0-9\-_]*)\(")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)="
                    r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")
_FIELD = re.compile(r"(\w+)=(\d+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
HOST_OPCODES = ("send", "recv", "send-done", "recv-done", "infeed", "outfeed")
HOST_TARGETS = re.compile(r"callback|python|host", re.IGNORECASE)
ATTRIBUTED = ("gather", "scatter", "while", "sort", "custom-call", "conditional", "transpose",
              "copy")
WATCHED = ("fusion", "copy", "transpose", "while", "conditional", "call", "custom-call", "gather",
           "scatter", "dot", "convolution", "sort", "reduce", "rng-bit-generator")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_OPERAND = re.compile(r"\b(?:copy|transpose)\(%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _source_tables(text: str):
    """stack_frame_id -> 'file.py:line' of the innermost frame in this project (or any)."""
    tables, section = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {},
                       "StackFrames": {}}, None
    for line in text.splitlines():
        if line.strip() in tables:
            section = line.strip()
            continue
        if section and not line.strip():
            section = None
            continue
        row = _TABLE_ROW.match(line) if section else None
        if row:
            value = row.group(2)
            tables[section][int(row.group(1))] = (value.strip('"') if value.startswith('"')
                                                  else dict((k, int(v)) for k, v in
                                                            _FIELD.findall(value)))
    files, locations, frames = (tables["FileNames"], tables["FileLocations"],
                                tables["StackFrames"])

    def where(frame_id: int) -> str:
        first, seen = None, set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location = locations.get(frames[frame_id].get("file_location_id"), {})
            name = files.get(location.get("file_name_id"), "?")
            text = f"{Path(name).name}:{location.get('line', '?')}"
            first = first or text
            if "spectralmoe_jax" in name or "scripts" in name:
                return text
            frame_id = frames[frame_id].get("parent_frame_id")
        return first or "?"

    return where


def _parse(text: str):
    """computation -> [(name, opcode, line)], how each computation is called, and, for the
    computations called by a fusion or a loop, the calling instruction's line."""
    computations, current = {}, None
    references, callers = {}, {}
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and " = " not in line:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                references[current] = "entry"
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        op = _opcode(instruction.group(1))
        computations[current].append((_NAME.match(line).group(1), op, line))
        for kind, name in _CALLS.findall(line):
            if kind == "calls":
                references[name] = "fused"
            elif kind == "to_apply":
                references.setdefault(name, "call" if op == "call" else "applied")
            else:
                references.setdefault(name, "control")
            callers.setdefault(name, (current, line))
        for branches in _BRANCHES.findall(line):
            for name in re.findall(r"%?([\w.\-]+)", branches):
                references.setdefault(name, "control")
                callers.setdefault(name, (current, line))
    return computations, references, callers


def _loop_of(computation: str, references, callers) -> str:
    """'entry', or 'loop <op_name of the while>' for code that runs in a loop body."""
    seen = set()
    while computation in callers and computation not in seen:
        seen.add(computation)
        parent, line = callers[computation]
        if references.get(computation) == "control":
            op_name = _OP_NAME.search(line)
            return "loop " + (op_name.group(1) if op_name else parent)
        computation = parent
    return "entry"


def hlo_stats(text: str) -> dict:
    """Counts in an optimized HLO module (`compiled.as_text()`).

    `kernels`: instructions of the entry computation and of control flow (while bodies and
    conditions, conditional branches, calls): what runs as separate kernels or loops, by
    opcode. `fused`: instructions inside fusions. Reducer computations (`to_apply` of reduce,
    scatter, sort) are not counted. `copies` and `transposes` count both (the issue-20 count).
    Gathers, scatters, loops, sorts, transposes, copies and custom calls are attributed to the
    innermost project source line that emitted them (that of their fusion when they carry
    none); `copy_transpose_kinds` groups copies and transposes by what they read (a broadcast:
    a buffer initialised; a dynamic-slice: a loop reading its stacked input; ...) and where
    they run (the entry computation, or the loop named by its op_name). `collectives` counts
    the cross-device operations (async start/done pairs once). `host_transfers` lists
    whatever leaves the device: send/recv, infeed/outfeed, and custom calls whose target names
    a (Python) callback.
    """
    where = _source_tables(text)
    computations, references, callers = _parse(text)

    def kind_of(name):  # a computation called from inside a fusion is fused too
        return references.get(name, "control")

    def source_of(line, computation):
        frame = _FRAME.search(line)
        if not frame and kind_of(computation) == "fused" and computation in callers:
            parent, caller_line = callers[computation]  # the fusion's own source line
            return source_of(caller_line, parent)
        return where(int(frame.group(1))) if frame else "?"

    kernels, fused, fusion_kinds, targets = Counter(), Counter(), Counter(), Counter()
    collectives, copy_kinds = Counter(), Counter()
    by_source: dict[str, Counter] = {}
    host = []
    for name, instructions in computations.items():
        kind = kind_of(name)
        if kind == "applied":
            continue
        opcodes = {n: op for n, op, _ in instructions}
        for _, op, line in instructions:
            if op is None or op in ("parameter", "constant", "get-tuple-element", "tuple",
                                    "bitcast"):
                continue
            (fused if kind == "fused" else kernels)[op] += 1
            if op == "fusion":
                fusion_kinds[(re.search(r"kind=(\w+)", line) or [None, "?"])[1]] += 1
            if op == "custom-call":
                target = (_TARGET.search(line) or [None, "?"])[1]
                targets[target] += 1
                if HOST_TARGETS.search(target):
                    host.append(target)
            if op in HOST_OPCODES:
                host.append(op)
            base = op.removesuffix("-start")
            if base in COLLECTIVES and not op.endswith("-done"):
                collectives[base] += 1
            if op in ATTRIBUTED:
                by_source.setdefault(op, Counter())[source_of(line, name)] += 1
            if op in ("copy", "transpose"):
                operand = _OPERAND.search(line)
                read = opcodes.get(operand.group(1), "?") if operand else "?"
                place = "fused" if kind == "fused" else "kernel"
                loop = _loop_of(name, references, callers)
                copy_kinds[f"{op} of {read} ({place}, {loop})"] += 1
    count = lambda op: kernels[op] + fused[op]  # noqa: E731
    return {
        "computations": len(computations),
        "kernels_total": sum(kernels.values()),
        "kernels": {op: kernels[op] for op in WATCHED if kernels[op]},
        "fused": {op: fused[op] for op in WATCHED if fused[op]},
        "fusion_kinds": dict(fusion_kinds),
        "custom_call_targets": dict(targets),
        "cudnn_attention_calls": sum(n for t, n in targets.items() if "fmha" in t),
        "copies": count("copy"),
        "transposes": count("transpose"),
        "collectives": dict(collectives),
        "copy_transpose_kinds": dict(copy_kinds.most_common()),
        "by_source": {op: dict(c.most_common(12)) for op, c in by_source.items()},
        "host_transfers": host,
        "text_chars": len(text),
    }


def _opcode(rest: str) -> str | None:
    """The opcode of an instruction's right-hand side: the first `name(` after its shape."""
    match = _OPCODE.search(rest)
    return match.group(1) if match else None


_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r"^\s*value: <\d+ ([\w.\-]+)(\{[\d,]*\})? @\d+> \(size=(\d+),offset=\d+\): "
                    r"(\S+)")


def largest_buffers(assignment: str, text: str, top: int = 12) -> list[dict]:
    """The `top` largest buffers of an XLA buffer assignment (`--xla_dump_to`'s
    `*buffer-assignment.txt`): instruction name, shape, bytes, whether it is a parameter, an
    output or a temporary, and the op_name and project source line of the instruction in the
    optimized HLO `text`. (A GPU program packs all temporaries into one allocation, so buffers,
    not allocations, are what names the memory.)"""
    values, kind = {}, "temp"
    for line in assignment.splitlines():
        allocation = _ALLOCATION.match(line)
        if allocation:
            rest = allocation.group(3)
            kind = ("parameter" if "parameter" in rest else "output" if "output" in rest else
                    "constant" if "constant" in rest else "temp")
            continue
        value = _VALUE.match(line)
        if value:
            values[value.group(1) + (value.group(2) or "")] = (
                int(value.group(3)), value.group(1), value.group(2) or "", value.group(4), kind)
    where = _source_tables(text)
    lines = {}
    for line in text.splitlines():
        name = _NAME.match(line)
        if name:
            lines[name.group(1)] = line
    out = []
    for size, name, index, shape, kind in sorted(values.values(), reverse=True)[:top]:
        line = lines.get(name, "")
        op_name, frame = _OP_NAME.search(line), _FRAME.search(line)
        out.append({"name": name + index, "shape": shape, "size_bytes": size, "kind": kind,
                    "op_name": op_name.group(1)[-120:] if op_name else None,
                    "source": where(int(frame.group(1))) if frame else None})
    return out
