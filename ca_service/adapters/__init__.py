"""Adapters at the edge: the scheduler, the signing process pool, file writers, TLS key loading.

Services call them through narrow interfaces; they import services, never the other way round
(except the assembly, ``app.py``, which builds them).
"""
