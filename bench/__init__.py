"""Benchmarks for wif-broker: herd coalescing, cached-token throughput, start-up.

Run with ``python -m bench`` (``--quick`` for a ~30 s pass). Not tests: every
figure is measured, printed and written to ``docs/performance.md``. All traffic
stays on 127.0.0.1 and every load loop is bounded in count and time.
"""
