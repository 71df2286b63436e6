"""Does a config fit a slice? Compiles the real train step ahead of time for hardware this machine
does not have and prints what each device needs.

    python scripts/dry_run.py --config=configs/pretrain.py:mhc,27b --topology=v5p-256 [--config.a.b=v ...]
                              [--mfu=0.4] [--suggest] [--json]

--topology: a TPU slice (v5p-8 ... v5p-2048, v6e-1 ... v6e-256, v5e-1 ... v5e-256) or cpu:N (N simulated
CPU devices). TPU slices need the TPU compiler: `make tpu-compiler` installs libtpu into .venv/libtpu,
outside the training environment. --suggest finds the smallest slice of the topology's family that
fits, walking from the one named (down while the next smaller fits, or up until one fits; the most
frugal mesh), then the lightest remat policy that still fits there.
Exit 0: fits; 1: does not fit; 2: bad input.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mhc_jax import topology  # noqa: E402  (no jax yet: the environment is set first)

topology.set_up_process(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")), ""),
                        os.path.join(ROOT, ".venv", "libtpu"))

from absl import flags  # noqa: E402

from mhc_jax import aot, cli  # noqa: E402

CONFIG = cli.define_config_flag()
TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-256, v6e-64, v5e-16, cpu:8, ...")
MFU = flags.DEFINE_float("mfu", 0.4, "model FLOP utilization assumed for the time estimate")
SUGGEST = flags.DEFINE_bool("suggest", False, "find the smallest slice of the topology's family that fits, starting from the topology")
JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of the table")



def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def count(n: float) -> str:
    return next(f"{n / scale:.1f}{unit}" for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
                if n >= scale or scale == 1)


def compile_for(config, target):
    return aot.dry_run(config, target, topology.devices(target), MFU.value)


def print_report(spec: str, r: dict) -> None:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    print(f"{spec} on {r['topology']}: {r['devices']} devices of {size(r['memory_per_device'])}; "
          f"mesh {mesh}; remat {r['remat']}; dtype {r['dtype']}")
    print("  per device")
    for name, value in r["per_device"].items():
        print(f"  {name.replace('_', ' '):<24}{size(value):>12}")
    if "total_per_device" in r:
        share = r["total_per_device"] / r["memory_per_device"]
        print(f"  {'total':<24}{size(r['total_per_device']):>12}  {share:.0%} of {size(r['memory_per_device'])}")
    print("FITS" if r["fits"] else f"DOES NOT FIT{': ' + r['reason'] if 'reason' in r else ''}")
    if "model_flops_per_step" in r:
        print(f"FLOPs per step: {r['model_flops_per_step']:.3e} (model, the MFU basis); XLA's cost_analysis "
              f"{r['xla_flops_per_device']:.3e} per device (counts a scanned loop's body once)")
    if "days" in r:
        print(f"token budget {count(r['token_budget'])} tokens: {r['step_seconds']:.3g} s per step, "
              f"{r['days']:.3g} days at MFU {r['mfu']:.0%} ({r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device)")


def print_suggestion(spec: str, s: dict) -> None:
    print(f"{spec}: slices of {s['family']} tried")
    for a in s["attempts"]:
        total = size(a["total_per_device"]) if a["total_per_device"] else "-"
        mesh = " ".join(f"{k}={v}" for k, v in a["mesh"].items())
        print(f"  {a['topology']:<10} {mesh:<40} remat={a['remat']:<5} {total:>10}  {'fits' if a['fits'] else 'does not fit'}")
    if s["fits"]:
        mesh = " ".join(f"--config.mesh.{k}={v}" for k, v in s["mesh"].items())
        print(f"smallest {s['family']} slice that fits: {s['smallest']} with {mesh} --config.model.remat={s['remat']}")
    else:
        print(f"no {s['family']} slice fits")


def main(argv):
    cli.expect(argv, (TOPOLOGY, "v5p-256"))
    config = cli.load_config(CONFIG)
    target = topology.parse(TOPOLOGY.value)
    aot.check_mfu(MFU.value)
    spec = cli.config_spec(CONFIG)
    if SUGGEST.value:
        if target.platform != "tpu":
            cli.fail(f"--suggest: searches TPU slices; got --topology={target.name}")
        result = aot.suggest(config, target, compile_for)
        if JSON.value:
            print(json.dumps(result))
        else:
            print_suggestion(spec, result)
        return 0 if result["fits"] else 1
    report = compile_for(config, target)
    if JSON.value:
        print(json.dumps(report))
    else:
        print_report(spec, report)
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    cli.run(main)
