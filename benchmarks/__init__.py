"""sapo's benchmarks: each module measures one cost through the library's public interface.

Run them from the repository root as modules of this package, e.g.::

    python -m benchmarks.step_time --quick

``python benchmarks/step_time.py`` runs the same: a benchmark started as a file starts itself again
as its module (``os.execv``, first thing in the file), so that every benchmark imports what it
shares, :mod:`benchmarks.harness` above all, as a package, and nothing edits ``sys.path``.
``docs/performance.md`` gives each figure and the command that reproduces it.
"""
