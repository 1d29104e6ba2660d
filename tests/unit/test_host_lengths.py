"""The per-step routing reads request lengths from host fields only, never by copying a device
tensor back (a host sync on every decode step, which stalls the scheduling of the next step).

vLLM 0.26's model runner V2 fills ``seq_lens_cpu_upper_bound`` but not ``_seq_lens_cpu``, and its
``seq_lens_cpu`` property then copies ``seq_lens`` to the host; the V1 runner fills
``_seq_lens_cpu``. Device tensors here live on the ``meta`` device, where every read-back raises,
so a routing step that reads one fails; the 0.26 property is rebuilt on the installed vLLM's class
(it has it no longer) and counts its calls.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_seer.backend import compat
from vllm_seer.backend.common import plan_sparse

CommonAttentionMetadata = pytest.importorskip("vllm.v1.attention.backend").CommonAttentionMetadata
META = torch.device("meta")
PAGE = 16


@dataclasses.dataclass
class Metadata026(CommonAttentionMetadata):
    """``CommonAttentionMetadata`` as vLLM 0.26 declares it: the private host copies as fields,
    ``seq_lens_cpu`` a property that reads the device tensor back when the field is unset."""

    _seq_lens_cpu: torch.Tensor | None = None
    _num_computed_tokens_cpu: torch.Tensor | None = None
    read_backs = 0

    @property
    def seq_lens_cpu(self) -> torch.Tensor:
        if self._seq_lens_cpu is None:
            type(self).read_backs += 1
            self._seq_lens_cpu = self.seq_lens.to("cpu")
        return self._seq_lens_cpu


def batch(cls: type = CommonAttentionMetadata, **host: torch.Tensor):
    """A mixed step: a decode row (context 40000), a 4096-token prefill chunk on a 20000-token
    context and a 100-token prompt; device tensors on ``meta``; ``host``: the host fields set."""
    qlens, seq_lens = [1, 4096, 100], [40001, 24096, 100]
    qsl = torch.tensor([0, 1, 4097, 4197], dtype=torch.int32)
    pages = -(-max(seq_lens) // PAGE)
    return cls(
        query_start_loc=qsl.to(META), query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(META), num_reqs=3,
        num_actual_tokens=sum(qlens), max_query_len=max(qlens), max_seq_len=max(seq_lens),
        block_table_tensor=torch.zeros(3, pages, dtype=torch.int32, device=META),
        slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64, device=META), causal=True,
        **host)


LENS = torch.tensor([40001, 24096, 100], dtype=torch.int32)


def test_meta_device_read_back_raises():
    """The control: reading a ``meta`` tensor back does raise, so the tests below can fail."""
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.zeros(3, device=META).tolist()
    Metadata026.read_backs = 0
    with pytest.raises((NotImplementedError, RuntimeError)):
        _ = batch(Metadata026).seq_lens_cpu
    assert Metadata026.read_backs == 1


def test_upper_bound_of_the_installed_vllm():
    cm = batch(seq_lens_cpu_upper_bound=LENS)
    assert compat.host_seq_lens(cm) is cm.seq_lens_cpu_upper_bound


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_vllm_026_fields_never_call_the_property(runner: str):
    """V1 fills ``_seq_lens_cpu`` (exact), V2 only the upper bound: both are read as fields."""
    Metadata026.read_backs = 0
    host = {"_seq_lens_cpu": LENS.clone(), "_num_computed_tokens_cpu": LENS - 1} if runner == "v1" \
        else {}
    cm = batch(Metadata026, seq_lens_cpu_upper_bound=LENS + 3 * (runner == "v2"), **host)
    seq = compat.host_seq_lens(cm)
    assert seq is (cm._seq_lens_cpu if runner == "v1" else cm.seq_lens_cpu_upper_bound)
    plan, dense = plan_sparse(cm.query_start_loc_cpu.tolist(), seq.tolist(), cm.block_table_tensor,
                              16384, 64, 4, causal=True)
    assert plan is not None and plan.req_ids == [1] and dense == [0, 2]
    rows = torch.tensor([0, 4097, *range(4098, 4197)])
    sub = compat.subset_common_metadata(cm, dense, rows, seq)
    assert Metadata026.read_backs == 0  # neither call touched the device lengths
    assert sub.num_reqs == 2 and sub.query_start_loc_cpu.tolist() == [0, 1, 101]
    assert sub.max_seq_len == int(seq[[0, 2]].max())
    assert sub.seq_lens_cpu_upper_bound.tolist() == cm.seq_lens_cpu_upper_bound[[0, 2]].tolist()
    if runner == "v1":  # the private host copies are sliced with the requests, not kept whole
        assert sub._seq_lens_cpu.tolist() == [40001, 100]
        assert sub._num_computed_tokens_cpu.tolist() == [40000, 99]
    else:
        assert sub._seq_lens_cpu is None and sub._num_computed_tokens_cpu is None


def test_no_host_copy_is_an_error_naming_the_fields():
    Metadata026.read_backs = 0
    with pytest.raises(RuntimeError, match="seq_lens_cpu_upper_bound"):
        compat.host_seq_lens(batch(Metadata026))
    assert Metadata026.read_backs == 0
