"""Token tables and torch-free encoders against open_clip's tokenizer.

"Normalised text" below means: lower case, runs of whitespace collapsed to one space, stripped,
i.e. `" ".join(text.lower().split())` -- what CLIP's SimpleTokenizer does to text before
encoding (its ftfy/html cleaning does not change these names).
"""
import json
import subprocess
import sys
import textwrap

import pytest

open_clip = pytest.importorskip("open_clip")
from open_clip.tokenizer import SimpleTokenizer, default_bpe  # noqa: E402
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # noqa: E402

from novic.bpe import ClipBpeEncoder, EncoderError, SentencePieceEncoder  # noqa: E402
from novic.model.tokenizer import TokenizerError, build_noun_vocab, encode_nouns  # noqa: E402
from novic.tokens import TokenTable, TokenTableError  # noqa: E402


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def naive_plural(name: str) -> str:
    """'kite (bird of prey)' -> 'kites (bird of prey)', 'box' -> 'boxes'."""
    head, paren, rest = name.partition(" (")
    return head + ("es" if head.endswith(("s", "x", "ch", "sh")) else "s") + paren + rest


CLASSNAMES = list(IMAGENET_CLASSNAMES)
NOUNS = CLASSNAMES + [naive_plural(n) for n in CLASSNAMES]
# Beyond ImageNet: accents, non-Latin scripts, digits, underscores, odd spacing.
EXTRA = ["crème brûlée", "jalapeño", "Škoda octavia", "北京烤鸭", "7up can", "1000 islands",
         "t-shirt", "rock 'n' roll", "r&b singer", "snake_case", "  big   dog  ", "Æbleskiver"]


@pytest.fixture(scope="module")
def simple():
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def clip_vocab(simple):
    return build_noun_vocab(simple, NOUNS + EXTRA)


# --- CLIP BPE: SimpleTokenizer -> compact -> TokenTable.decode --------------------------------
def test_clip_imagenet_names_and_plurals_round_trip(clip_vocab):
    table = clip_vocab.table
    for noun, seq in zip(clip_vocab.nouns[:len(NOUNS)], clip_vocab.noun_tokens):
        assert seq[-1] == 0 and 0 not in seq[:-1]
        assert table.decode(seq) == normalise(noun), noun


def test_clip_decode_loses_only_whitespace(clip_vocab):
    # CLIP's pre-tokeniser drops whitespace, so only the spacing may differ from the input.
    for noun, seq in zip(clip_vocab.nouns, clip_vocab.noun_tokens):
        assert clip_vocab.table.decode(seq).replace(" ", "") == normalise(noun).replace(" ", "")
    decode = dict(zip(clip_vocab.nouns, map(clip_vocab.table.decode, clip_vocab.noun_tokens)))
    assert decode["1000 islands"] == "1000 islands"   # digits are one token each, re-joined
    assert decode["crème brûlée"] == "crème brûlée"   # multi-byte characters reassembled
    assert decode["北京烤鸭"] == "北京烤鸭"


def test_compact_ids_are_dense_and_ordered(simple, clip_vocab):
    table = clip_vocab.table
    used = sorted({i for n in clip_vocab.nouns for i in simple.encode(n)})
    assert table.tokenizer_ids[1:] == used                    # 1..V-1 in tokenizer-id order
    assert table.tokenizer_ids[0] == simple.eot_token_id
    assert table.pieces[1:] == [simple.decoder[i] for i in used]
    for noun, seq in zip(clip_vocab.nouns, clip_vocab.noun_tokens):
        assert [table.tokenizer_ids[c] for c in seq[:-1]] == simple.encode(noun)
        assert table.compact_ids(simple.encode(noun)) == seq[:-1]
    assert clip_vocab.max_tokens == max(len(s) for s in clip_vocab.noun_tokens)
    assert clip_vocab.max_tokens == max(len(simple.encode(n)) for n in clip_vocab.nouns) + 1


def test_decode_stops_at_first_eos(clip_vocab):
    seq = clip_vocab.noun_tokens[0]
    text = clip_vocab.table.decode(seq)
    assert clip_vocab.table.decode(seq[:-1] + [0] + clip_vocab.noun_tokens[1]) == text
    assert clip_vocab.table.decode([0] + seq) == ""


def test_compact_ids_and_decode_reject_unknown_ids(simple, clip_vocab):
    unknown = next(i for i in range(49406) if i not in set(clip_vocab.table.tokenizer_ids))
    with pytest.raises(TokenTableError, match=rf"tokenizer ids \[{unknown}\] are not in the token table"):
        clip_vocab.table.compact_ids([unknown])
    with pytest.raises(TokenTableError, match="outside the token table"):
        clip_vocab.table.decode([clip_vocab.table.vocab_size])
    with pytest.raises(TokenizerError, match="'zyzzyva quokka'"):
        encode_nouns(simple, build_noun_vocab(simple, ["dog"]).table, ["zyzzyva quokka"])


