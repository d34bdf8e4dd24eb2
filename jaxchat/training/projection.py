"""A roofline projection of one train step on a GPU from XLA's optimised program (`compiled.as_text()`): every
kernel the step launches, weighted by its loops' trip counts (jaxchat.training.inventory), timed as the slower of its
FLOPs at the GPU's peak and its bytes at the HBM's bandwidth (jaxchat.runtime.targets: peaks, bandwidths and the
efficiencies assumed), plus a launch gap; collectives on NVLink with the ring's factor, an async one hidden by the
compute scheduled between its start and its done. A model of the program XLA made, not a measurement.

    result = projection.project(compiled.as_text(), GPU_TARGETS["h100"], devices=8, tokens_per_step=2**19,
                                flops_per_token=4.9e9, steps=5568)

What it does not see: L2 reuse between kernels, kernels running concurrently, NCCL taking SMs and HBM bandwidth from
the compute it overlaps, the autotuner's picks and cuBLAS's wave quantisation; the arithmetic of elementwise
fusions (counted by their bytes only).
"""

import collections
import dataclasses
import math
import re

from jaxchat.runtime.targets import GPU_EFFICIENCY, Efficiency, GpuTarget
from jaxchat.training.inventory import COLLECTIVES, computations, trip_count

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_TO_APPLY = re.compile(r"\bto_apply=%?([\w.\-]+)")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|(?:true|false)_computation=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]')
_DOT_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_INTERMEDIATE = re.compile(r'"intermediate_tensor_shape":\s*\{[^{]*?"dimensions":\s*\[([^\]]*)\]')
_MASK = re.compile(r'"mask_type":\s*"(\w+)"')
_WINDOW = re.compile(r'"sliding_window_length":\s*"?(\d+)')
# No kernel: values passed around, loop and call plumbing, the waiting half of an async pair
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
        "opt-barrier", "add-dependency", "async-done", "copy-done", "send-done", "recv-done", "domain",
        *(f"{op}-done" for op in COLLECTIVES)}
_SLICING = ("dynamic-slice", "slice", "gather")
_NOT_ELEMENTWISE = {"reduce", "dot", "reduce-window", "scatter", "dynamic-update-slice", "sort", "custom-call",
                    "fusion", "tuple", "concatenate", "pad", "select-and-scatter", "convolution"}
# Bytes on each device's link per byte of the buffer, for a ring of n devices (all-gather: of its output)
_RING = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
         "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
         "collective-permute": lambda n: 1.0}
KINDS = ("gemm", "attention", "memory", "launch", "collective_exposed")  # the parts a step's time is the sum of


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: its name, result shape (text), opcode, operand names and the rest of its line."""

    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    rest: str


def _closing(text: str, start: int) -> int:
    """The index just past the parenthesis that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def parse(line: str) -> Instruction | None:
    """An instruction line of HLO text, or None for anything else."""
    line = _COMMENT.sub("", line)
    head = _HEAD.match(line)
    if not head:
        return None
    at = head.end()
    end = _closing(line, at) if line[at] == "(" else line.index(" ", at)
    shape = line[at:end]
    opcode_at = end + 1
    paren = line.find("(", opcode_at)
    if paren < 0:
        return None
    close = _closing(line, paren)
    operands = tuple(o.split()[-1].lstrip("%") for o in line[paren + 1:close - 1].split(",") if o.strip())
    return Instruction(head.group(1), shape, line[opcode_at:paren], operands, line[close:])


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(element type, dimensions) of each array in a shape's text (a tuple's arrays in order)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def nbytes(shape: str) -> int:
    return int(sum(DTYPE_BYTES.get(t, 0) * math.prod(dims) for t, dims in arrays(shape)))


def causal_pairs(t: int, window: int = 0) -> int:
    """(query, key) pairs a causal mask keeps in a sequence of t, each query seeing at most `window` keys
    (itself included; 0: all before it): sum over queries i of min(i + 1, window)."""
    if window <= 0 or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


