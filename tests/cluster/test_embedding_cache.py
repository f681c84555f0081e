"""The embedding cache across an interrupted run: what was encoded is kept, the re-run gives the same vectors."""

import numpy as np
import pytest

from slmconvert import embeddings
from slmconvert.embeddings import EmbeddingCache, Embedder, embed_texts
from slmconvert.progress import Progress


class StopAfter(Progress):
    """Ctrl-C once `limit` texts have been encoded (as a user interrupting a long `cluster`)."""

    def __init__(self, limit: int):
        self.limit, self.done = limit, 0

    def advance(self, n: float = 1) -> None:
        self.done += int(n)
        if self.done >= self.limit:
            raise KeyboardInterrupt


def test_an_interrupted_embedding_keeps_what_it_saved_and_the_rerun_gives_identical_vectors(tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings, "CHECKPOINT_CHUNKS", 2)
    embedder = Embedder(embeddings.DEFAULT_EMBEDDING_MODEL)
    embedder.chunk = 4  # saves every 2 chunks of 4 texts
    texts = [f"where is order ORD-{i:04d}? " + "it was due last week " * (i % 7) for i in range(30)]
    texts += texts[:5]  # repeats are encoded once
    reference, counts = embed_texts(texts, embedder, EmbeddingCache(tmp_path / "a", embedder.key))
    assert counts == {"distinct": 30, "cached": 0, "encoded": 30}

    cache = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        embed_texts(texts, embedder, EmbeddingCache(cache, embedder.key), progress=StopAfter(20))
    assert len(EmbeddingCache(cache, embedder.key)) == 16  # two saves of 8; the 4 texts of the third part were lost
    resumed, counts = embed_texts(texts, embedder, EmbeddingCache(cache, embedder.key))
    assert counts == {"distinct": 30, "cached": 16, "encoded": 14}
    assert np.array_equal(resumed, reference)  # the same chunks as one uninterrupted run: identical to the bit
    again, counts = embed_texts(texts, embedder, EmbeddingCache(cache, embedder.key))
    assert counts["encoded"] == 0 and np.array_equal(again, reference)
