"""Does a config fit a slice? Compiles every step a run executes (train, eval, diagnostics) ahead of
time for hardware this machine does not have and prints what each device needs in each step, the
temporaries by source (saved activations, attention, MoE dispatch, logits/loss, ...); it fits only
if every step fits.

    python scripts/dry_run.py --config=configs/pretrain.py:mhc,27b --topology=v5p-256 [--config.a.b=v ...]
                              [--mfu=0.4] [--suggest] [--json]
    python scripts/dry_run.py --config=configs/pretrain.py:mhc,27b --topology=v5p-256 --eval [--eval_data=data/eval]

--topology: a TPU slice (v5p-8 ... v5p-2048, v6e-1 ... v6e-256, v5e-1 ... v5e-256) or cpu:N (N simulated
CPU devices). TPU slices need the TPU compiler: `make tpu-compiler` installs libtpu into .venv/libtpu,
outside the training environment. --suggest finds the smallest slice of the topology's family that
fits, walking from the one named (down while the next smaller fits, or up until one fits; the most
frugal mesh), then the lightest remat policy that still fits there.
--eval instead estimates how long eval.py takes for BBH, DROP, GSM8K and MMLU on the slice, from
the compiled scoring and decoding steps, the benchmarks' token counts and --mfu as the utilisation
of FLOPs and of memory bandwidth (mhc_jax/pods/eval_estimate.py).
Exit 0: fits (--eval: estimated); 1: does not fit; 2: bad input.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from mhc_jax.pods import topology  # noqa: E402

topology.set_up_process(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")), ""),
                        os.path.join(ROOT, ".venv", "libtpu"))

from absl import flags  # noqa: E402

from mhc_jax import cli  # noqa: E402
from mhc_jax.pods import aot, eval_estimate, fit_report  # noqa: E402

CONFIG = cli.define_config_flag()
TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-256, v6e-64, v5e-16, cpu:8, ...")
MFU = flags.DEFINE_float("mfu", 0.4, "model FLOP utilization assumed for the time estimate")
SUGGEST = flags.DEFINE_bool("suggest", False,
                            "find the smallest slice of the topology's family that fits, starting from the topology")
JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of the table")
EVAL = flags.DEFINE_bool("eval", False, "estimate the time of eval.py's BBH, DROP, GSM8K and MMLU on the topology")
EVAL_DATA = flags.DEFINE_string("eval_data", "data/eval", "--eval: the folder made by scripts/fetch_eval_data.py")


def compile_for(config, target):
    return aot.dry_run(config, target, topology.devices(target), MFU.value)


def main(argv):
    cli.expect(argv, (TOPOLOGY, "v5p-256"))
    config = cli.load_config(CONFIG)
    target = topology.parse(TOPOLOGY.value)
    aot.check_mfu(MFU.value)
    spec = cli.config_spec(CONFIG)
    if EVAL.value:
        if target.peak_flops is None:
            cli.fail(f"--eval: estimates time on TPU slices, whose peak and bandwidth are known; got --topology={target.name}")
        result = eval_estimate.estimate(config, target, topology.devices(target), EVAL_DATA.value, MFU.value)
        print(json.dumps(result) if JSON.value else eval_estimate.report_text(spec, result))
        return 0
    if SUGGEST.value:
        if target.platform != "tpu":
            cli.fail(f"--suggest: searches TPU slices; got --topology={target.name}")
        result = aot.suggest(config, target, compile_for)
        if JSON.value:
            print(json.dumps(result))
        else:
            print(fit_report.suggestion_text(spec, result))
        return 0 if result["fits"] else 1
    report = compile_for(config, target)
    if JSON.value:
        print(json.dumps(report))
    else:
        print(fit_report.report_text(spec, report))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    cli.run(main)
