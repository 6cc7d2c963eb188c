"""MLServer as the peer of ``hegate bench peer``: its pinned environment and our small runtime.

:mod:`bench.mlserver.onnx_model` holds everything the runtime computes (session, decoding,
encoding) free of MLServer, so hegate's own environment can test it; :mod:`bench.mlserver.runtime`
is the thin ``mlserver.MLModel`` around it, imported only inside MLServer's environment.
"""
