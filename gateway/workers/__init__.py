"""Encrypted evaluation in ``spawn`` worker processes.

TenSEAL and SEAL hold the GIL and a TenSEAL context inherited through ``fork`` hangs, so CPU-heavy
work runs in processes started with ``spawn``. ``messages`` is what crosses the pipe, ``process``
is a worker's loop, ``pool`` starts, feeds, watches and replaces them.
"""
