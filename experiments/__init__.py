"""Experiments: runs that answer a question about SAPO itself, not what a step costs.

``paper_table.py`` is the paper's comparison at small scale behind ``docs/results.md`` (SAPO
against SFT, SPIN, DPO, ORPO and ablations, on built-in tasks); ``paper_methods.py`` trains one
method of it. Run from the repository root::

    python -m experiments.paper_table --quick

``python experiments/paper_table.py`` runs the same (see ``benchmarks/__init__.py``).
"""
