"""What a compiled step's temporaries are made of at their peak: XLA's buffers attributed to the
code that makes them, by the `jax.named_scope` names in each instruction's metadata (op_name).

How: `compile_with_sources(lowered)` compiles with per-compile XLA debug options (`xla_dump_to` a
temporary folder, `xla_dump_hlo_as_text`) and reads three of the files XLA dumps:
  *after_optimizations.txt                    the optimized HLO: each instruction's operands and op_name;
  *after_optimizations-buffer-assignment.txt  every allocation and, in the temporaries' allocation
                                              (`preallocated-temp` of memory color 0: HBM on a TPU,
                                              RAM on CPU), each value's offset and size;
  *after_optimizations-live-range.txt         each value's live range [first, last] in the flattened
                                              schedule that the heap was packed by.
It sweeps the schedule for the moment when the most bytes of that allocation are live (values at
the same offset and size are one buffer and count once) and gives each buffer live then to a source:
  saved_activations  what the layer scan keeps for the backward pass: the tensors that the forward
                     layer scan's loop (op_name `.../jvp(layers)/while`; transformer.run_stack puts
                     the scope `layers` around the scan) carries and its body writes, i.e. its
                     stacked per-layer outputs (always the stream entering each block; with remat
                     'none' or 'dots' also what the blocks save inside) and the stream itself, and
                     the backward scan's per-layer slices of them;
  attention          under the `attention` scope (the attention kernel's call), forward or backward;
  moe_dispatch       under the `moe` scope (the MoE layer's body: routing, dispatch, experts);
  logits_loss        under the `loss` scope (model/loss.py: logits, softmax, their gradients);
  other              the rest: MLP, norms, residual sites, gradients, optimizer, the diagnostics'
                     stacked maps, copies XLA adds.
A buffer's values are followed through copies (also a TPU's copies between memories), bitcasts,
tuples and while loops (operand, body and condition parameters, results) to the tensor they are,
and it takes the first of saved_activations, attention, moe_dispatch, logits_loss that any value of
that tensor names; a TPU, for example, creates a scan's stacked buffer with an `AllocateBuffer`
that carries no scope.
Two remainders make the sources sum exactly to `memory_analysis().temp_size_in_bytes`:
  heap_fragmentation  bytes of the temporaries' allocation that hold no live buffer at that moment:
                      the heap is packed once for the whole program, so its size is the peak of
                      live bytes plus the holes the packing leaves (on small TPU programs, most);
  compiler_scratch    temp_size_in_bytes less that allocation: 0 on CPU; on a TPU, memory the TPU
                      compiler counts beyond XLA's buffer assignment (measured: 15% of the
                      temporaries of mhc,10m, 22% of mhc,100m on v5p-8), which the dump does not
                      break down. On-chip memories (a TPU's VMEM, SMEM) are other colors, left out.

Limits:
  - The peak is one moment: a source that peaks at another moment (e.g. the logits, after the
    layers) shows 0 when something else is larger then.
  - Attribution is as good as the scopes: code outside them is `other`, and a fusion is named by the
    op_name XLA gives it (its root's, or on a TPU sometimes its largest operation's).
  - saved_activations needs the scanned layers (model.scan_layers); unrolled layers' saved values
    are attributed to the code that makes them. Gradients have no source of their own (`other`).
  - jax's persistent compilation cache is off for these compiles: a hit would compile nothing, and
    XLA would dump nothing (the result is then None).
  - It reads text that XLA writes for people, not a stable format; a jax/libtpu upgrade can change it.
"""

import collections
import contextlib
import glob
import os
import re
import tempfile
import warnings
from typing import NamedTuple

import jax
from jax.experimental.compilation_cache import compilation_cache

