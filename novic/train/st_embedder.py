"""A sentence-transformers model as a text embedder (the protocol in novic.train.cache):
e.g. all-MiniLM-L6-v2 (384-d), a real text space for benchmarks that runs offline on a CPU."""
from __future__ import annotations

import numpy as np


class SentenceTransformerEmbedder:
    def __init__(self, model: str, device="cpu"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError("embedder.type=sentence_transformers needs the sentence-transformers "
                              "package (pip install sentence-transformers)") from None
        self.name = f"sentence-transformers:{model}"
        self.model = SentenceTransformer(model, device=str(device))
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.tokenizer = None  # decoder output tokens use CLIP BPE (novic.train.data.output_tokenizer)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=256, normalize_embeddings=True,
                                 convert_to_numpy=True).astype(np.float32)