@dataclasses.dataclass
class Projection:
    """A step's projected time on a target, per kind, and what follows from it."""

    target: str
    step_s: float
    tokens_per_s_per_device: float
    tokens_per_s_per_node: float  # 8 devices (a node of 8 GPUs), or all of them if fewer
    mfu: float  # nanochat's: flops_per_token * tokens/s / (peak bf16 FLOP/s * devices)
    horizon_steps: int
    horizon_s: float
    breakdown_s: dict  # gemm, attention, memory (other memory-bound kernels), launch, collective_exposed: sum to step_s
    collective_busy_s: float  # on the wire in all, hidden or not
    flops: float  # per device and step, as the kernels count them (cuBLAS GEMMs, cuDNN attention, dots in fusions)
    bytes: float  # read and written to HBM per device and step
    kernels: int
    assumptions: str = "jaxchat/runtime/targets.py (GpuTarget peaks, Efficiency)"


class _Model:
    """The program's computations, parsed, and each one's time when it runs once."""

    def __init__(self, hlo: str, gpu: GpuTarget, eff: Efficiency, devices: int, fp8_peak: float | None):
        lines, self.entry = computations(hlo)
        self.lines = lines
        self.code = {name: [i for i in map(parse, body) if i] for name, body in lines.items()}
        self.shapes = {name: {i.name: i.shape for i in code} for name, code in self.code.items()}
        self.gpu, self.eff, self.devices, self.fp8_peak = gpu, eff, devices, fp8_peak
        self.memo = {}

    def operand_bytes(self, comp: str, instr: Instruction) -> int:
        return sum(nbytes(self.shapes[comp].get(o, "")) for o in instr.operands)

    def dot_flops(self, comp: str) -> float:
        """FLOPs of the dots inside a fused computation (and the fusions it calls)."""
        flops = 0.0
        for i in self.code.get(comp, []):
            if i.opcode == "dot":
                contracting = _DOT_CONTRACTING.search(i.rest)
                lhs = arrays(self.shapes[comp].get(i.operands[0], ""))[0][1]
                k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
                flops += 2 * math.prod(arrays(i.shape)[0][1]) * k
            for called in _CALLS.findall(i.rest):
                flops += self.dot_flops(called)
        return flops

    def fusion_bytes(self, comp: str, instr: Instruction, fused: str) -> int:
        """Operands + outputs of a fusion, where a parameter only sliced counts its slices and a buffer updated in
        place (a dynamic-update-slice at the root) counts the update written, not the whole buffer."""
        code = self.code.get(fused, [])
        if not code:
            return self.operand_bytes(comp, instr) + nbytes(instr.shape)
        shapes = self.shapes[fused]
        users = collections.defaultdict(list)
        for i in code:
            for o in dict.fromkeys(i.operands):  # a value used twice by one instruction is read once
                users[o].append(i)
        by_name = {i.name: i for i in code}
        root = by_name.get(_root_name(self.lines[fused]), code[-1])
        outputs = [by_name[o] for o in root.operands if o in by_name] if root.opcode == "tuple" else [root]
        in_place, total = set(), 0
        for out in outputs:
            if out.opcode == "dynamic-update-slice":
                in_place.add(out.operands[0])
                total += nbytes(shapes.get(out.operands[1], ""))  # the update written (read: as an operand)
            else:
                total += nbytes(out.shape)
        def read(value: Instruction) -> int | None:
            """Elements of `value` read where every use of it (through elementwise ops and bitcasts) is a slice
            of it; None where some use reads all of it."""
            elements, size = 0, math.prod(arrays(value.shape)[0][1]) if arrays(value.shape) else 0
            for user in users[value.name]:
                if user.opcode in _SLICING and user.operands[0] == value.name:
                    elements += math.prod(arrays(user.shape)[0][1])
                elif user.opcode not in _NOT_ELEMENTWISE and arrays(user.shape) and \
                        math.prod(arrays(user.shape)[0][1]) == size and (inner := read(user)) is not None:
                    elements += inner
                else:
                    return None
            return elements if users[value.name] else None

        for param in (i for i in code if i.opcode == "parameter"):
            if param.name in in_place:
                continue
            sliced = read(param)
            total += nbytes(param.shape) if sliced is None else sliced * DTYPE_BYTES.get(arrays(param.shape)[0][0], 0)
        return total

    def kernel(self, comp: str, instr: Instruction) -> tuple[str, float, float, float] | None:
        """(kind, FLOPs, bytes, seconds without the launch gap) of one kernel; None if it launches none."""
        gpu, eff = self.gpu, self.eff
        memory_s = lambda b: b / (gpu.bandwidth * eff.hbm)  # noqa: E731
        if instr.opcode in FREE or instr.opcode in ("while", "call", "conditional"):
            return None
        if instr.opcode == "custom-call" and (target := _TARGET.search(instr.rest)):
            name = target.group(1)
            out = arrays(instr.shape)
            if name.startswith("__cublas"):
                lhs = arrays(self.shapes[comp].get(instr.operands[0], ""))[0][1]
                contracting = _CONTRACTING.search(instr.rest)
                k = math.prod(lhs[int(d.strip('" '))] for d in contracting.group(1).split(",") if d.strip()) \
                    if contracting else lhs[-1]
                flops = 2.0 * math.prod(out[0][1]) * k
                fp8 = name.endswith("$f8")
                peak = (self.fp8_peak or gpu.bf16_flops) * eff.gemm_fp8 if fp8 else gpu.bf16_flops * eff.gemm_bf16
                bytes_ = self.operand_bytes(comp, instr) + DTYPE_BYTES[out[0][0]] * math.prod(out[0][1])
                return "gemm", flops, bytes_, max(flops / peak, memory_s(bytes_))
            if name.startswith("__cudnn$fmha"):
                flops = self.attention_flops(instr, backward=name.endswith("Backward"))
                rate = gpu.bf16_flops * (eff.attention_bwd if name.endswith("Backward") else eff.attention_fwd)
                bytes_ = self.operand_bytes(comp, instr) + nbytes(instr.shape)
                return "attention", flops, bytes_, max(flops / rate, memory_s(bytes_))
        if instr.opcode == "fusion" and (fused := _CALLS.search(instr.rest)):
            flops = self.dot_flops(fused.group(1))
            bytes_ = self.fusion_bytes(comp, instr, fused.group(1))
            if flops:
                fp8 = any(t.startswith("f8") for o in instr.operands for t, _ in arrays(self.shapes[comp].get(o, "")))
                peak = (self.fp8_peak * eff.gemm_fp8 if fp8 and self.fp8_peak else gpu.bf16_flops * eff.gemm_bf16)
                return "gemm", flops, bytes_, max(flops / peak, memory_s(bytes_))
            return "memory", 0.0, bytes_, memory_s(bytes_)
        if instr.opcode == "dynamic-update-slice":  # in place: the update read and written
            bytes_ = 2 * nbytes(self.shapes[comp].get(instr.operands[1], ""))
        else:
            bytes_ = self.operand_bytes(comp, instr) + nbytes(instr.shape)
        return "memory", 0.0, bytes_, memory_s(bytes_)

    def attention_flops(self, instr: Instruction, backward: bool) -> float:
        """cuDNN flash attention: 2 GEMMs of 2*D FLOPs per kept (query, key) pair forward (QK^T, PV); backward 5
        (QK^T again, dP, dV, dQ, dK). B, H, T, S from the scores' shape cuDNN is told; D from the output."""
        b, h, t, s = (int(d.strip('" ')) for d in _INTERMEDIATE.search(instr.rest).group(1).split(","))
        d = arrays(instr.shape)[0][1][-1]
        mask = _MASK.search(instr.rest)
        window = _WINDOW.search(instr.rest)
        if mask and "CAUSAL" in mask.group(1) and t == s:
            pairs = causal_pairs(t, int(window.group(1)) if window else 0)
        else:
            pairs = t * s
        return (10 if backward else 4) * b * h * d * pairs

    def collective(self, comp: str, instr: Instruction) -> float:
        """Seconds on the wire of a collective (its -start, an async-start wrapping it, or a bare one)."""
        op, line, operand_bytes = instr.opcode.removesuffix("-start"), instr.rest, self.operand_bytes(comp, instr)
        if instr.opcode == "async-start":
            wrapped = self.code.get(_CALLS.search(instr.rest).group(1), [])
            inner = next((i for i in wrapped if i.opcode in COLLECTIVES), None)
            if inner is None:
                return 0.0
            op, line = inner.opcode, inner.rest
        groups = _GROUPS_LIST.search(line)
        iota = _GROUPS_IOTA.search(line)
        n = len(groups.group(1).split(",")) if groups else int(iota.group(1)) if iota else self.devices
        if n <= 1:
            return 0.0
        buffer = operand_bytes * (n if op == "all-gather" else 1)  # an all-gather's output: n of its inputs
        return _RING[op](n) * buffer / (self.gpu.interconnect * self.eff.interconnect)

    def is_collective(self, instr: Instruction) -> bool:
        if instr.opcode == "async-start":
            wrapped = self.code.get(_CALLS.search(instr.rest).group(1), [])
            return any(i.opcode in COLLECTIVES for i in wrapped)
        return instr.opcode.removesuffix("-start") in COLLECTIVES

    def run(self, comp: str) -> collections.Counter:
        """One run of a scheduled computation: the compute stream's clock, with collectives on their own stream (a
        start queues one behind those before it; its done waits for it), and the totals per kind."""
        if comp in self.memo:
            return self.memo[comp]
        totals, clock, link_free, ends = collections.Counter(), 0.0, 0.0, {}
        for instr in self.code.get(comp, []):
            callees = []
            if instr.opcode == "while":
                trips = trip_count(self.lines, instr.rest) or 1
                callees = [(_BODY.search(instr.rest).group(1), trips)]
            elif instr.opcode == "call":
                callees = [(_TO_APPLY.search(instr.rest).group(1), 1)]
            elif instr.opcode == "conditional":  # the slowest branch
                names = [n for m in _BRANCHES.finditer(instr.rest) for g in m.groups() if g
                         for n in re.findall(r"%?([\w.\-]+)", g)]
                callees = [max(((n, 1) for n in names), key=lambda c: self.run(c[0])["step_s"])] if names else []
            if callees:
                for callee, times in callees:
                    inner = self.run(callee)
                    totals.update({k: v * times for k, v in inner.items()})
                    clock += inner["step_s"] * times
                continue
            if self.is_collective(instr):
                seconds = self.collective(comp, instr)
                totals["collective_busy"] += seconds
                totals["collectives"] += 1
                if instr.opcode.endswith("-start"):
                    link_free = max(clock, link_free) + seconds
                    ends[instr.name] = link_free
                else:  # synchronous: the compute stream waits for all of it
                    clock += seconds
                    totals["collective_exposed"] += seconds
                continue
            if instr.opcode.endswith("-done") and instr.operands and instr.operands[0] in ends:
                waited = max(0.0, ends.pop(instr.operands[0]) - clock)
                clock += waited
                totals["collective_exposed"] += waited
                continue
            found = self.kernel(comp, instr)
            if found:
                kind, flops, bytes_, seconds = found
                totals[kind] += seconds
                totals["launch"] += self.eff.launch_s
                totals.update(flops=flops, bytes=bytes_, kernels=1)
                clock += seconds + self.eff.launch_s
        for end in ends.values():  # started and never waited for here: the step still ends after it
            waited = max(0.0, end - clock)
            clock += waited
            totals["collective_exposed"] += waited
        totals["step_s"] = clock
        self.memo[comp] = totals
        return totals


