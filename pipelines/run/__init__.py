"""``slidepipe run``: nightly batch processing of a slide archive.

One command takes an archive through tiling, feature extraction, MIL prediction and exports
as one Dask graph (:mod:`.flow`), records every slide in a SQLite run database in the output
folder (:mod:`.database`), holds a lock so one run works on a folder at a time (:mod:`.lock`),
and writes a report (:mod:`.report`). Reruns take only new or changed slides. The package's
modules are imported directly (``from pipelines.run.runner import run_archive``); this file
imports nothing, so that :mod:`pipelines.extract` can use the engine without a cycle.
"""
