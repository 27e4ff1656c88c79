"""The model runner: one scheduled batch in, one forward pass, logits for the sampler out.

It flattens the scheduled tokens of all requests into one ragged batch:

    request:          A (prefill chunk, 3 tokens)   B (decode)   C (decode)
    input_ids:        [a5 a6 a7                     b9           c4]          [T]
    positions:        [5  6  7                      9            4 ]          [T]
    slot_mapping:     pool slot of each token (through each block table)      [T]
    query_start_loc:  [0, 3, 4, 5]                                            [S + 1]
    seq_lens:         [8, 10, 5]  (tokens in the cache after this step)       [S]
    block_tables:     one row per request, padded with -1                     [S, max_blocks]

and computes logits only where the scheduler asked for them: the last ``num_logits[i]``
positions of request i's chunk. That is the last token of each request whose known tokens
are now all computed (a finished prefill or a decode); a speculative verification chunk
of k drafts will ask for k + 1 rows; a prompt chunk that is not the last one needs none.

    num_logits:       [0,                           1,           1]
    logits rows:      [                             b9           c4]          [R, V]
"""

from __future__ import annotations

import numpy as np

from nanoserve.cache.paged import AttentionMetadata, PagedKVCache
from nanoserve.interfaces import KVManager, ScheduledBatch
from nanoserve.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, kv: KVManager) -> None:
        self.model = model
        self.cache = cache
        self.kv = kv
        self.backend = model.backend

    def execute(self, batch: ScheduledBatch) -> np.ndarray:  # -> [sum(batch.num_logits), V]
        """Run the batch; return logits (host float32) of the rows it asks for, in batch order."""
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for request, n, num_logits in zip(batch.requests, batch.num_new_tokens, batch.num_logits):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            input_ids.extend(request.token_ids(start, end))
            positions.append(np.arange(start, end))
            slots.append(self.kv.slot_mapping(request.request_id, start, end))
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            assert 0 <= num_logits <= n, f"{request.request_id}: {num_logits} logits rows of a {n}-token chunk"
            sample_rows.extend(range(query_start_loc[-1] - num_logits, query_start_loc[-1]))
        tables = [self.kv.block_table(r.request_id) for r in batch.requests]
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
            return np.zeros((0, self.model.config.vocab_size), dtype=np.float32)
        logits = self.model.compute_logits(hidden[dev(np.asarray(sample_rows))])  # [R, V]
        return np.asarray(self.backend.to_host(logits), dtype=np.float32)
