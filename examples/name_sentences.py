"""Name the object in sentences: a decoder trained on text embeddings, inverting new ones.

    python examples/name_sentences.py CHECKPOINT ["a sentence" ...]

NOVIC's decoder learns to name the noun of a caption from the caption's embedding alone. With a
decoder trained in the all-MiniLM-L6-v2 text space (examples/quickstart.sh trains one from template
captions such as "a photo of a tabby cat."), this embeds sentences written in other words, which
the decoder never saw, and prints the nouns it reads out of each embedding (beam search guided to
the checkpoint's noun list). With a CLIP-trained checkpoint the same decoder reads image
embeddings: that is novic-run.
"""
from __future__ import annotations

import sys

SENTENCES = [
    "My grandmother baked a chocolate layer cake with cream cheese frosting for my birthday.",
    "The kitten curled up on the windowsill and purred in the sun.",
    "He pedalled up the steep hill on his old two-wheeler.",
    "We watched the spacecraft lift off from the launch pad in a cloud of smoke.",
    "The old keeper climbed the tower to light the beacon for the ships.",
    "She tuned her instrument and rested the bow on the strings.",
    "A huge grey animal with a long trunk sprayed water over its back.",
    "The toddler would not go to sleep without his fluffy toy.",
]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    checkpoint, sentences = argv[0], argv[1:] or SENTENCES

    import torch

    from novic.model.checkpoint import load_checkpoint
    from novic.model.reference import beam_search
    from novic.runtime.trie import TokenTrie
    from novic.train.st_embedder import SentenceTransformerEmbedder

    ckpt = load_checkpoint(checkpoint)
    space = ckpt.embedder.model.removeprefix("sentence_transformers:")
    if not ckpt.embedder.model.startswith("sentence_transformers:"):
        print(f"error: {checkpoint} was trained on {ckpt.embedder.model}, not on a sentence-transformers "
              f"text space; use novic-run with a bundle of it", file=sys.stderr)
        return 1
    model = ckpt.build_model().eval()
    trie = TokenTrie([[t for t in seq if t != 0] for seq in ckpt.noun_tokens])
    embeds = torch.from_numpy(SentenceTransformerEmbedder(space).encode_text(sentences))
    with torch.no_grad():
        results = beam_search(model, embeds, width=5, trie=trie)
    for sentence, hyps in zip(sentences, results):
        names = ", ".join(f"{ckpt.token_table.decode(list(h.tokens))} {h.prob:.2f}" for h in hyps[:3])
        print(f"{sentence}\n    -> {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