def _root_name(lines: list[str]) -> str:
    root = next((line for line in lines if line.lstrip().startswith("ROOT")), "")
    found = _HEAD.match(root.replace("ROOT ", "", 1))
    return found.group(1) if found else ""


def project(hlo: str, gpu: GpuTarget, *, devices: int, tokens_per_step: int, flops_per_token: float, steps: int,
            fp8: bool = True, eff: Efficiency = GPU_EFFICIENCY, name: str = "") -> Projection:
    """The step of this optimised XLA:GPU program on `devices` GPUs of this kind (tokens_per_step: all devices'
    tokens; fp8=False: fp8 GEMMs timed at the bf16 peak, as on a GPU without fp8 tensor cores)."""
    model = _Model(hlo, gpu, eff, devices, gpu.fp8_flops if fp8 else None)
    totals = model.run(model.entry)
    step_s = totals["step_s"]
    per_device = tokens_per_step / devices / step_s
    return Projection(
        target=name or gpu.device_kind, step_s=step_s, tokens_per_s_per_device=per_device,
        tokens_per_s_per_node=per_device * min(devices, 8),
        mfu=flops_per_token * per_device / gpu.bf16_flops, horizon_steps=steps, horizon_s=steps * step_s,
        breakdown_s={k: totals[k] for k in KINDS}, collective_busy_s=totals["collective_busy"],
        flops=totals["flops"], bytes=totals["bytes"], kernels=int(totals["kernels"]))
