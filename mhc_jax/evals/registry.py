"""The benchmarks eval.py runs: name -> run(model, data_dir, limit) -> results."""

import functools

from mhc_jax.evals import bbh, competition_math, drop, gsm8k, harness, hellaswag, mmlu, perplexity, piqa, triviaqa

TASKS = {"perplexity": perplexity.run,
         **{module.TASK.name: functools.partial(harness.run, task=module.TASK)
            for module in (mmlu, gsm8k, bbh, drop, hellaswag, piqa, triviaqa, competition_math)}}