def test_table_dict_round_trip(clip_vocab):
    table = clip_vocab.table
    again = TokenTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table and again.vocab_size == table.vocab_size == len(table.pieces)
    assert again.decode(clip_vocab.noun_tokens[5]) == table.decode(clip_vocab.noun_tokens[5])


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(kind="wordpiece"), "kind 'wordpiece'"),
    (lambda d: d["pieces"].__setitem__(0, "x"), "pieces\\[0\\] must be ''"),
    (lambda d: d["tokenizer_ids"].pop(), "pieces but .* tokenizer ids"),
    (lambda d: d["tokenizer_ids"].__setitem__(2, d["tokenizer_ids"][1]), "must increase"),
    (lambda d: d["pieces"].__setitem__(1, "\n"), "not a CLIP byte-level BPE token"),
    (lambda d: d.update(vocab_size=3), "vocab_size 3"),
    (lambda d: d.pop("pieces"), "missing keys \\['pieces'\\]"),
    (lambda d: d.update(clean="shout"), "clean 'shout'"),
])
def test_bad_table_dicts_are_rejected(clip_vocab, change, message):
    data = json.loads(json.dumps(clip_vocab.table.to_dict()))
    change(data)
    with pytest.raises(ValueError, match=message) as info:
        TokenTable.from_dict(data)
    assert str(info.value).startswith("invalid token table: ")


def test_empty_noun_is_rejected(simple):
    with pytest.raises(TokenizerError, match="tokenises to nothing"):
        build_noun_vocab(simple, ["dog", "   "])


# --- the pure-Python CLIP BPE encoder --------------------------------------------------------
@pytest.mark.parametrize("use_regex", [True, False])
def test_pure_python_bpe_equals_simple_tokenizer(simple, use_regex):
    enc = ClipBpeEncoder(default_bpe(), use_regex=use_regex)
    texts = NOUNS + EXTRA + ["a photo of a {}.".format(n) for n in CLASSNAMES[:50]]
    if not use_regex:  # the `re` fallback is promised for ASCII/Latin text only
        texts = [t for t in texts if all(ord(c) < 0x250 for c in t)]
    mismatches = [t for t in texts if enc.encode(t) != simple.encode(t)]
    assert not mismatches
    assert (enc.sot_id, enc.eot_id, enc.vocab_size) == (simple.sot_token_id, simple.eot_token_id,
                                                        simple.vocab_size)


def test_table_from_pure_python_encoder_equals_open_clip(simple, clip_vocab):
    vocab = build_noun_vocab(ClipBpeEncoder(default_bpe()), NOUNS + EXTRA)
    assert vocab.table == clip_vocab.table and vocab.noun_tokens == clip_vocab.noun_tokens


def test_bpe_encoder_bad_merges_file(tmp_path):
    with pytest.raises(EncoderError, match="BPE merges file not found"):
        ClipBpeEncoder(tmp_path / "missing.txt.gz")
    bad = tmp_path / "merges.txt"
    bad.write_text("header\na b\n")
    with pytest.raises(EncoderError, match="is not CLIP's BPE merges file"):
        ClipBpeEncoder(bad)


def test_runtime_encodes_and_decodes_without_torch(clip_vocab):
    code = textwrap.dedent(f"""
        import sys, json
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "open_clip", "onnx", "safetensors"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from novic.bpe import ClipBpeEncoder
        from novic.tokens import TokenTable
        table = TokenTable.from_dict(json.loads(sys.stdin.read()))
        enc = ClipBpeEncoder({str(default_bpe())!r})
        print(table.decode(table.compact_ids(enc.encode("Geoffroy's spider monkeys")) + [0]))
    """)
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(clip_vocab.table.to_dict()),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "geoffroy's spider monkeys"


# --- sentencepiece (SigLIP family) -----------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("spm") / "nouns"
    # Non-ASCII nouns occur once: with character_coverage < 1 their rare characters are not in
    # the vocabulary and must go through byte fallback.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(NOUNS + EXTRA), model_prefix=str(prefix), vocab_size=800,
        model_type="unigram", byte_fallback=True, character_coverage=0.995,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model"), str(prefix) + ".model"


def test_sentencepiece_round_trip_with_byte_fallback(sp_model):
    sp, _ = sp_model
    nouns = NOUNS + EXTRA
    vocab = build_noun_vocab(sp, nouns, clean="none")
    table = vocab.table
    assert table.kind == "sentencepiece" and table.tokenizer_ids[0] == sp.eos_id()
    assert any(p.startswith("<0x") for p in table.pieces)  # byte fallback really exercised
    for noun, seq in zip(nouns, vocab.noun_tokens):
        assert [table.tokenizer_ids[c] for c in seq[:-1]] == sp.encode(noun)
        assert normalise(table.decode(seq)) == normalise(noun), noun
    assert TokenTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_sentencepiece_canonicalize_clean(sp_model):
    sp, path = sp_model
    vocab = build_noun_vocab(sp, ["St. Bernard", "Geoffroy's spider_monkey"], clean="canonicalize")
    assert [vocab.table.decode(s) for s in vocab.noun_tokens] == ["st bernard", "geoffroys spider monkey"]
    enc = SentencePieceEncoder(path)  # runtime encoder: same ids, same default cleaning
    assert enc.clean == vocab.table.clean == "canonicalize"
    assert encode_nouns(enc, vocab.table, ["st bernard"]) == vocab.noun_tokens[:1]


def test_sentencepiece_encoder_missing_model(tmp_path):
    with pytest.raises(EncoderError, match="sentencepiece model not found"):
        SentencePieceEncoder(tmp_path / "none.model")
