"""Where a compiled step's time goes: one call traced with jax.profiler, each XLA op's self time
(its time less that of the ops nested in it, e.g. a while loop's body) summed over threads, and
attributed to the innermost function of this package that created it, read from the stack frames
that the compiled HLO carries (e.g. `residual.py:apply_maps`, `attention.py:Attention.__call__`).
Ops without such a frame (buffer copies XLA adds, parts of the optimizer) are attributed to
`xla:<op kind>`; events that are no op of the step (the runtime's own, Python's) are left out.
"""

import collections
import glob
import re
import tempfile

import jax

PACKAGE_DIR = "/mhc_jax/"


def _section(hlo_text: str, name: str) -> list[str]:
    """The lines of one of the HLO text's stack-frame tables (FileNames, StackFrames, ...)."""
    parts = hlo_text.split(f"\n{name}\n", 1)
    return parts[1].split("\n\n", 1)[0].splitlines() if len(parts) == 2 else []


def _fields(line: str) -> tuple[int, dict]:
    return int(line.split()[0]), {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def op_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> 'file.py:function' of the innermost frame in this package."""
    files = {int(l.split()[0]): l.split(" ", 1)[1].strip('"') for l in _section(hlo_text, "FileNames")}
    functions = {int(l.split()[0]): l.split(" ", 1)[1].strip('"') for l in _section(hlo_text, "FunctionNames")}
    locations = {}
    for line in _section(hlo_text, "FileLocations"):
        index, f = _fields(line)
        locations[index] = (files[f["file_name_id"]], functions[f["function_name_id"]])
    frames = {}
    for line in _section(hlo_text, "StackFrames"):
        index, f = _fields(line)
        frames[index] = (f["file_location_id"], f["parent_frame_id"] - 1)  # parent 0 is the root

    def source(frame: int) -> str | None:
        seen = set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, frame = frames[frame]
            path, function = locations[location]
            if PACKAGE_DIR in path:
                return f"{path.rsplit('/', 1)[-1]}:{function}"
        return None

    sources = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z\-]+)\((.*)$", hlo_text, re.MULTILINE):
        name, kind, rest = match.groups()
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        sources[name] = (source(int(frame.group(1))) if frame else None) or f"xla:{kind}"
    return sources


def op_self_times(xplane_path: str, ops: dict) -> collections.Counter:
    """Op name -> self time in seconds, summed over every thread of the trace, for the names in `ops`."""
    totals = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(xplane_path).planes:
        for line in plane.lines:
            stack = []  # [name, end, child time] of the enclosing events
            for event in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
                if event.name not in ops:
                    continue
                while stack and stack[-1][1] <= event.start_ns:
                    _close(stack, totals)
                if stack:
                    stack[-1][2] += event.duration_ns
                stack.append([event.name, event.start_ns + event.duration_ns, 0.0, event.duration_ns])
            while stack:
                _close(stack, totals)
    return totals


def _close(stack: list, totals: collections.Counter) -> None:
    name, _, children, duration = stack.pop()
    totals[name] += max(duration - children, 0.0) / 1e9


def profile(compiled, run_once) -> dict:
    """Traces `run_once()` (one call of `compiled` that blocks until done) and returns the seconds of
    op time per source, largest first, and the ten largest ops."""
    sources = op_sources(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run_once()
        [xplane] = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        times = op_self_times(xplane, sources)
    by_source = collections.Counter()
    for name, seconds in times.items():
        by_source[sources[name]] += seconds
    total = sum(times.values())
    return {"op_seconds": round(total, 4),
            "by_source": {source: round(seconds, 4) for source, seconds in by_source.most_common()},
            "largest_ops": {f"{name} ({sources[name]})": round(seconds, 4)
                            for name, seconds in times.most_common(10)}}
