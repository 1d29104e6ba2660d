"""The builder's routing on the installed vLLM's own ``CommonAttentionMetadata`` with CUDA tensors,
under ``torch.cuda.set_sync_debug_mode("error")``: filled as vLLM 0.26's model runner V2 fills it
(``seq_lens_cpu_upper_bound`` only), nothing in the routing may read a device tensor back (GPU
host; the CPU twin on ``meta`` tensors is ``test_host_lengths.py``)."""

from __future__ import annotations

import pytest
import torch

from vllm_seer.backend import compat
from vllm_seer.backend.common import plan_sparse

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_routing_does_not_synchronise():
    backend = pytest.importorskip("vllm.v1.attention.backend")
    dev = torch.device("cuda")
    qsl = torch.tensor([0, 1, 4097, 4197], dtype=torch.int32)
    lens = torch.tensor([40001, 24096, 100], dtype=torch.int32)
    cm = backend.CommonAttentionMetadata(
        query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl, seq_lens=lens.to(dev), num_reqs=3,
        num_actual_tokens=4197, max_query_len=4096, max_seq_len=40001,
        block_table_tensor=torch.zeros(3, 2501, dtype=torch.int32, device=dev),
        slot_mapping=torch.zeros(4197, dtype=torch.int64, device=dev), causal=True,
        seq_lens_cpu_upper_bound=lens)
    rows = torch.tensor([0, *range(4097, 4197)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seq = compat.host_seq_lens(cm)
        plan, dense = plan_sparse(qsl.tolist(), seq.tolist(), cm.block_table_tensor, 16384, 64, 4,
                                  causal=True)
        # the dense sub-batch's metadata: its host-to-device copies go through pinned memory
        # (a pageable .to(cuda) would wait for the stream to drain, which this mode flags)
        sub = compat.subset_common_metadata(cm, dense, rows, seq)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert seq is cm.seq_lens_cpu_upper_bound
    assert plan is not None and plan.req_ids == [1] and dense == [0, 2]
    assert sub.num_reqs == 2 and sub.max_seq_len == 40001
    assert sub.seq_lens.tolist() == [40001, 100]
