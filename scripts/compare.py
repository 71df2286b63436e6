"""Compares finished runs (a sweep's, or any train.py workdirs) the way the paper does.

    python scripts/compare.py ROOT [ROOT ...] [--out=DIR]

Prints a markdown table per scale (rows: variants; cells: mean over seeds and their range) and writes
DIR/compare.md, DIR/summary.json and the plots loss_vs_tokens.png, amax.png, scaling.png. DIR defaults
to ROOT/compare for one ROOT (a folder or a bucket path). Runs on different data or tokenizers are refused (exit 2).
"""

import json

from absl import flags

from mhc_jax import cli, plots, storage
from mhc_jax.pods import compare

OUT = flags.DEFINE_string("out", None, "where the table, summary.json and plots go (default: ROOT/compare)")


def main(argv):
    roots = argv[1:]
    if not roots:
        cli.fail("give the folders to compare: python scripts/compare.py ROOT [ROOT ...]")
    if not OUT.value and len(roots) > 1:
        cli.fail("--out: required with several roots, e.g. --out=runs/compare")
    for root in roots:
        storage.check_reachable(root, root)
    runs = compare.find_runs(roots)
    compare.check_same_data(runs)
    tables = compare.rows_by_scale(runs)
    summary = compare.summarize(tables)
    table = compare.markdown(summary)
    print(table)
    out = storage.path(OUT.value or f"{roots[0]}/compare")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    curves = {scale: {label: [(r.tokens_per_step, r.records) for r in members] for label, members in rows.items()}
              for scale, rows in tables.items()}
    plots.plot_comparison_losses(curves, out / "loss_vs_tokens.png")
    plots.plot_comparison_amax(curves, out / "amax.png")
    scaling = {}
    for rows in summary.values():
        for label, row in rows.items():
            if row["final_eval_loss"]:
                loss = row["final_eval_loss"]
                scaling.setdefault(label, []).append((row["parameters"], loss["mean"], loss["min"], loss["max"]))
    plots.plot_scaling(scaling, out / "scaling.png")
    print(f"wrote {out}/compare.md, summary.json, loss_vs_tokens.png, amax.png, scaling.png")
    return 0


if __name__ == "__main__":
    cli.run(main)
