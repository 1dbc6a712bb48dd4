"""`python -m repro`: the same commands as the `repro` script, for a checkout used through PYTHONPATH."""

from repro.cli import app

app(prog_name="repro")
