"""The model runner: one scheduled batch in, one forward pass, logits for the sampler out.

It flattens the scheduled tokens of all requests into one ragged batch:

    request:          A (prefill chunk, 3 tokens)   B (decode)   C (decode)
    input_ids:        [a5 a6 a7                     b9           c4]          [T]
    positions:        [5  6  7                      9            4 ]          [T]
    slot_mapping:     pool slot of each token (through each block table)      [T]
    query_start_loc:  [0, 3, 4, 5]                                            [S + 1]
    seq_lens:         [8, 10, 5]  (tokens in the cache after this step)       [S]
    block_tables:     one row per request, padded with -1                     [S, max_blocks]

and computes logits only at the last token of each request whose known tokens are now
all computed (a finished prefill or a decode); a prompt chunk that is not the last one
needs no logits.
"""

from __future__ import annotations

import numpy as np

from nanoserve.cache.kv_cache_manager import KVCacheManager
from nanoserve.cache.paged import AttentionMetadata, PagedKVCache
from nanoserve.model.llama import LlamaModel
from nanoserve.request import Request
from nanoserve.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, kv: KVCacheManager) -> None:
        self.model = model
        self.cache = cache
        self.kv = kv
        self.backend = model.backend

    def execute(self, batch: ScheduledBatch) -> tuple[np.ndarray, list[Request]]:  # -> [R, V], R requests
        """Run the batch; return logits (host float32) for the requests that get a new token."""
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_requests: list[Request] = []
        for request, n in zip(batch.requests, batch.num_new_tokens):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            input_ids.extend(request.token_ids(start, end))
            positions.append(np.arange(start, end))
            slots.append(self.kv.slot_mapping(request.request_id, start, end))
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            if end == request.num_tokens:
                sample_rows.append(query_start_loc[-1] - 1)
                sample_requests.append(request)
        tables = [self.kv.block_tables[r.request_id] for r in batch.requests]
        block_tables = np.full((len(tables), max(len(t) for t in tables)), -1, dtype=np.int64)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = table

        dev = self.backend.to_device
        self.cache.metadata = AttentionMetadata(
            slot_mapping=dev(np.concatenate(slots)),
            block_tables=dev(block_tables),
            query_start_loc=dev(np.asarray(query_start_loc, dtype=np.int64)),
            seq_lens=dev(np.asarray(seq_lens, dtype=np.int64)),
        )
        hidden = self.model.forward(
            dev(np.asarray(input_ids, dtype=np.int64)), dev(np.concatenate(positions)), self.cache
        )  # [T, d]
        if not sample_rows:
            return np.zeros((0, self.model.config.vocab_size), dtype=np.float32), []
        logits = self.model.compute_logits(hidden[dev(np.asarray(sample_rows))])  # [R, V]
        return np.asarray(self.backend.to_host(logits), dtype=np.float32), sample_requests
