"""The offline corpus backend: JSONL fact documents and an image folder with captions, ranked by BM25.

Layout of a corpus directory:

- ``facts.jsonl``: one document per line, ``{"id", "title", "url", "text"}``;
- ``images.jsonl``: one image per line, ``{"id", "file", "title", "caption", "url", "page_url"}``
  with ``file`` relative to the directory.

Ranking is BM25 (bm25s) over our own tokenisation (lower-cased words, a short stop list and a light
suffix stemmer), with ties broken by corpus order, so results are deterministic.
"""
from __future__ import annotations

import json
import logging
import os
import re

import bm25s
import numpy as np

from genevolve_jax.agent.tools.base import ImageHit, WebResult

# bm25s sets its own logger to DEBUG, so every index build printed "Building index from tokens"
# through whatever root handler exists (absl installs one). Its warnings still show.
logging.getLogger("bm25s").setLevel(logging.WARNING)

_STOP = frozenset("a an and are as at be by for from has have in is it its of on or that the this to was "
                  "were with what which who how show me".split())
_WORD = re.compile(r"[a-z0-9]+")


def default_corpus_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))), "data", "demo_corpus")


def _stem(word: str) -> str:
    for suffix in ("ies", "es", "s", "ing", "ed"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def tokenize(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]


def _read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            for key in required:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{lineno}: missing or empty string field {key!r}")
            rows.append(row)
    return rows


class _Index:
    def __init__(self, texts: list[str]):
        self.size = len(texts)
        self.bm25 = bm25s.BM25()
        if texts:
            # bm25s needs at least one token per document.
            self.bm25.index([tokenize(t) or ["_empty_"] for t in texts], show_progress=False)

    def top(self, query: str, k: int) -> list[int]:
        tokens = tokenize(query)
        if not tokens or not self.size:
            return []
        scores = np.asarray(self.bm25.get_scores(tokens), dtype=np.float64)
        order = sorted(range(self.size), key=lambda i: (-round(float(scores[i]), 9), i))
        return [i for i in order[:k] if scores[i] > 0]


class OfflineCorpus:
    """Search and image search over a corpus directory; the same query always gives the same hits."""

    name = "offline"

    def __init__(self, corpus_dir: str | None = None, snippet_chars: int = 400):
        self.corpus_dir = os.path.abspath(corpus_dir or default_corpus_dir())
        facts_path = os.path.join(self.corpus_dir, "facts.jsonl")
        images_path = os.path.join(self.corpus_dir, "images.jsonl")
        if not os.path.isfile(facts_path) and not os.path.isfile(images_path):
            raise FileNotFoundError(f"corpus directory {self.corpus_dir} has neither facts.jsonl nor images.jsonl")
        self.snippet_chars = snippet_chars
        self.facts = _read_jsonl(facts_path, ("title", "url", "text")) if os.path.isfile(facts_path) else []
        self.images = []
        if os.path.isfile(images_path):
            for row in _read_jsonl(images_path, ("file", "title", "caption")):
                path = os.path.join(self.corpus_dir, row["file"])
                if not os.path.isfile(path):
                    raise ValueError(f"{images_path}: image file {row['file']!r} does not exist")
                self.images.append({**row, "local_path": path})
        self._facts = _Index([f"{r['title']} {r['title']} {r['text']}" for r in self.facts])
        self._images = _Index([f"{r['title']} {r['caption']}" for r in self.images])

    async def search(self, query: str, top_k: int) -> list[WebResult]:
        out = []
        for i in self._facts.top(query, top_k):
            row = self.facts[i]
            text = row["text"]
            snippet = text if len(text) <= self.snippet_chars else text[: self.snippet_chars].rstrip() + "…"
            out.append(WebResult(title=row["title"], url=row["url"], snippet=snippet))
        return out

    async def image_search(self, query: str, top_k: int) -> list[ImageHit]:
        out = []
        for i in self._images.top(query, top_k):
            row = self.images[i]
            out.append(ImageHit(title=row["title"], url=row.get("url") or "file://" + row["local_path"],
                                local_path=row["local_path"], page_url=row.get("page_url", ""),
                                caption=row["caption"]))
        return out

    async def aclose(self) -> None:
        return None
