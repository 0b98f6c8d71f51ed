"""The share of full R-Drop's converged gain that each cheaper variant keeps.

``python scripts/gain_kept.py results/converged_cheap_images`` reads the run records and
prints, per variant, ``(variant - baseline) / (full - baseline)`` of the mean converged
test score over seeds, with a 95% interval from a paired bootstrap over seeds (10,000
resamples, seed 0). A ratio's interval is wide when full R-Drop's own gain is small.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ABLATIONS = ("branch_at", "every_k_steps", "stop_gradient", "num_passes", "dropout_rates")
DEFAULTS = {"branch_at": None, "every_k_steps": 1, "stop_gradient": False, "num_passes": 2}


def _label(config: dict) -> str:
    if config["method"] == "baseline":
        return "baseline"
    changed = [
        f"{k}={config.get(k)}"
        for k in ABLATIONS
        if config.get(k, DEFAULTS.get(k)) != DEFAULTS.get(k)
    ]
    return "full R-Drop" if not changed else ", ".join(changed)


def main(folder: str) -> int:
    scores: dict[str, dict[int, float]] = defaultdict(dict)
    metric = None
    for path in sorted(Path(folder, "runs").glob("*.json")):
        record = json.loads(path.read_text())
        metric = metric or record["task"]["primary_metric"]
        selected = record["selections"]["converged"]
        scores[_label(record["config"])][record["config"]["seed"]] = selected["test"][metric]
    seeds = sorted(scores["baseline"])
    base = np.array([scores["baseline"][s] for s in seeds])
    full = np.array([scores["full R-Drop"][s] for s in seeds])
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(seeds), size=(10_000, len(seeds)))
    print(f"| variant | Δ {metric} vs baseline | gain kept | 95% bootstrap |")
    print("|---|---:|---:|---|")
    for label in sorted(scores):
        if label in ("baseline",):
            continue
        values = np.array([scores[label][s] for s in seeds])
        ratio = (values - base).mean() / (full - base).mean()
        boot = (values[draws] - base[draws]).mean(1) / (full[draws] - base[draws]).mean(1)
        low, high = np.percentile(boot, [2.5, 97.5])
        print(
            f"| {label} | {(values - base).mean():+.4f} | {ratio:.0%} | [{low:.0%}, {high:.0%}] |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
