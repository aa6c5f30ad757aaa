"""No host reads of tensor values (device syncs on a GPU) inside the layer loop of a ring GPT's training step:
only the first ring layer's agreement exchange, and with Megatron's attention_mask the first layer's check of
it, once per step however many layers there are (tests/test_gpu.py runs the same step under CUDA's sync
debug mode)."""

from __future__ import annotations

from tests import sync_jobs


def test_the_layer_loop_reads_nothing_back(dist_pool):
    layers = 3
    for mask, reads in ((False, []), (True, ["to in megatron_patch/_pattern_matches",
                                             "all in megatron_patch/_pattern_matches",
                                             "__bool__ in megatron_patch/_pattern_matches",
                                             "item in megatron_patch/_agree"])):
        for rank in dist_pool(2).run(sync_jobs.host_reads_per_step, 2, layers, mask, timeout=600):
            # the first layer's agreement: one all_gather of every rank's signature, read once per rank
            # (seen without the mask check's cache: those four reads once per layer, 3 times)
            assert sorted(rank) == sorted(reads + ["tolist in ring_sp/gather_signatures"] * 2), (mask, rank)
