"""What a compiled step sends between devices: the collectives of its optimised HLO, with bytes.

Why from the compiled text: the sharding propagation and the SPMD partitioner decide the
collectives after tracing, so only the compiled module says what really moves (an activation
all-gather that a reshape forced, a parameter-gradient all-reduce). Bytes are the op's output
size, summed over tuple outputs (the all-reduce combiner merges many gradients into one op):
for an all-gather that is the gathered array each device ends with, for an all-reduce the
reduced array. Ops inside a loop body are listed once; callers that need per-step totals
compile without layer scans (``ModelConfig.scan_layers=False``) so each layer has its own ops.
"""

from __future__ import annotations

import dataclasses
import math
import re

OPS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4, "u32": 4,
               "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_OP = re.compile(r"= (?P<type>.*?) (?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # one of OPS
    nbytes: int  # output size in bytes (all tuple elements)
    name: str  # the op_name metadata: the JAX source path that produced it ("" if none)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled module's text (``compiled.as_text()``), in order.
    ``-done`` halves of async pairs are not matched (their ``-start`` carries the shape)."""
    out = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if match is None:
            continue
        arrays = _ARRAY.findall(match.group("type"))
        if match.group("start") and match.group("op") in ("all-gather", "collective-permute"):
            arrays = arrays[-1:]  # an async start's type is (operand, result): count the result
        nbytes = sum(math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES.get(dtype, 4)
                     for dtype, dims in arrays)
        name = _NAME.search(line)
        out.append(Collective(match.group("op"), nbytes, name.group(1) if name else ""))
    return out
