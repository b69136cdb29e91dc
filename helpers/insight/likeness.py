"""How alike photos are: perceptual hashes, nearest neighbours by cosine, and the groups of
near-duplicates (edited copies of one photo, or the same shot reframed) they make."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Near-duplicates, measured on course photos and edited copies: halved and re-encoded at
# quality 70, or recoloured, the 64-bit pHash moves 0-8 bits and pooled features may fall to
# a cosine of 0.75; cropped 5 % a side, the hash moves 12-18 bits while pooled features stay
# above 0.90 and the trunk's 7 x 7 maps mostly above 0.85. Distinct shots of one flower reach
# 0.97 pooled, but seldom the maps' threshold too.
NEAR_HASH_BITS = 6  # hashes this close ...
NEAR_HASH_COSINE = 0.7  # ... with pooled features this alike (not a chance collision)
NEAR_COSINE = 0.90  # or pooled features this alike ...
NEAR_MAP_COSINE = 0.86  # ... and spatial maps this alike: the same shot, cropped or reframed
NEIGHBOURS = 5  # rows compared with each row


def image_facts(paths: list[str]) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """Each image's 64-bit perceptual hash, its (width, height), and its grey-level spread."""
    from imagehash import phash
    from PIL import Image

    def facts(path: str) -> tuple[int, tuple[int, int], float]:
        with Image.open(path) as image:
            size = image.size
            image.draft("L", (64, 64))  # JPEG: decode at a fraction of the size, fast
            grey = image.convert("L")
        bits = phash(grey).hash.flatten()
        spread = float(np.asarray(grey.resize((32, 32)), dtype=np.float32).std())
        return int("".join("1" if b else "0" for b in bits), 2), size, spread

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        found = list(pool.map(facts, paths))
    hashes = np.array([h for h, _, _ in found], dtype=np.uint64)
    return hashes, [s for _, s, _ in found], np.array([s for _, _, s in found])


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def neighbours(features: np.ndarray, *, k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosines of each row's k most alike other rows, most alike first."""
    rows = unit(features.astype(np.float32))
    k = max(1, min(k, len(rows) - 1))
    index, cosine = [], []
    for start in range(0, len(rows), 1024):
        sims = rows[start:start + 1024] @ rows.T
        own = np.arange(len(sims))
        sims[own, own + start] = -np.inf  # never one's own neighbour
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1)
        index.append(np.take_along_axis(top, order, axis=1))
        cosine.append(np.take_along_axis(top_sims, order, axis=1))
    return np.concatenate(index), np.concatenate(cosine)


def _hash_pairs(hashes: np.ndarray, *, bits: int) -> list[tuple[int, int]]:
    """Pairs (i < j) of perceptual hashes at most `bits` apart."""
    pairs = []
    for start in range(0, len(hashes), 1024):
        distance = np.bitwise_count(hashes[start:start + 1024, None] ^ hashes[None, :])
        for i, j in zip(*np.nonzero(distance <= bits), strict=True):
            if start + i < j:
                pairs.append((int(start + i), int(j)))
    return pairs


def _groups(pairs: list[tuple[int, int]], n: int) -> list[list[int]]:
    """Connected groups (two or more) of the graph on n nodes with these edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = (list(side) for side in zip(*pairs, strict=True)) if pairs else ([], [])
    _, component = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)))
    members: dict[int, list[int]] = {}
    for node, c in enumerate(component.tolist()):
        members.setdefault(c, []).append(node)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: g[0])


def _map_cosine(maps: torch.Tensor, pairs: list[tuple[int, int]]) -> np.ndarray:
    """The cosine of the two trunk maps of each pair."""
    if not pairs:
        return np.zeros(0)
    i, j = (torch.tensor(side) for side in zip(*pairs, strict=True))
    a, b = maps[i].float(), maps[j].float()
    return torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()


def near_duplicate_groups(pooled: np.ndarray, maps: torch.Tensor, hashes: np.ndarray, *,
                          exact: list[list[int]]) -> list[list[int]]:
    """Groups of edited copies and reframed shots (see NEAR_* above); groups made only of
    byte-identical files (reported as exact duplicates) are left out."""
    index, cosine = neighbours(pooled)
    alike = [(i, int(j)) for i in range(len(index))
             for j, c in zip(index[i], cosine[i], strict=True) if c >= NEAR_COSINE]
    pairs = [p for p, c in zip(alike, _map_cosine(maps, alike), strict=True)
             if c >= NEAR_MAP_COSINE]
    rows = unit(pooled.astype(np.float32))
    pairs += [(i, j) for i, j in _hash_pairs(hashes, bits=NEAR_HASH_BITS)
              if float(rows[i] @ rows[j]) >= NEAR_HASH_COSINE]
    same = {i: group[0] for group in exact for i in group}
    return [g for g in _groups(pairs, len(pooled)) if len({same.get(i, i) for i in g}) > 1]
