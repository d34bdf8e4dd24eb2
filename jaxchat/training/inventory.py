"""The kernel inventory of an optimised XLA:GPU or XLA:TPU program (`compiled.as_text()`): library calls and Pallas
kernels, GEMMs and collectives, each counted as often as it runs per step (loop bodies times their trip counts).

    counts = inventory.count(compiled.as_text())
    counts["cudnn_attention_fwd"], counts["splash_fwd"], counts["fp8_gemms"], counts["async_collectives"]
"""

import collections
import re

from jaxchat.model.fp8 import qualifies  # the sizes of a dense layer that --fp8 runs in fp8
from jaxchat.model.gpt import LAYER_SCAN  # the op_name scope of the scan over repeated layers

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \(*(?:(\w+)\[)?.*?\s([\w\-]+)\((.*)$")
_CALLEE = re.compile(r"(?:calls|to_apply|body|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_COUNTER_BOUND = re.compile(r"compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_SPLASH = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)")  # jax.experimental.pallas.ops.tpu.splash_attention's kernels


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the entry computation's name)."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        if current is None:
            found = _COMPUTATION.match(line)
            if found:
                current = found.group(1)
                comps[current] = []
                entry = current if line.startswith("ENTRY") else entry
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, entry


STACK_ELEMENTS = 2**20  # a dynamic-update-slice into a buffer this large inside a loop writes a stacked residual


def _own_counts(line: str, name: str, opcode: str, in_async: bool, dtypes: dict[str, str],
                in_loop: bool = False) -> collections.Counter:
    """What one instruction `name` is, counted once (dtypes: the element type of each value of its computation;
    in_loop: it runs inside a while loop's body)."""
    counts = collections.Counter()
    if in_loop and opcode in COLLECTIVES + tuple(f"{op}-start" for op in COLLECTIVES):
        counts[f"loop:{opcode.removesuffix('-start')}"] += 1  # a collective in a layer or micro-batch loop
    if in_loop and opcode == "dynamic-update-slice" and LAYER_SCAN in line:
        shape = re.search(r"= \w+\[([\d,]*)\]", line)
        size = 1
        for d in (shape.group(1).split(",") if shape and shape.group(1) else []):
            size *= int(d)
        counts["loop_stacked_writes"] += size >= STACK_ELEMENTS  # the layer scan's stacked residuals for the backward
    if opcode == "custom-call" and (target := _TARGET.search(line)):
        name, kernel = target.group(1), name
        if name == "tpu_custom_call" and (splash := _SPLASH.match(kernel)):
            counts[f"splash_{splash.group(1)}"] += 1  # a Pallas kernel's call is named after it: splash_mha_dkv_...
        elif name.startswith("__cudnn$fmha"):
            counts["cudnn_attention_bwd" if name.endswith("Backward") else "cudnn_attention_fwd"] += 1
        elif name.startswith("__cublas"):
            counts["fp8_gemms" if name.endswith("$f8") else "cublas_gemms"] += 1
            counts["fp8_gemms_f32_out"] += name.endswith("$f8") and dtypes.get(kernel) == "f32"
            # a bf16 GEMM of a dense layer's size (2-D, both sizes multiples of 16, the smaller >= 128: what
            # jaxchat.model.fp8.qualifies makes fp8); Muon's stacked GEMMs are 3-D
            out = re.search(r"= \(\w+\[(\d+),(\d+)\]", line)
            counts["bf16_qualifying_gemms"] += (not name.endswith("$f8") and dtypes.get(kernel) == "bf16" and out
                                                is not None and qualifies(*map(int, out.groups())))
            operands = re.search(r"custom-call\(([^)]*)\)", line).group(1)
            types = [dtypes.get(o.strip().lstrip("%")) for o in operands.split(",")[:2]]  # operands by name
            counts["f32_gemms"] += types == ["f32", "f32"]
        else:
            counts[f"custom_call:{name}"] += 1
    if '"kind":"__triton_gemm"' in line:
        counts["triton_gemms"] += 1
    for op in COLLECTIVES:
        if opcode == f"{op}-start":
            counts["async_collectives"] += 1
            counts[f"async:{op}"] += 1
        elif opcode == op:
            counts["async_collectives" if in_async else "sync_collectives"] += 1
            counts[f"{'async' if in_async else 'sync'}:{op}"] += 1
    if "blocked_attention" in line:  # the op_name metadata of jaxchat's CPU attention (jaxchat.model.attention)
        counts["cpu_attention"] += 1
    return counts


def _counted_trips(comps: dict[str, list[str]], while_line: str) -> int | None:
    """The trip count of a while loop whose condition is `counter < constant` (a lax.scan, counting from 0), for
    programs that do not record it (XLA:TPU's); None if the condition is anything else."""
    condition = _CONDITION.search(while_line)
    lines = comps.get(condition.group(1), []) if condition else []
    root = next((line for line in lines if line.lstrip().startswith("ROOT")), "")
    bound = _COUNTER_BOUND.search(root)
    if not bound:
        return None
    constant = re.compile(rf"^\s*%?{re.escape(bound.group(1))} = s32\[\]\S* constant\((\d+)\)")
    return next((int(m.group(1)) for line in lines if (m := constant.match(line))), None)


def trip_count(comps: dict[str, list[str]], while_line: str) -> int | None:
    """How often a while loop's body runs: XLA's known_trip_count (XLA:GPU), else the bound of a `counter <
    constant` condition (XLA:TPU records none); None if neither says."""
    trip = _TRIP_COUNT.search(while_line)
    return int(trip.group(1)) if trip else _counted_trips(comps, while_line)


def count(hlo: str) -> collections.Counter:
    """Every counted kind, weighted by how often its computation runs per call of the entry computation.

    A while loop's body runs its trip count times: XLA's known_trip_count (XLA:GPU), or the bound of a `counter <
    constant` condition (XLA:TPU records none); 1 if neither says (counted in "unknown_trip_counts");
    a collective inside an async computation counts as async; "loop:<collective>" counts those that run inside a
    loop's body, "loop_stacked_writes" the large dynamic-update-slices there of the scan over layers (stacking what
    the backward pass needs)."""
    comps, entry = computations(hlo)
    memo = {}

    def total(name: str, in_async: bool, in_loop: bool = False) -> collections.Counter:
        if (name, in_async, in_loop) in memo:
            return memo[(name, in_async, in_loop)]
        counts = collections.Counter()
        found_lines = [(line, _INSTRUCTION.match(line)) for line in comps.get(name, [])]
        dtypes = {found.group(1): found.group(2) for _, found in found_lines if found}
        for line, found in found_lines:
            if not found:
                continue
            opcode = found.group(3)
            counts += _own_counts(line, found.group(1), opcode, in_async, dtypes, in_loop)
            trips = 1
            if opcode == "while":
                trips = trip_count(comps, line)
                counts["unknown_trip_counts"] += trips is None
                trips = trips or 1
            for callee in _CALLEE.finditer(line):
                key = line[callee.start():callee.start() + 5]
                for called in re.findall(r"%?([\w.\-]+)", callee.group(1)):
                    factor = trips if key == "body=" else 1
                    child = total(called, in_async or opcode == "async-start", in_loop or key == "body=")
                    counts += collections.Counter({k: v * factor for k, v in child.items()})
        memo[(name, in_async, in_loop)] = counts
        return counts

    return total(entry, False)
