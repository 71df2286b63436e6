"""A dry run's report in words (scripts/dry_run.py): memory per device by source, whether it fits,
FLOPs per step and the days a token budget takes."""


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def count(n: float) -> str:
    return next(f"{n / scale:.1f}{unit}" for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
                if n >= scale or scale == 1)


def report_text(spec: str, r: dict) -> str:
    """aot.dry_run's report `r` of config `spec`, as the lines dry_run.py prints."""
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"{spec} on {r['topology']}: {r['devices']} devices of {size(r['memory_per_device'])}; "
             f"mesh {mesh}; remat {r['remat']}; dtype {r['dtype']}", "  per device"]
    lines += [f"  {name.replace('_', ' '):<24}{size(value):>12}" for name, value in r["per_device"].items()]
    if "total_per_device" in r:
        share = r["total_per_device"] / r["memory_per_device"]
        lines.append(f"  {'total':<24}{size(r['total_per_device']):>12}  {share:.0%} of {size(r['memory_per_device'])}")
    lines.append("FITS" if r["fits"] else f"DOES NOT FIT{': ' + r['reason'] if 'reason' in r else ''}")
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
