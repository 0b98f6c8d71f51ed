"""The experiment runner: honest baseline-vs-R-Drop comparisons on real data.

Built on the core library (``rdrop``), never the reverse. Heavy dependencies
(transformers, matplotlib) are imported lazily, where a task or the report needs them.
Entry point: the ``rdrop`` command (:mod:`rdrop_lab.cli`).
"""