SOURCES = ("saved_activations", "attention", "moe_dispatch", "logits_loss", "other")
REMAINDERS = ("heap_fragmentation", "compiler_scratch")
SCOPES = {"attention": "attention", "moe_dispatch": "moe", "logits_loss": "loss"}
LAYERS_SCOPE = "layers"  # transformer.Transformer.run_stack's scope around the layer scan
# The forward pass of the differentiated layer scan writing (or initializing) its stacked outputs:
# the residuals it keeps for the backward pass. Not `transpose(jvp(layers))`: that is the backward scan.
SAVED = re.compile(rf"(?:^|/)jvp\({LAYERS_SCOPE}\)/(?:while/body/)?(?:jit\([\w.]+\)/)*"
                   r"(?:dynamic_update_slice|broadcast_in_dim)$")
# The backward layer scan taking one layer's slice of what the forward scan saved (or of the weights).
BACKWARD_SLICE = re.compile(rf"(?:^|/)transpose\(jvp\({LAYERS_SCOPE}\)\)/while/body/"
                            r"(?:jit\([\w.]+\)/)*dynamic_slice$")
FORWARD_SCAN = re.compile(rf"(?:^|/)jvp\({LAYERS_SCOPE}\)/while$")  # the forward layer scan's loop
DUMP_OPTIONS = {"xla_dump_hlo_as_text": True}


def scope_pattern(name: str) -> re.Pattern:
    """A named scope as one component of an op_name, also inside transformation wrappers such as
    `transpose(jvp(name))`."""
    return re.compile(rf"(?:^|[/(]){re.escape(name)}(?:[)/]|$)")


SCOPE_PATTERNS = {source: scope_pattern(name) for source, name in SCOPES.items()}


def source_of(op_name: str) -> str:
    if SAVED.search(op_name):
        return "saved_activations"
    return next((source for source, pattern in SCOPE_PATTERNS.items() if pattern.search(op_name)), "other")


