"""Reports of federated runs: a self-contained HTML page built from run files.

This layer reads the plain-JSON files a run directory holds; it never imports
the simulation, data or model layers (or torch), and matplotlib loads only
when a figure is drawn.
"""

from fedshield.report.html import read_metrics, render_report, write_report

__all__ = ["read_metrics", "render_report", "write_report"]
