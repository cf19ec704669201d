"""nsfw-detoxify: the real-checkpoint path on a tiny XLM-R the tests build, weight checks, and random weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers

from d2m_core.compute.models import detoxify as dtx
from d2m_core.compute.weights import RANDOM_WEIGHTS_ENV, ResolvedWeights, WeightsError, WeightsFile, resolve_weights, sha256_of
from d2m_core.outputs.records import WeightsRecord

WORDS = "the quick brown fox jumps over lazy dog photo of a red car shut up you liar beautiful sunset sea".split()
TEXTS = ["shut up, you liar", "a photo of a red car", "Beautiful sunset over the sea, the quick brown fox jumps", "dog"]
LONG = " ".join(WORDS * 40)  # well over 512 tokens
IDENTITY_CLASSES = ["male", "female", "homosexual_gay_or_lesbian", "christian", "jewish", "muslim", "black", "white",
                    "psychiatric_or_mental_illness"]


def _tokenizer_folder(folder: Path, kind: str) -> transformers.PreTrainedTokenizerBase:
    """An XLM-R tokenizer folder as the hub has it: tokenizer.json, or only sentencepiece.bpe.model."""
    folder.mkdir(parents=True)
    if kind == "sentencepiece":
        # the real file's layout: <unk>=0, <s>=1, </s>=2, pieces from 3 (transformers adds the fairseq offset)
        corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_prefix=str(folder / "sentencepiece.bpe"), vocab_size=60,
            model_type="unigram", unk_id=0, bos_id=1, eos_id=2, hard_vocab_limit=False, minloglevel=2,
        )
        (folder / "sentencepiece.bpe.vocab").unlink()
    else:
        pieces = [("▁" + w, -5.0) for w in WORDS] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz,."]
        pieces += [("▁" + c, -10.0) for c in "abcdefghijklmnopqrstuvwxyzB"]
        vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, ("<mask>", 0.0)]
        transformers.XLMRobertaTokenizer(vocab=vocab).save_pretrained(folder)  # no model_max_length: unbounded
    return transformers.XLMRobertaTokenizer.from_pretrained(str(folder), local_files_only=True)


def _make_weights(root: Path, kind: str = "tokenizer.json") -> Path:
    """A detoxify-format checkpoint of a tiny XLM-R (16 outputs, 7 classes) plus its xlm-roberta-base/ folder."""
    folder = root / dtx.TOKENIZER_DIR
    tok = _tokenizer_folder(folder, kind)
    base = transformers.XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    base.save_pretrained(folder)  # the stock config.json: no num_labels (so 2 by default)
    torch.manual_seed(1)
    model = transformers.XLMRobertaForSequenceClassification(transformers.XLMRobertaConfig(**base.to_dict() | {"num_labels": 16}))
    with torch.no_grad():
        model.classifier.out_proj.weight.mul_(20)
        model.classifier.out_proj.bias[7:] = 8.0  # identity outputs near 1: a max over all 16 would be wrong
    ckpt = {
        "config": {
            "arch": {"args": {"num_classes": 16, "model_type": "xlm-roberta-base",
                              "model_name": "XLMRobertaForSequenceClassification",
                              "tokenizer_name": "XLMRobertaTokenizer"}},
            "dataset": {"args": {"classes": dtx.CLASSES, "identity_classes": IDENTITY_CLASSES}},
        },
        "state_dict": model.state_dict(),
    }
    path = root / dtx.CHECKPOINT_NAME
    torch.save(ckpt, path)
    return path


def _pin(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the release's sha256 prefix to this test checkpoint's."""
    spec = dtx.DetoxifyMultilingual.weights_files[0]
    monkeypatch.setattr(dtx.DetoxifyMultilingual, "weights_files",
                        [WeightsFile(spec.filename, spec.format, None, spec.source, sha256_prefix=sha256_of(path)[:8])])


def _resolve(root: Path, monkeypatch: pytest.MonkeyPatch) -> ResolvedWeights:
    monkeypatch.delenv(RANDOM_WEIGHTS_ENV, raising=False)
    return resolve_weights(dtx.DetoxifyMultilingual.name, dtx.DetoxifyMultilingual.weights_files, root)


