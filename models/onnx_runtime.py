"""onnxruntime, the reference executor: sessions pinned to a thread count and batched scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

SCORING_CHUNK = 4096


def create_session(model: Path | bytes, *, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with explicit intra/inter-op thread counts (the machine has two cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), sess_options=options, providers=["CPUExecutionProvider"]
    )


def predict_logits(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Logits for normalized inputs ``x`` (batch first), scored in chunks to bound memory.

    One chunk (every gateway request) goes straight to ``session.run``: the list and the copying
    concatenate cost 7 us of a 22 us batch-1 call (breast cancer, CPU time, 2026-12-03).
    """
    name = session.get_inputs()[0].name
    if len(x) <= SCORING_CHUNK:
        return session.run(None, {name: x})[0]
    chunks = [session.run(None, {name: x[i : i + SCORING_CHUNK]})[0] for i in range(0, len(x), SCORING_CHUNK)]
    return np.concatenate(chunks)
