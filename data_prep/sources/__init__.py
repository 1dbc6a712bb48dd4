"""The data sources: every module of this package is imported here, and each source module registers itself.

Adding a source is one module that ends with `register_source(Source(...))` (see `base`); the CLI's choices, the
defaults of `repro prepare-data`, the hints that suggest it and the report's names all read the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from data_prep.sources.base import (SOURCES, Source, SourceData, Split, get_source, load_source, register_source,
                                    source_names)

# Helper modules (base, folders) register nothing; importing them too keeps a new source from needing a list here.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SOURCES", "Source", "SourceData", "Split", "get_source", "load_source", "register_source",
           "source_names"]
