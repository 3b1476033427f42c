"""The HTML report of a run and its figures for papers.

    from picaco.report import write_report
    path = write_report("runs/hh-balance")              # -> runs/hh-balance/report.html
    write_report("runs/hh-balance", compare="eval/summary.json")

See docs/report.md.
"""

from picaco.report.html import build_context, render_html, write_report
from picaco.report.rundata import RunData, load_compare, load_run

__all__ = ["RunData", "build_context", "load_compare", "load_run", "render_html", "write_report"]
