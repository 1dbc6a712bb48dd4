"""`python -m repro ...`: the `repro` command where the package is not installed (PYTHONPATH checkouts)."""

from repro.cli import main

main()
