"""Benchmarks of ode_reg: ``python -m benchmarks`` (see ``benchmarks/run.py``)."""
