"""Benchmarks of rdrop's fast paths against their references (not tests; never asserted).

Run ``python -m benchmarks.run`` (or ``python benchmarks/run.py``; ``--quick`` for a smoke
run). Times are ratios measured side by side in one process (variants interleaved, several
repetitions, median of the per-repetition ratios); memory is the peak RSS of a fresh
subprocess per configuration, minus its RSS after the inputs were allocated.
"""
