"""Test-only fakes: AWS, Azure, GCS and TLS helpers.

The Google fakes ``wif-broker demo`` runs ship in :mod:`broker.fakes`; these are
used by the tests alone and stay out of the wheel.
"""