@contextlib.contextmanager
def persistent_cache_off():
    """jax's persistent compilation cache off for the compiles inside (a hit would compile nothing,
    and XLA would dump nothing; the dump options are not part of the cache key), as it was after."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once whether to use the cache; decide again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def compile_with_sources(lowered, compiler_options: dict | None = None):
    """Compiles `lowered` (a jax.stages.Lowered) with XLA's dumps into a temporary folder; returns
    the compiled step and `attribute(...)` of its temporaries (None when XLA dumped nothing)."""
    with tempfile.TemporaryDirectory(prefix="mhc-jax-buffers-") as folder, persistent_cache_off():
        compiled = lowered.compile(compiler_options={**(compiler_options or {}), **DUMP_OPTIONS,
                                                     "xla_dump_to": folder})
        files = dump_files(folder)
        if files is None:
            return compiled, None
        texts = {}
        for key, path in files.items():
            with open(path) as f:
                texts[key] = f.read()
    try:
        return compiled, attribute(texts["hlo"], texts["buffers"], texts["live_ranges"],
                                   compiled.memory_analysis().temp_size_in_bytes)
    except Exception as e:  # a dump this parser does not understand: keep the compile, say so
        warnings.warn(f"memory_sources: the temporaries are not attributed: {e!r}")
        return compiled, None


def dump_files(folder: str) -> dict | None:
    """The dumped module's HLO, buffer assignment and live ranges; with several modules, the one of
    the largest buffer assignment."""
    assignments = glob.glob(os.path.join(folder, "*after_optimizations-buffer-assignment.txt"))
    if not assignments:
        return None
    buffers = max(assignments, key=os.path.getsize)
    stem = buffers[:-len("-buffer-assignment.txt")]
    files = {"hlo": stem + ".txt", "buffers": buffers, "live_ranges": stem + "-live-range.txt"}
    return files if all(os.path.isfile(path) for path in files.values()) else None


class Instruction(NamedTuple):
    opcode: str
    operands: tuple[str, ...]
    op_name: str  # its metadata's, '' when it has none
    attributes: str  # the text after the operands: index=, condition=, body=, metadata...


class Program:
    """The optimized HLO's instructions, and which values (`name{shape index}`, as the dumps name
    them) are one tensor: a copy (also a TPU's copy between memories, copy-start/copy-done), a
    bitcast, a tuple and its elements, a while loop's operand, results, and its body's and
    condition's parameters and results, element by element."""

    def __init__(self, hlo_text: str):
        self.instructions, self.parameters, self.roots, computation = {}, {}, {}, ""
        for line in hlo_text.splitlines():
            if line[:1] not in ("", " ") and line.rstrip().endswith("{"):
                computation = line.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
                continue
            match = re.match(r"\s+(ROOT )?%?([^\s=]+) = .*? ([a-z][\w\-]*)\(([^)]*)\)(.*)$", line)
            if not match:
                continue
            root, name, opcode, operands, rest = match.groups()
            op_name = re.search(r'metadata=\{[^}]*?op_name="([^"]*)"', rest)
            self.instructions[name] = Instruction(opcode, tuple(re.findall(r"%([^\s,]+)", operands)),
                                                  op_name.group(1) if op_name else "", rest)
            if opcode == "parameter":
                self.parameters.setdefault(computation, name)
            if root:
                self.roots[computation] = name
        self.parent = {}
        for name, instruction in self.instructions.items():
            self.link_instruction(name, instruction)
        self.groups = collections.defaultdict(list)
        for value in list(self.parent):
            self.groups[self.find(value)].append(value)
        self.carries = self.scan_carries()

    def find(self, value: str) -> str:
        root = value
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while value != root:
            self.parent[value], value = root, self.parent.get(value, root)
        return root

    def link(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def link_instruction(self, name: str, instruction: Instruction) -> None:
        operands, opcode = instruction.operands, instruction.opcode
        if opcode in ("copy", "bitcast") and operands:
            self.link(f"{name}{{}}", f"{operands[0]}{{}}")
        elif opcode == "copy-start" and operands:
            self.link(f"{name}{{0}}", f"{operands[0]}{{}}")  # the copy's destination
        elif opcode == "copy-done" and operands:
            self.link(f"{name}{{}}", f"{operands[0]}{{0}}")
        elif opcode == "get-tuple-element" and operands:
            index = re.search(r"index=(\d+)", instruction.attributes)
            if index:
                self.link(f"{name}{{}}", f"{operands[0]}{{{index.group(1)}}}")
        elif opcode == "tuple":
            for index, operand in enumerate(operands):
                self.link(f"{name}{{{index}}}", f"{operand}{{}}")
        elif opcode == "while" and operands:
            body, condition = self.loop_computations(instruction)
            result = self.instructions.get(self.roots.get(body, ""))
            for index in range(len(result.operands) if result and result.opcode == "tuple" else 0):
                for other in (operands[0], self.parameters.get(body), self.parameters.get(condition),
                              self.roots.get(body)):
                    if other:
                        self.link(f"{name}{{{index}}}", f"{other}{{{index}}}")

    @staticmethod
    def loop_computations(instruction: Instruction) -> tuple[str, str]:
        found = dict(re.findall(r"(condition|body)=%?([^\s,]+)", instruction.attributes))
        return found.get("body", ""), found.get("condition", "")

    def scan_carries(self) -> set[str]:
        """The tensors (as `find` names them) that the forward layer scan's loop carries and its body
        writes: the stacked outputs it keeps for the backward pass, and the stream. Elements the body
        passes through unchanged (weights) are left out."""
        carries = set()
        for name, instruction in self.instructions.items():
            if instruction.opcode != "while" or not FORWARD_SCAN.search(instruction.op_name):
                continue
            body, _ = self.loop_computations(instruction)
            result = self.instructions.get(self.roots.get(body, ""))
            if result is None or result.opcode != "tuple":
                continue
            for index, element in enumerate(result.operands):
                source = self.instructions.get(element)
                if not (source is not None and source.opcode == "get-tuple-element"
                        and source.operands[:1] == (self.parameters.get(body),)
                        and re.search(rf"index={index}\b", source.attributes)):  # else passed through unchanged
                    carries.add(self.find(f"{name}{{{index}}}"))
        return carries

    def source(self, values) -> str:
        """The source of the tensor(s) that `values` are: the first of SOURCES (less `other`) that one
        of them, or a value of the same tensor, names."""
        groups = {self.find(value) for value in values}
        if groups & self.carries:
            return "saved_activations"
        instructions = [self.instructions[name] for name in
                        {value.split("{", 1)[0] for group in groups for value in self.groups.get(group, [group])}
                        if name in self.instructions]
        if any(BACKWARD_SLICE.search(i.op_name) and any(self.find(f"{o}{{}}") in self.carries for o in i.operands)
               for i in instructions):
            return "saved_activations"  # a layer's slice of them
        named = {source_of(instruction.op_name) for instruction in instructions}
        return next((source for source in SOURCES[:-1] if source in named), "other")


def temp_allocations(buffer_text: str) -> list[dict]:
    """The color-0 temporaries' allocations: {size, values: [(value name, offset, size)]}, a value
    named as the live-range dump names it (`name{shape index}`)."""
    allocations, current = [], None
    for line in buffer_text.splitlines():
        header = re.match(r"allocation \d+: size (\d+)(.*):$", line)
        if header:
            kind = header.group(2)
            color = re.search(r"color (\d+)", kind)
            is_temp = "preallocated-temp" in kind and (color is None or color.group(1) == "0")
            current = {"size": int(header.group(1)), "values": []} if is_temp else None
            if current is not None:
                allocations.append(current)
            continue
        value = re.match(r" value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\)", line)
        if value and current is not None:
            name = value.group(1) if value.group(1).endswith("}") else value.group(1) + "{}"
            current["values"].append((name, int(value.group(3)), int(value.group(2))))
    return allocations


def live_ranges(live_range_text: str) -> dict[str, tuple[int, int]]:
    """Value name -> (first, last) position in the schedule, both live."""
    section = live_range_text.split("BufferLiveRange:", 1)[-1].split("Live ranges at", 1)[0]
    return {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^\s+(\S+):(\d+)-(\d+)$", section, re.MULTILINE)}


def peak_moment(values: list) -> int | None:
    """The schedule position where the most bytes are live; `values` are (start, end, offset, size)
    and values at the same offset and size count once."""
    events = collections.defaultdict(list)
    for start, end, offset, size in values:
        events[start].append(((offset, size), 1))
        events[end + 1].append(((offset, size), -1))
    live, total, best = collections.Counter(), 0, (0, None)
    for time in sorted(events):
        for key, step in events[time]:
            before = live[key]
            live[key] += step
            total += key[1] * ((live[key] > 0) - (before > 0))
        if total > best[0]:
            best = (total, time)
    return best[1]


def attribute(hlo_text: str, buffer_text: str, live_range_text: str, temp_size: int) -> dict:
    """Bytes per source (SOURCES, then REMAINDERS) of the peak of the temporaries; they sum to
    `temp_size`. Also `largest`: the ten largest live buffers at the peak (name, op_name, bytes, source)."""
    program, ranges = Program(hlo_text), live_ranges(live_range_text)
    by_source = dict.fromkeys(SOURCES + REMAINDERS, 0)
    largest, allocated = [], 0
    for allocation in temp_allocations(buffer_text):
        allocated += allocation["size"]
        values = [(name, *ranges[name], offset, size) for name, offset, size in allocation["values"]
                  if name in ranges and size > 0]
        moment = peak_moment([v[1:] for v in values])
        live = collections.defaultdict(list)  # (offset, size) -> the values there at the peak: one buffer
        for name, start, end, offset, size in values:
            if moment is not None and start <= moment <= end:
                live[offset, size].append(name)
        covered, live_bytes = -1, 0
        for (offset, size), names in sorted(live.items()):
            new = max(0, offset + size - max(offset, covered))
            covered = max(covered, offset + size)
            if new:
                source = program.source(names)
                by_source[source] += new
                live_bytes += new
                instruction = program.instructions.get(names[0].split("{", 1)[0])
                largest.append({"value": names[0], "op_name": instruction.op_name if instruction else "",
                                "bytes": new, "source": source})
        by_source["heap_fragmentation"] += allocation["size"] - live_bytes
    by_source["compiler_scratch"] = temp_size - allocated
    return {"by_source": by_source, "largest": sorted(largest, key=lambda b: -b["bytes"])[:10]}
