"""The ASR stack of the speech → ASR → text cascade: WER, the caption language model, subword units, recognisers,
the transcript cache."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from vgskit.asr.lm import BOS, EOS, estimate_ngram_model
from vgskit.asr.recognizers import TranscriptCache, audio_sha256, compound_pronunciation
from vgskit.asr.wer import corpus_wer, normalize_transcript, word_errors
from vgskit.models.milan.tokenizer import EOW, BPETokenizer, learn_bpe

# ------------------------------------------------------------------------------------------------ WER


def test_wer_matches_jiwer_on_random_sentences() -> None:
    jiwer = pytest.importorskip("jiwer")
    rng = random.Random(0)
    words = ["a", "red", "dress", "left", "of", "blue", "bag", "small"]
    refs, hyps = [], []
    for _ in range(200):
        refs.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))))
        hyps.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))))
    ours = corpus_wer(refs, hyps)
    theirs = jiwer.process_words(refs, hyps)
    assert ours.errors == theirs.substitutions + theirs.deletions + theirs.insertions
    assert ours.wer == pytest.approx(theirs.wer, abs=1e-12)
    for r, h in zip(refs[:50], hyps[:50], strict=True):  # per pair, the error count is the edit distance
        one = jiwer.process_words(r, h)
        assert word_errors(r, h).errors == one.substitutions + one.deletions + one.insertions


def test_wer_normalises_case_and_punctuation_and_counts_operations() -> None:
    assert normalize_transcript("A red T-shirt, left of Bob's bag!") == ["a", "red", "t", "shirt", "left", "of",
                                                                         "bob's", "bag"]
    e = word_errors("a red dress left of a bag", "a dress left of the big bag now")
    # red deleted; a→the and bag→big? The minimum alignment: del red, sub a→the, ins big, ins now = 4 errors.
    assert (e.errors, e.reference_words) == (4, 7)
    assert e.deletions == 1 and e.insertions == 2 and e.substitutions == 1
    assert word_errors("", "").wer == 0.0 and math.isinf(word_errors("", "extra").wer)


# ------------------------------------------------------------------------------------------------ n-gram LM


def _parse_arpa(text: str) -> tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float], dict[int, int]]:
    logprob, backoff, counts, order = {}, {}, {}, 0
    for line in text.splitlines():
        if line.startswith("ngram "):
            n, c = line[6:].split("=")
            counts[int(n)] = int(c)
        elif line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1:-7])
        elif line and not line.startswith("\\") and order:
            parts = line.split("\t")
            gram = tuple(parts[1].split())
            assert len(gram) == order
            logprob[gram] = float(parts[0])
            if len(parts) == 3:
                backoff[gram] = float(parts[2])
    return logprob, backoff, counts


def test_ngram_model_is_a_distribution_for_every_history_and_round_trips_through_arpa() -> None:
    texts = ["a red dress left of a blue bag", "a blue bag above a red dress", "a small red bag",
             "three things a red dress a bag and a shoe", "a red shoe"]
    model = estimate_ngram_model(texts, order=3)
    vocab = sorted({w for t in texts for w in t.split()} | {EOS})
    histories = [(), ("a",), ("red",), (BOS,), (BOS, "a"), ("a", "red"), ("red", "dress"), ("of", "a"),
                 ("bag", "above"), ("shoe", "zebra")]  # seen, unseen and partly seen histories
    for h in histories:
        total = sum(model.prob(w, h) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-9), (h, total)
    # Maximum likelihood where nothing is discounted: unigram "a" = 10 of the 30 tokens (+5 sentence ends).
    n_tokens = sum(len(t.split()) + 1 for t in texts)
    assert model.prob("a") == pytest.approx(sum(t.split().count("a") for t in texts) / n_tokens)
    # Seen trigram: (c - D) / c(history) with Ney's D from the trigram counts of counts.
    trigram_counts: dict[tuple[str, ...], int] = {}
    for t in texts:
        s = [BOS, *t.split(), EOS]
        for i in range(len(s) - 2):
            trigram_counts[tuple(s[i:i + 3])] = trigram_counts.get(tuple(s[i:i + 3]), 0) + 1
    n1 = sum(c == 1 for c in trigram_counts.values())
    n2 = sum(c == 2 for c in trigram_counts.values())
    d = min(max(n1 / (n1 + 2 * n2), 0.1), 0.9)
    c_hist = sum(c for g, c in trigram_counts.items() if g[:2] == ("a", "red"))
    assert model.prob("dress", ("a", "red")) == pytest.approx((trigram_counts[("a", "red", "dress")] - d) / c_hist)

    logprob, backoff, counts = _parse_arpa(model.to_arpa())
    assert counts == {n: sum(1 for g in model.logprob if len(g) == n) for n in (1, 2, 3)}
    assert logprob.keys() == model.logprob.keys()
    assert all(abs(logprob[g] - model.logprob[g]) < 1e-6 for g in logprob)
    assert logprob[(BOS,)] == -99.0
    assert all(abs(backoff.get(g, 0.0) - model.backoff.get(g, 0.0)) < 1e-6 for g in logprob if len(g) < 3)


def test_ngram_model_drops_out_of_vocabulary_words_and_rejects_empty_input() -> None:
    from vgskit.errors import ConfigError

    model = estimate_ngram_model(["a zebra bag", "a bag"], order=2, vocabulary={"a", "bag"})
    assert model.dropped_words == 1 and model.total_words == 5
    assert ("zebra",) not in model.logprob and model.prob("bag", ("a",)) > 0.5
    with pytest.raises(ConfigError, match="no \\(in-vocabulary\\) words"):
        estimate_ngram_model(["zebra"], vocabulary={"a"})


# ------------------------------------------------------------------------------------------------ BPE


def test_bpe_learns_the_most_frequent_pairs_in_order_and_round_trips() -> None:
    chars, merges = learn_bpe(["low low low lower newest newest widest"], num_merges=4, min_frequency=2)
    # Counts: (l,o) 4 first; then (e,s), (lo,w</w>), (s,t</w>), (w,e) tie at 3 and the smallest pair wins; after
    # "e s", (es,t</w>) and (lo,w</w>) tie at 3; then (lo,w</w>).
    assert merges == ["l o", "e s", "es t" + EOW, "lo w" + EOW]
    assert set(chars) == {"l", "o", "w", "w" + EOW, "e", "r" + EOW, "n", "s", "t" + EOW, "i", "d"}
    tok = BPETokenizer(chars, merges)
    for text in ("low lower newest", "widest low"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("low") == [tok.index["low" + EOW]]
    assert tok.encode("lower") == [tok.index["lo"], tok.index["w"], tok.index["e"], tok.index["r" + EOW]]
    assert 1 in tok.encode("zebra")  # an unseen character is the unknown unit


# ------------------------------------------------------------------------------------------------ cache


def test_transcript_cache_serves_only_its_own_audio_and_recognizer(tmp_path: Path) -> None:
    cache = TranscriptCache(tmp_path)
    wav = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
    sha = audio_sha256(wav)
    assert cache.get("asr-a", sha) is None
    cache.put("asr-a", sha, "a red dress")
    assert cache.get("asr-a", sha) == "a red dress"
    assert cache.get("asr-b", sha) is None  # another recogniser
    assert cache.get("asr-a", audio_sha256(wav * 0.5)) is None  # other audio
    entry = next(tmp_path.rglob("*.json"))
    entry.write_text(json.dumps({"asr": "asr-a", "audio_sha256": "0" * 64, "text": "forged"}))
    assert cache.get("asr-a", sha) is None  # an entry naming other audio is not served
    entry.write_text("{truncated")
    assert cache.get("asr-a", sha) is None


def test_compound_pronunciation_joins_two_dictionary_words() -> None:
    d = {"pull": "P UH L", "over": "OW V ER", "pul": "P AH L"}
    assert compound_pronunciation("pullover", d) == "P UH L OW V ER"
    assert compound_pronunciation("zebra", d) is None


# ------------------------------------------------------------------------------------------------ transformers


def test_transformers_ctc_recognizer_decodes_the_greedy_path_of_a_local_checkpoint(tmp_path: Path) -> None:
    """A random-weight wav2vec2 CTC checkpoint in a folder (what a user's download looks like), loaded offline."""
    transformers = pytest.importorskip("transformers")
    import torch

    from vgskit.asr.recognizers import TransformersRecognizer

    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdeilnorst")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="|")
    extractor = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                      do_normalize=True, return_attention_mask=True)
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(tmp_path)
    config = transformers.Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    model.save_pretrained(tmp_path)

    rng = np.random.default_rng(0)
    wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8000, 12000)]
    recognizer = TransformersRecognizer(str(tmp_path), local_files_only=True, batch_size=1)
    got = recognizer.transcribe(wavs)
    for wav, text in zip(wavs, got, strict=True):  # the greedy CTC path of the normalised waveform
        x = torch.from_numpy((wav - wav.mean()) / np.sqrt(wav.var() + 1e-7))[None]
        with torch.no_grad():
            path = model(x).logits.argmax(-1)[0].tolist()
        assert text == tokenizer.decode(path, skip_special_tokens=True).strip() and len(text) > 20
    assert "Wav2Vec2ForCTC" in recognizer.identity

    from vgskit.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be loaded from the local cache"):
        TransformersRecognizer("nobody/no-such-asr-model", local_files_only=True)


def test_an_unwritable_transcript_cache_is_reported_once_and_skipped(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    cache = TranscriptCache(blocker / "cache")
    with caplog.at_level("WARNING"):
        cache.put("asr-a", "0" * 64, "a red dress")
        cache.put("asr-a", "1" * 64, "a blue bag")
    assert cache.unwritable and cache.get("asr-a", "0" * 64) is None
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1
