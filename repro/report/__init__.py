"""`repro report`: one self-contained HTML page that measures every registered claim against the paper.

build.py collects the run table and renders the page; the claims are judged by repro.claims; sections.py lays out
each claim's rows, figures and facts; figures.py draws (seaborn), tables.py holds the paper's Tables 1 and 2 and
the provenance rows; templates/report.html.j2 is the page.
"""

from repro.report.build import build_report, render

__all__ = ["build_report", "render"]
