"""A dry run's report in words (scripts/dry_run.py): memory per device of every compiled step (train,
eval, diagnostics), its temporaries by source, whether every step fits, FLOPs per step and the days
a token budget takes."""

STEP_COLUMNS = ("train", "eval", "diagnostics")  # aot.STEPS
ROWS = (("parameters", "parameters"), ("optimizer_state", "optimizer state"), ("other_arguments", "other arguments"),
        ("outputs_not_aliased", "outputs not aliased"), ("temporaries", "temporaries"))
SOURCE_ROWS = (("saved_activations", "saved activations"), ("attention", "attention"),
               ("moe_dispatch", "MoE dispatch"), ("logits_loss", "logits/loss"), ("other", "other"),
               ("heap_fragmentation", "heap fragmentation"),
               ("compiler_scratch", "compiler scratch"))  # memory_sources.SOURCES + REMAINDERS


def size(n: float) -> str:
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if abs(n) >= 2**10 else f"{n:.0f} B"


def steps_table(r: dict) -> list[str]:
    """Rows: memory per device by kind, the temporaries by source indented under them (sources that
    are 0 in every step left out), the total and its share of the chip; columns: the steps."""
    steps = r["steps"]
    lines = [f"  {'per device':<24}" + "".join(f"{step:>14}" for step in STEP_COLUMNS)]

    def row(label, value_of):
        cells = [value_of(steps[step]) if step in steps else None for step in STEP_COLUMNS]
        return f"  {label:<24}" + "".join(f"{'-' if c is None else c:>14}" for c in cells)

    def amount(key, within):
        return lambda s: size(s[within][key]) if s.get(within) and key in s[within] else None

    for key, label in ROWS:
        lines.append(row(label, amount(key, "per_device")))
        if key == "temporaries":
            for source, source_label in SOURCE_ROWS:
                if any((s.get("temporaries_by_source") or {}).get(source) for s in steps.values()):
                    lines.append(row("  " + source_label, amount(source, "temporaries_by_source")))
    lines.append(row("generated code", amount("generated_code", "per_device")))
    total = r["memory_per_device"]
    lines.append(row("total", lambda s: size(s["total_per_device"]) if "total_per_device" in s else None))
    lines.append(row(f"share of {size(total)}",
                     lambda s: f"{s['total_per_device'] / total:.0%}" if "total_per_device" in s else None))
    return lines


def count(n: float) -> str:
    return next(f"{n / scale:.1f}{unit}" for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
                if n >= scale or scale == 1)


def report_text(spec: str, r: dict) -> str:
    """aot.dry_run's report `r` of config `spec`, as the lines dry_run.py prints."""
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"{spec} on {r['topology']}: {r['devices']} devices of {size(r['memory_per_device'])}; "
             f"mesh {mesh}; remat {r['remat']}; dtype {r['dtype']}"]
    if "steps" in r:
        lines += steps_table(r)
        if any(s.get("temporaries_by_source") for s in r["steps"].values()):
            lines.append("  temporaries by source: what is live at the step's peak (pods/memory_sources.py); "
                         "eval and diagnostics count the optimizer state, which stays on the device")
    else:
        lines.append("  per device")
        lines += [f"  {name.replace('_', ' '):<24}{size(value):>12}" for name, value in r["per_device"].items()]
        if "total_per_device" in r:
            share = r["total_per_device"] / r["memory_per_device"]
            lines.append(f"  {'total':<24}{size(r['total_per_device']):>12}  {share:.0%} of "
                         f"{size(r['memory_per_device'])}")
    compiled = ", ".join(step for step in STEP_COLUMNS if step in r.get("steps", {}))
    lines.append(f"FITS: every step ({compiled})" if r["fits"]
                 else f"DOES NOT FIT{': ' + r['reason'] if 'reason' in r else ''}")
    if "model_flops_per_step" in r:
        lines.append(f"FLOPs per step: {r['model_flops_per_step']:.3e} (model, the MFU basis); XLA's cost_analysis "
                     f"{r['xla_flops_per_device']:.3e} per device (counts a scanned loop's body once)")
    if "days" in r:
        lines.append(f"token budget {count(r['token_budget'])} tokens: {r['step_seconds']:.3g} s per step, "
                     f"{r['days']:.3g} days at MFU {r['mfu']:.0%} "
                     f"({r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device)")
    return "\n".join(lines)


def suggestion_text(spec: str, s: dict) -> str:
    """aot.suggest's walk over the slices for config `spec`, as the lines dry_run.py prints."""
    lines = [f"{spec}: slices of {s['family']} tried"]
    for a in s["attempts"]:
        total = size(a["total_per_device"]) if a["total_per_device"] else "-"
        mesh = " ".join(f"{k}={v}" for k, v in a["mesh"].items())
        verdict = "fits" if a["fits"] else "does not fit"
        lines.append(f"  {a['topology']:<10} {mesh:<40} remat={a['remat']:<5} {total:>10}  {verdict}")
    if s["fits"]:
        mesh = " ".join(f"--config.mesh.{k}={v}" for k, v in s["mesh"].items())
        lines.append(f"smallest {s['family']} slice that fits: {s['smallest']} with {mesh} "
                     f"--config.model.remat={s['remat']}")
    else:
        lines.append(f"no {s['family']} slice fits")
    return "\n".join(lines)
