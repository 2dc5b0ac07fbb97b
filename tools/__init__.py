"""Measurement tools (GPU speed, sandbox throughput, reference checks, the hostile-code suite).

The pipeline never imports this package; each tool runs as `python -m qrobust.tools.NAME`.
"""
