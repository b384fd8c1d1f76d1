"""Generated text ends on a whole character: a generation cut inside a multi-byte character
(at ``max_new_tokens``) is decoded without the U+FFFD of its partial bytes, for a
sentencepiece byte-fallback tokenizer (Llama 2) and a byte-level BPE one (Llama 3)."""
import pytest

from spmd_lora.engine import generate as gen
from spmd_lora.tiny import build_tokenizer
from spmd_lora.tokenizer import decode_whole_characters, load_tokenizer

TEXT = "naïve ☃ 日本 😀 fin"


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    build_tokenizer(out)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def byte_level():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox", "a b c"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("which", ["sentencepiece", "byte_level"])
def test_every_cut_decodes_to_a_prefix_without_replacement_characters(which, request):
    tok = request.getfixturevalue(which)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    plain = [tok.decode(ids[:n]) for n in range(1, len(ids) + 1)]
    assert any("\ufffd" in t for t in plain)       # the cuts do split characters
    for n in range(1, len(ids) + 1):
        text = decode_whole_characters(tok, ids[:n])
        assert "\ufffd" not in text and TEXT.startswith(text), (n, text)
        assert len(text) >= len(plain[n - 1].rstrip("\ufffd")) - 1   # at most the cut character
    assert decode_whole_characters(tok, ids) == TEXT


def test_invalid_bytes_inside_the_text_stay(sentencepiece):
    """A lone continuation byte the model generated mid-text is shown, not hidden."""
    lone = sentencepiece.convert_tokens_to_ids("<0x98>")
    ids = sentencepiece("ab", add_special_tokens=False)["input_ids"]
    ids = ids + [lone] + ids
    assert decode_whole_characters(sentencepiece, ids) == sentencepiece.decode(ids)
    assert "\ufffd" in sentencepiece.decode(ids)


def test_generate_text_returns_whole_characters(sentencepiece, monkeypatch):
    """generate_text decodes the generated ids on whole characters (the generator itself is
    replaced by one that stops inside the snowman's three bytes)."""
    ids = sentencepiece(TEXT, add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(1, len(ids)) if sentencepiece.decode(ids[:n]).endswith("\ufffd"))
    monkeypatch.setattr(gen, "generate", lambda model, prompts, max_new, **kw: [ids[:cut]])
    out = gen.generate_text(None, sentencepiece, ["hi"], max_new_tokens=cut)
    assert "\ufffd" not in out[0] and TEXT.startswith(out[0])
    assert out[0] in [sentencepiece.decode(ids[:cut - k]) for k in (1, 2, 3)]
