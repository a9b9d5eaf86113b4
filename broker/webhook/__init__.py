"""``wif-broker webhook``: the Kubernetes mutating admission webhook of SPEC §9.

Imported only by the ``webhook`` sub-command, so the sidecar never loads the
Kubernetes client library (its import cost and memory stay out of ``run``).
"""
