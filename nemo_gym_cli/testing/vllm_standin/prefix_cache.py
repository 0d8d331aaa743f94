"""The prefix cache: which leading blocks of a prompt were seen before (hits are cached tokens)."""

from __future__ import annotations

from collections import OrderedDict

BLOCK_SIZE = 16  # vLLM's default KV block size; prefix caching works on full blocks
PREFIX_CACHE_BLOCKS = 10_000


class PrefixCache:
    """LRU of prompt-prefix hashes at block granularity, like vLLM's automatic prefix caching."""

    def __init__(self, capacity: int = PREFIX_CACHE_BLOCKS, block_size: int = BLOCK_SIZE):
        self.capacity = capacity
        self.block_size = block_size
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def lookup_and_insert(self, ids: list[int]) -> int:
        """Cached prompt tokens for `ids` (longest run of leading cached blocks); caches all blocks."""
        size, blocks = self.block_size, self.blocks
        prefix_hash, hit_tokens, still_hitting = 0, 0, True
        for start in range(0, len(ids) - size + 1, size):
            prefix_hash = hash((prefix_hash, *ids[start : start + size]))
            if prefix_hash in blocks:
                blocks.move_to_end(prefix_hash)
                if still_hitting:
                    hit_tokens += size
            else:
                still_hitting = False
                blocks[prefix_hash] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        self.queries += len(ids)
        self.hits += hit_tokens
        return hit_tokens
