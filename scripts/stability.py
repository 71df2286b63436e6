"""The stability study: residual vs HC vs mHC at the 10m scale, within a CPU budget.

    python scripts/stability.py --out=DIR [--budget_minutes=90] [--seeds=0,1,2] [--stress_seeds=0]
        [--stress_lr_factor=3] [--extra_seeds=0] [--extra_variants=mhc_v4,mhc_lite,kromhc,laurel_lr]
        [--config=configs/stability.py:10m] [--config.a.b=value ...]

Trains `residual`, `hc` and `mhc` at every seed with the same data order, optimizer and schedule, and
again at each stress seed with the learning rate multiplied by --stress_lr_factor; at each extra seed,
the variants that followed the paper (--extra_variants) and HC twice more, at a 10x
lower learning rate and with weight decay on its static H_res. Unless
--config.train.steps is set, it times a step of each variant first and gives every run the same number
of steps, as many as the budget allows. Then it writes DIR/report.md with its plots (see
mhc_jax/study/stability.py for the folder). Running the same command again continues an interrupted study.
"""

import sys
import time
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from mhc_jax import cli
from mhc_jax.errors import UserError
from mhc_jax.model import residual
from mhc_jax.study import report, stability
from mhc_jax.training import trainer

CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parents[1] / "configs/stability.py") + ":10m",
    "the study's base config: configs/stability.py:<scale>")
OUT = flags.DEFINE_string("out", None, "the study folder: runs, plots, report.md")
BUDGET = flags.DEFINE_float("budget_minutes", 90.0, "time for calibration and training, all runs together")
SEEDS = flags.DEFINE_string("seeds", "0,1,2", "seeds of the runs at the config's learning rate")
STRESS_SEEDS = flags.DEFINE_string("stress_seeds", "0", "seeds of the stress runs ('' for none)")
STRESS_LR_FACTOR = flags.DEFINE_float("stress_lr_factor", 3.0, "the stress runs' learning-rate multiplier")
EXTRA_SEEDS = flags.DEFINE_string("extra_seeds", "0", "seeds of the later variants and HC's controls ('' for none)")
EXTRA_VARIANTS = cli.define_choices("extra_variants", list(stability.LATER_VARIANTS),
                                    [v for v in residual.VARIANTS if v not in stability.VARIANTS],
                                    "the variants trained at the extra seeds")


def parse_seeds(flag: flags.FlagHolder, allow_empty: bool) -> list[int]:
    text = flag.value.strip()
    try:
        seeds = [int(s) for s in text.split(",")] if text else []
    except ValueError:
        raise UserError(f"--{flag.name}: expected comma-separated integers like 0,1,2, got {text!r}") from None
    if (not seeds and not allow_empty) or len(set(seeds)) != len(seeds):
        raise UserError(f"--{flag.name}: expected distinct comma-separated integers like 0,1,2, got {text!r}")
    return seeds


def main(argv):
    started = time.perf_counter()
    cli.expect(argv, (OUT, "runs/stability"))
    cli.check_creatable(OUT.value, "--out")  # before minutes of calibration
    if BUDGET.value <= 0:
        cli.fail(f"--budget_minutes: must be positive, got {BUDGET.value:g}")
    seeds, stress_seeds = parse_seeds(SEEDS, allow_empty=False), parse_seeds(STRESS_SEEDS, allow_empty=True)
    extra_seeds = parse_seeds(EXTRA_SEEDS, allow_empty=True)
    if stress_seeds and STRESS_LR_FACTOR.value in (0.0, 1.0):
        cli.fail(f"--stress_lr_factor: must differ from 0 and 1, got {STRESS_LR_FACTOR.value:g} "
                 "(or pass --stress_seeds='' for no stress runs)")
    config = cli.load_config(CONFIG, runnable=stability.example_run_config)
    vocab_overridden = "model.vocab_size" in config_flags.get_override_values(flags.FLAGS["config"])
    trainer.open_data(config, vocab_overridden)  # prepares data/default on first use
    runs = stability.study_runs(seeds, stress_seeds, STRESS_LR_FACTOR.value, extra_seeds, EXTRA_VARIANTS.value)
    settings = {"budget_minutes": BUDGET.value, "seeds": seeds, "stress_seeds": stress_seeds,
                "stress_lr_factor": STRESS_LR_FACTOR.value, "extra_seeds": extra_seeds,
                "extra_variants": EXTRA_VARIANTS.value, "config": config.to_dict()}
    out = Path(OUT.value)
    plan = stability.load_plan(out, settings) or stability.make_plan(out, config, runs, BUDGET.value, settings)
    print(f"{len(runs)} runs of {plan['steps']} steps in {out}", flush=True)
    if not stability.train_runs(out, config, runs, plan["steps"], vocab_overridden):
        print("stopped; run the same command to continue", flush=True)
        return 0
    timings = stability.read_timings(out)
    h_res = stability.representative_h_res(out, config, runs, plan["steps"])
    command = " ".join(["python", "scripts/stability.py", *sys.argv[1:]])
    written = report.write_report(out, runs, plan, timings, h_res, command, config)
    print(f"wrote {written} and its plots; this invocation took {(time.perf_counter() - started) / 60:.1f} min",
          flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
