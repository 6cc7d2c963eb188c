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
    """Logits for normalized inputs ``x`` (batch first), scored in chunks to bound memory."""
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: x[i : i + SCORING_CHUNK]})[0] for i in range(0, len(x), SCORING_CHUNK)]
    return np.concatenate(chunks)