def _reference(root: Path, texts: list[str]) -> torch.Tensor:
    """max(sigmoid(logits[:, :7])) with plain transformers, independent of d2m's loader."""
    ckpt = torch.load(root / dtx.CHECKPOINT_NAME, weights_only=True)
    folder = root / dtx.TOKENIZER_DIR
    config = transformers.XLMRobertaConfig.from_pretrained(str(folder), num_labels=16, local_files_only=True)
    model = transformers.XLMRobertaForSequenceClassification(config).eval()
    model.load_state_dict(ckpt["state_dict"])
    tok = transformers.XLMRobertaTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = tok(texts, return_tensors="pt", truncation=True, padding=True, max_length=512)
    with torch.no_grad():
        logits = model(**enc).logits
    return torch.sigmoid(logits)[:, :7].max(dim=1).values


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_real_checkpoint_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    path = _make_weights(tmp_path, kind)
    _pin(path, monkeypatch)
    weights = _resolve(tmp_path, monkeypatch)
    assert not weights.is_random and weights.path == path and weights.file.format == "detoxify-ckpt"
    model = dtx.DetoxifyMultilingual(torch.device("cpu"), weights=weights)
    assert model.model.config.num_labels == 16 and model.class_names == dtx.CLASSES

    seen: list[torch.Tensor] = []
    tokenize = model.tokenize
    monkeypatch.setattr(model, "tokenize", lambda texts: seen.append(tokenize(texts)["input_ids"]) or tokenize(texts))

    (scores,) = model(TEXTS)
    assert scores.shape == (len(TEXTS),) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, _reference(tmp_path, TEXTS))
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert seen[-1].shape == (len(TEXTS), max(lengths)) and max(lengths) < 40  # padded to the longest, not to 512
    assert not torch.allclose(scores, torch.ones_like(scores))  # the identity outputs (~1) are not in the max

    (one,) = model([TEXTS[1]])
    assert one.shape == (1,) and seen[-1].shape == (1, lengths[1])
    torch.testing.assert_close(one, scores[1:2], atol=1e-5, rtol=1e-5)

    (long,) = model([LONG, "dog"])  # truncated to the model maximum even though the folder sets none
    assert seen[-1].shape == (2, 512)
    torch.testing.assert_close(long, _reference(tmp_path, [LONG, "dog"]))

    if kind == "sentencepiece":  # same ids as the seed's slow tokenizer: sentencepiece + fairseq offset
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / dtx.TOKENIZER_DIR / "sentencepiece.bpe.model"))
        ids = [i + 1 if i > 2 else 3 for i in sp.encode(TEXTS[2])]
        assert model.tokenizer(TEXTS[2])["input_ids"] == [0, *ids, 2]
    else:  # and detoxify's own predict (the hub name swapped for the local folder) gives the same scores
        from detoxify import Detoxify

        ckpt = torch.load(path, weights_only=True)
        ckpt["config"]["arch"]["args"]["model_type"] = str(tmp_path / dtx.TOKENIZER_DIR)
        local = tmp_path / "local.ckpt"
        torch.save(ckpt, local)
        results = Detoxify(checkpoint=str(local)).predict(TEXTS)
        assert sorted(results) == sorted(dtx.CLASSES)
        expected = torch.tensor([results[c] for c in dtx.CLASSES]).max(dim=0).values
        torch.testing.assert_close(scores, expected)


def test_wrong_sha256_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make_weights(tmp_path)
    assert not sha256_of(path).startswith(dtx.EXPECTED_SHA256_PREFIX)
    with pytest.raises(WeightsError, match=dtx.CHECKPOINT_NAME) as err:
        _resolve(tmp_path, monkeypatch)
    assert "0b549669" in str(err.value) and "github.com/unitaryai/detoxify" in str(err.value)


def test_checkpoint_missing_a_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make_weights(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["roberta.encoder.layer.1.output.dense.weight"]
    torch.save(ckpt, path)
    _pin(path, monkeypatch)
    with pytest.raises(WeightsError, match="layer.1.output.dense.weight"):
        dtx.DetoxifyMultilingual("cpu", weights=_resolve(tmp_path, monkeypatch))


def test_missing_tokenizer_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make_weights(tmp_path)
    _pin(path, monkeypatch)
    weights = _resolve(tmp_path, monkeypatch)
    folder = tmp_path / dtx.TOKENIZER_DIR
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="xlm-roberta-base") as err:
        dtx.DetoxifyMultilingual("cpu", weights=weights)
    assert str(folder) in str(err.value) and "huggingface.co" in str(err.value)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    with pytest.raises(WeightsError, match=str(folder)):
        dtx.DetoxifyMultilingual("cpu", weights=weights)


def test_random_weights_real_architecture() -> None:
    weights = ResolvedWeights(WeightsRecord(model=dtx.DetoxifyMultilingual.name, kind="random"))
    captions = ["a photo of a dog", "IMG_0042 — édition limitée | high resolution", "Привет мир", ""]
    first = dtx.DetoxifyMultilingual(torch.device("cpu"), weights=weights)
    cfg = first.model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.max_position_embeddings, cfg.num_labels) == (250002, 768, 12, 12, 514, 16)
    enc = first.tokenize(captions + [dtx.CLASSES[0] * 400])
    assert enc["input_ids"].max() < 250002 and enc["input_ids"].shape[1] == 512
    (a,) = first(captions)
    # a last batch of one caption: the seed's wrapper raises IndexError there (Detoxify.predict returns
    # scalars); d2m scores it, as in a larger batch
    (one,) = first(captions[1:2])
    assert one.shape == (1,) and one.dtype == torch.float32
    torch.testing.assert_close(one[0], a[1], atol=1e-5, rtol=0)
    del first
    (b,) = dtx.DetoxifyMultilingual(torch.device("cpu"), weights=weights)(copy.copy(captions))
    assert a.shape == (4,) and a.dtype == torch.float32
    assert ((a >= 0) & (a <= 1)).all()
    torch.testing.assert_close(a, b, atol=0, rtol=0)

