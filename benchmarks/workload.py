"""The benchmark workload: deterministic English-like sentences of varied length."""

from __future__ import annotations

import random

WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by",
    "at", "from", "it", "his", "her", "they", "this", "be", "are", "model", "queue", "worker",
    "request", "batch", "token", "embedding", "sentence", "river", "mountain", "city", "music",
    "history", "science", "garden", "window", "coffee", "morning", "evening", "quickly",
    "slowly", "bright", "quiet", "ancient", "modern", "network", "signal", "memory", "engine",
    "market", "winter", "summer", "ocean", "forest", "library", "student", "teacher",
    "journey", "question", "answer", "simple", "complex",
)


def sentences(count: int = 1000, min_words: int = 4, max_words: int = 48, seed: int = 0
              ) -> list[str]:
    """``count`` sentences of ``min_words``..``max_words`` words, the same for every run."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(min_words, max_words)
        words = [rng.choice(WORDS) for _ in range(n)]
        out.append(" ".join(words).capitalize() + ".")
    return out
