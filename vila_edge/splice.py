"""Token splicer: prompt text with <image> placeholders -> token ids + where each tile's features go.

Two conventions (NVlabs/VILA@1c88211:llava/mm_utils.py tokenizer_image_token;
NVlabs/VILA@36f6adc:llava/model/llava_arch.py): SENTINEL (VILA1.5: VILA's tokenizer_image_token, the
placeholder becomes the tile's features and nothing else) and MEDIA_TOKEN (NVILA: the real <image>
token becomes the features followed by the embedding of tokenizer("\n")).
"""
import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from vila_edge.errors import PromptError
from vila_edge.families import IMAGE_TOKEN_INDEX, PLACEHOLDER, SENTINEL, Family
from vila_edge.manifest import TokenInfo

IMAGE_POSITION = -1   # id stored at feature positions; never looked up in the embedding table


@dataclass
class SplicedPrompt:
    ids: np.ndarray      # int64 [T]; IMAGE_POSITION where features go
    spans: list          # (start, tile index): tile features occupy ids[start : start + tokens_per_tile]
    keys: np.ndarray     # int64 [T]: KV block-hash keys (token id, or a hash of tile content + offset)


def tile_keys(digest: bytes, n: int) -> np.ndarray:
    """Negative 63-bit keys for a tile's feature positions, so they never equal a token id."""
    out = np.empty(n, np.int64)
    for i in range(n):
        h = hashlib.blake2b(digest + struct.pack("<q", i), digest_size=8).digest()
        out[i] = -1 - (int.from_bytes(h, "little") >> 1)
    return out


def tokenizer_image_token(encode, text: str, bos_id: int | None) -> list:
    """VILA's tokenizer_image_token (NVlabs/VILA@1c88211:llava/mm_utils.py): `text` split at each
    placeholder, every chunk tokenized by `encode` (which may add BOS); when the first chunk starts
    with BOS, the first id of every chunk is dropped and one BOS kept at the front. Each
    placeholder becomes IMAGE_TOKEN_INDEX."""
    chunks = [encode(c) for c in text.split(PLACEHOLDER)]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == bos_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


class Splicer:
    def __init__(self, tokenizer, family: Family, tokens: TokenInfo, tokens_per_tile: int, image_mode: str):
        self.tok, self.family, self.tokens = tokenizer, family, tokens
        self.tokens_per_tile, self.image_mode = tokens_per_tile, image_mode
        end = family.media_end_text
        self.end_ids = self._encode(end) if end else []

    def _encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=True).ids

    def expand(self, text: str, tiles_per_image: list) -> str:
        """Check the placeholder count and, with DYNAMIC tiling, write one placeholder per tile."""
        n = text.count(PLACEHOLDER)
        if n != len(tiles_per_image):
            raise PromptError(f"prompt has {n} {PLACEHOLDER} placeholders but {len(tiles_per_image)} images were given")
        pieces = text.split(PLACEHOLDER)
        out = pieces[0]
        for tiles, piece in zip(tiles_per_image, pieces[1:]):
            out += self.family.image_text(tiles, self.image_mode) + piece
        return out

    def ids_with_markers(self, text: str) -> list:
        """Token ids with one marker per tile: IMAGE_TOKEN_INDEX (SENTINEL) or the <image> id."""
        if self.family.splice != SENTINEL:
            return self._encode(text)
        return tokenizer_image_token(self._encode, text, self.tokens.bos_id)

    def splice(self, text: str, tile_digests: list) -> SplicedPrompt:
        """`text` already expanded; one digest (bytes) per tile, in prompt order."""
        marker = IMAGE_TOKEN_INDEX if self.family.splice == SENTINEL else self.tokens.image_token_id
        ids, keys, spans, k = [], [], [], 0
        for i in self.ids_with_markers(text):
            if i != marker:
                ids.append(i)
                keys.append(i)
                continue
            if k >= len(tile_digests):
                raise PromptError(f"prompt has more image markers than the {len(tile_digests)} image tiles given")
            spans.append((len(ids), k))
            ids.extend([IMAGE_POSITION] * self.tokens_per_tile)
            keys.extend(tile_keys(tile_digests[k], self.tokens_per_tile).tolist())
            ids.extend(self.end_ids)
            keys.extend(self.end_ids)
            k += 1
        if k != len(tile_digests):
            raise PromptError(f"prompt has {k} image markers but {len(tile_digests)} image tiles were given")
        return SplicedPrompt(np.asarray(ids, np.int64), spans, np.asarray(keys, np.int64))
