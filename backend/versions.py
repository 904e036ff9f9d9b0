"""Model versions: the one formula, so every path (server, bulk workers, the label CLI) names the same state alike.

A version changes exactly when what produces predictions changes: the models (their fingerprint: weights,
detector, proposal, crop and precision settings), the project's label sets, the project's learned state and the
method that turns it into predictions.

>>> base = base_version("0123456789ab", "cafe00112233")
>>> base
'clip-84cc4e60a9'
>>> learned_version(base, "", "method") == base, learned_version(base, "memory-token", "method")
(True, 'clip-84cc4e60a9-3510b029')
"""
from __future__ import annotations

import hashlib


def base_version(model_fingerprint: str, config_fingerprint: str) -> str:
    """The models and the project's label config: what zero-shot predictions depend on."""
    digest = hashlib.sha256(f"{model_fingerprint}:{config_fingerprint}".encode()).hexdigest()
    return f"clip-{digest[:10]}"


def learned_version(base: str, memory_token: str, method: str) -> str:
    """``base`` plus the project's stored learned state and the learning ``method`` that uses it (no state:
    ``base`` itself)."""
    if not memory_token:
        return base
    return f"{base}-{hashlib.sha256(f'{base}:{method}:{memory_token}'.encode()).hexdigest()[:8]}"
