"""Models loaded in threads: concurrent first use of an embedder must not break later model loads
(transformers keeps loading switches in module globals; two loads at once left them wrong, and the
next model came up with its tied lm_head on the meta device)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from slmconvert.embeddings import Embedder
from tests.conftest import tiny_model_folder


def test_concurrent_first_use_of_an_embedder_leaves_later_loads_intact(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_folder(tmp_path / "tiny")
    embedder = Embedder()
    start = threading.Barrier(6)

    def first_use(i):
        start.wait()
        return embedder.encode([f"where is order {i}?"]).shape

    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(first_use, range(6))) == {(1, embedder.dim)}
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
