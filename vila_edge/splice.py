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
from vila_edge.text_ids import Segment, TextIds

IMAGE_POSITION = -1   # id stored at feature positions; never looked up in the embedding table


@dataclass
class SplicedPrompt:
    ids: np.ndarray      # int64 [T]; IMAGE_POSITION where features go
    spans: list          # (start, tile index): tile features occupy ids[start : start + tokens_per_tile]
    keys: np.ndarray     # int64 [T]: KV block-hash keys (token id, or a hash of tile content + offset)


def placeholder_segments(text: str) -> list:
    """A family's image text ("<image>", "<image>\\n") as an image segment + trusted rest."""
    assert text.startswith(PLACEHOLDER), text
    rest = text[len(PLACEHOLDER):]
    return [Segment(PLACEHOLDER, image=True)] + ([Segment(rest, trusted=True)] if rest else [])


def trusted_segments(text: str) -> list:
    """Text written by this program (never by a user): every "<image>" in it is a placeholder."""
    pieces = text.split(PLACEHOLDER)
    out = [Segment(pieces[0], trusted=True)]
    for piece in pieces[1:]:
        out += [Segment(PLACEHOLDER, image=True), Segment(piece, trusted=True)]
    return [s for s in out if s.text]


def tile_keys(digest: bytes, n: int) -> np.ndarray:
    """Negative 63-bit keys for a tile's feature positions, so they never equal a token id."""
    out = np.empty(n, np.int64)
    for i in range(n):
        h = hashlib.blake2b(digest + struct.pack("<q", i), digest_size=8).digest()
        out[i] = -1 - (int.from_bytes(h, "little") >> 1)
    return out


def join_image_chunks(chunks: list, bos_id: int | None) -> list:
    """VILA's tokenizer_image_token (NVlabs/VILA@1c88211:llava/mm_utils.py) from the ids of the text
    chunks between placeholders, each tokenized with its BOS: when the first chunk starts with BOS,
    the first id of every chunk is dropped and one BOS kept at the front. Each placeholder becomes
    IMAGE_TOKEN_INDEX."""
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == bos_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def tokenizer_image_token(encode, text: str, bos_id: int | None) -> list:
    """tokenizer_image_token on trusted text: split at each placeholder, every chunk tokenized by
    `encode` (which may add BOS)."""
    return join_image_chunks([encode(c) for c in text.split(PLACEHOLDER)], bos_id)


class Splicer:
    def __init__(self, tokenizer, family: Family, tokens: TokenInfo, tokens_per_tile: int, image_mode: str):
        self.tok, self.family, self.tokens = tokenizer, family, tokens
        self.tokens_per_tile, self.image_mode = tokens_per_tile, image_mode
        self.text_ids = TextIds(tokenizer)
        end = family.media_end_text
        self.end_ids = self.text_ids.encode([Segment(end, trusted=True)]) if end else []

    def expand(self, segments: list, tiles_per_image: list) -> list:
        """Check the placeholder count and, with DYNAMIC tiling, write one placeholder per tile.
        Only image segments are placeholders: an "<image>" typed in text is text (text_ids.py)."""
        if isinstance(segments, str):   # trusted text (tests, internal prompts): same type back
            return "".join(s.text for s in self.expand(trusted_segments(segments), tiles_per_image))
        n = sum(s.image for s in segments)
        if n != len(tiles_per_image):
            raise PromptError(f"prompt has {n} {PLACEHOLDER} placeholders but {len(tiles_per_image)} images were given")
        out, k = [], 0
        for seg in segments:
            if not seg.image:
                out.append(seg)
                continue
            out += trusted_segments(self.family.image_text(tiles_per_image[k], self.image_mode))
            k += 1
        return out

    def ids_with_markers(self, segments: list) -> list:
        """Token ids with one marker per tile: IMAGE_TOKEN_INDEX (SENTINEL) or the <image> id."""
        if isinstance(segments, str):
            segments = trusted_segments(segments)
        if self.family.splice != SENTINEL:
            return self.text_ids.encode(segments)
        chunks, cur = [], []
        for seg in segments:
            if seg.image:
                chunks.append(cur)
                cur = []
            else:
                cur.append(seg)
        return join_image_chunks([self.text_ids.encode(c) for c in chunks + [cur]], self.tokens.bos_id)

    def splice(self, segments: list, tile_digests: list, lengths: list | None = None) -> SplicedPrompt:
        """`segments` already expanded; one digest (bytes) per tile, in prompt order; `lengths`: feature
        tokens per tile where they vary (NVILA dynamic_s2: 256 per last-scale block), else tokens_per_tile."""
        lengths = lengths or [self.tokens_per_tile] * len(tile_digests)
        marker = IMAGE_TOKEN_INDEX if self.family.splice == SENTINEL else self.tokens.image_token_id
        ids, keys, spans, k = [], [], [], 0
        for i in self.ids_with_markers(segments):
            if i != marker:
                ids.append(i)
                keys.append(i)
                continue
            if k >= len(tile_digests):
                raise PromptError(f"prompt has more image markers than the {len(tile_digests)} image tiles given")
            spans.append((len(ids), k))
            ids.extend([IMAGE_POSITION] * lengths[k])
            keys.extend(tile_keys(tile_digests[k], lengths[k]).tolist())
            ids.extend(self.end_ids)
            keys.extend(self.end_ids)
            k += 1
        if k != len(tile_digests):
            raise PromptError(f"prompt has {k} image markers but {len(tile_digests)} image tiles were given")
        return SplicedPrompt(np.asarray(ids, np.int64), spans, np.asarray(keys, np.int64))
