"""How fast eval.py evaluates: examples per second of each task on a checkpoint, as eval.py runs
it (scripts/bench_eval.py). A task's seconds include its compilations (one per prompt-width
bucket); loading the checkpoint is timed apart."""

import os
import platform
import time
from pathlib import Path

import jax

from mhc_jax.evals.harness import LanguageModel
from mhc_jax.evals.registry import TASKS


def benchmark(workdir, data_dir, names: list[str], limit: int | None, batch_size: int | str, max_length: int,
              mesh: str = "auto") -> dict:
    start = time.perf_counter()
    model = LanguageModel(workdir, None, batch_size, max_length, mesh)
    load_seconds = time.perf_counter() - start
    tasks = {}
    for name in names:
        start = time.perf_counter()
        result = TASKS[name](model, Path(data_dir), limit)
        seconds = time.perf_counter() - start
        tasks[name] = {"examples": result["n"], "seconds": seconds, "examples_per_sec": result["n"] / seconds,
                       result["primary"]: result["metrics"][result["primary"]]}
    return {"workdir": str(workdir), "step": model.step, "residual": model.config.model.residual,
            "d_model": model.config.model.d_model, "n_layers": model.config.model.n_layers,
            "batch_size": batch_size, "max_length": max_length, "limit": limit,
            "mesh": dict(model.mesh.shape), "load_seconds": load_seconds,
            "tasks": tasks, "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpu_cores": os.cpu_count(), "machine": platform.machine()}
