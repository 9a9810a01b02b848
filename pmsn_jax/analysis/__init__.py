"""Campaign analysis over finished (or still-running) run directories, kept out of the core.

Training and evaluation (pmsn_jax.main, pmsn_jax.evaluate) never import this package: it reads
what runs and the experiment drivers (experiments/sweep.py's driver.json) leave on disk and turns
many runs into one markdown report with tables, paired-seed PMSN − MSN intervals and plots
(`python -m pmsn_jax.analysis.report RUN_DIR ... --out DIR`). Its plots need matplotlib, which is
not a core dependency: install the `analysis` extra (`pip install -e '.[analysis]'`). Layering,
lowest first: runs.py (reading one run dir, the Run and Group records), paired.py (PMSN − MSN
over shared seeds), plots.py (the PNGs), report.py (grouping, the table and the CLI).
"""
