"""Run time of one bandit experiment (rpo_lib.bandit.extrapolation_experiment), per method and world.

    python benchmarks/bandit_experiment.py        # writes bandit_experiment.json beside this script

The notebooks 04-06 call these experiments dozens of times; this is where their speed is measured (the tests
check what the experiments return, never how long they take). Best of three runs, seed 0, wall-clock seconds.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from rpo_lib import bandit


def seconds(method: str, features: bool, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        bandit.extrapolation_experiment(method, features, 0)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    figures = {}
    for features in (True, False):
        world = "features" if features else "tabular"
        for method in ("dpo", "rpo", "hypo", "rlhf"):
            figures[f"{world}/{method}"] = round(seconds(method, features), 2)
            print(f"{world:8s} {method:5s} {figures[f'{world}/{method}']:6.2f} s")
    record = {"what": "seconds per extrapolation_experiment call (best of 3)", "cpu": platform.processor() or
              platform.machine(), "cpu_threads": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "seconds": figures}
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
