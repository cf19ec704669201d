"""Caption tests of DataComp's baselines: fastText language id, gcld3 English, WordNet entities.

Each follows DataComp's baselines/apply_filter.py: newlines become spaces before language id; fastText's top-1
label (`__label__en`); gcld3 `NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)`; a caption holds
an ImageNet-21k entity when, for some whitespace-separated word, the first WordNet synset of that word
(`wordnet.synsets(word)[0]`, any part of speech) has its offset in the ImageNet-21k id set.
gcld3 comes from the `cld3-py` wheel: the same CLD3 sources and embedded model as Google's `gcld3` package,
under the same module name and API, built for current Pythons (the `gcld3` release has no wheels).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FASTTEXT_LABEL = "__label__"


class FastTextLanguage:
    """A fastText language-id model: `language(texts)` gives each text's top-1 language code."""

    def __init__(self, path: Path) -> None:
        import fasttext

        fasttext.FastText.eprint = lambda *_: None  # load_model's deprecation notice on stderr, as DataComp
        self._model = fasttext.load_model(str(path))
        self._lock = threading.Lock()

    def languages(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.array([], dtype=object)
        with self._lock:
            labels, _ = self._model.predict([t.replace("\n", " ") for t in texts], k=1)
        return np.array([row[0][len(FASTTEXT_LABEL):] if row else "" for row in labels], dtype=object)

    @staticmethod
    def token_counts(texts: Sequence[str]) -> np.ndarray:
        """fastText's own tokenizer, as the image-based caption filter counts words."""
        import fasttext

        return np.array([len(fasttext.tokenize(t)) for t in texts], np.int64)


def gcld3_english(texts: Sequence[str]) -> np.ndarray:
    """True where gcld3 finds English (DataComp's LAION-2B reproduction)."""
    import gcld3

    identifier = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    return np.array([identifier.FindLanguage(text=t.replace("\n", " ")).language == "en" for t in texts], bool)


def _wordnet_reader(wordnet_path: Path):
    """NLTK's WordNet reader over a `wordnet/` folder or NLTK's `wordnet.zip`, found as NLTK finds its own
    corpus (`corpora/wordnet` on its data path: its reader looks itself up there), so the lookups are
    DataComp's `nltk.corpus.wordnet` lookups."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    target = wordnet_path.resolve()
    root = Path(tempfile.mkdtemp(prefix="d2m-nltk-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "corpora").mkdir()
    (root / "corpora" / ("wordnet.zip" if target.is_file() else "wordnet")).symlink_to(target)
    nltk.data.path.insert(0, str(root))
    if str(target.parent) not in nltk.data.path:  # NLTK reads only below its data paths: trust the configured one
        nltk.data.path.append(str(target.parent))
    with warnings.catch_warnings():  # "multilingual functions are not available": not used here
        warnings.simplefilter("ignore")
        reader = LazyCorpusLoader("wordnet", WordNetCorpusReader, None)
        reader.ensure_loaded()
    return reader


class WordNetEntities:
    """`contains(texts)`: whether a caption names one of the entity synsets (by offset), as DataComp's text filter."""

    def __init__(self, wordnet_path: Path, entity_ids_path: Path) -> None:
        self._reader = _wordnet_reader(wordnet_path)
        lines = [x.strip() for x in entity_ids_path.read_text().splitlines()]
        self.entities = frozenset(int(x[1:]) for x in lines if x)  # "n01440764" -> 1440764
        self._lock = threading.Lock()

    @functools.lru_cache(maxsize=1 << 20)
    def _first_offset(self, word: str) -> int | None:
        with self._lock:  # nltk's lazy loading is not thread safe
            synsets = self._reader.synsets(word)
        return synsets[0].offset() if synsets else None

    def contains(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(texts), bool)
        for i, text in enumerate(texts):
            out[i] = any(self._first_offset(w) in self.entities for w in text.split())
        return out
