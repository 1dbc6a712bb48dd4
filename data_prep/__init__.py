"""Turn datasets in their native on-disk formats into FFCV .beton files plus a manifest.

Entry point: `data_prep.prepare.prepare` (the `repro prepare-data` command).
"""

__version__ = "0.1.0"
