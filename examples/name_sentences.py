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

# (sentence, the noun of examples/text_nouns.txt it is about): none of these words or phrasings is
# in the template captions the decoder learned from.
SENTENCES = [
    ("My grandmother baked a chocolate layer cake with cream cheese frosting for my birthday.", "red velvet cake"),
    ("The kitten curled up on the windowsill and purred in the sun.", "cat"),
    ("He pedalled up the steep hill on his old two-wheeler.", "bicycle"),
    ("We watched the spacecraft lift off from the launch pad in a cloud of smoke.", "rocket"),
    ("The old keeper climbed the tower to light the beacon for the ships.", "lighthouse"),
    ("She tuned her instrument and rested the bow on the strings.", "violin"),
    ("A huge grey animal with a long trunk sprayed water over its back.", "elephant"),
    ("The toddler would not go to sleep without his fluffy toy.", "teddy bear"),
]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    checkpoint = argv[0]
    sentences, expected = (argv[1:], None) if argv[1:] else map(list, zip(*SENTENCES))

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
    right = 0
    for i, (sentence, hyps) in enumerate(zip(sentences, results)):
        names = [ckpt.token_table.decode(list(h.tokens)) for h in hyps[:3]]
        listed = ", ".join(f"{name} {h.prob:.2f}" for name, h in zip(names, hyps))
        mark = ""
        if expected is not None:
            right += names[0] == expected[i]
            mark = "   (right)" if names[0] == expected[i] else f"   (meant: {expected[i]})"
        print(f"{sentence}\n    -> {listed}{mark}")
    if expected is not None:
        print(f"{right} of {len(sentences)} named right at the first guess, from embeddings of wordings the "
              f"decoder never saw")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
