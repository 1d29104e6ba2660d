"""Pipeline parallelism: which layers a worker serves, and which worker reports per-request metrics.

Under ``--pipeline-parallel-size N`` each worker builds only the decoder layers of its stage, as
vLLM's ``make_layers`` assigns them (:func:`vllm_seer.backend.compat.stage_layers`); the others are
placeholders. Layer names keep their global index (``model.layers.17.self_attn.attn`` on the stage
that holds layer 17), so gate weights, ``dense_layers`` and the per-layer metric labels all use
global layer indices. Every stage sees every step (the same batch passes through all stages), so
each would count the step's prefill tokens: only one process counts them (see
:func:`reporting_stage`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vllm_seer.backend import compat


@dataclass(frozen=True)
class PipelineStage:
    """One pipeline stage's share of the model.

    Attributes:
        rank: the stage, ``0 .. size - 1``.
        size: number of stages (``--pipeline-parallel-size``).
        layers: global indices of this stage's decoder layers (contiguous).
        num_layers: the whole model's layer count.
    """

    rank: int
    size: int
    layers: range
    num_layers: int

    @classmethod
    def of(cls, num_layers: int, rank: int = 0, size: int = 1) -> PipelineStage:
        """Stage ``rank`` of ``size`` of a ``num_layers``-layer model, by vLLM's own mapping."""
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"Seer backend: pipeline stage {rank} of {size} does not exist")
        return cls(rank, size, compat.stage_layers(num_layers, rank, size), num_layers)

    def describe(self) -> str:
        """``'stage 1/2 (layers 2..3)'`` for logs and messages."""
        span = (f"layers {self.layers.start}..{self.layers.stop - 1}" if self.layers
                else "no layers")
        return f"stage {self.rank}/{self.size} ({span})"

    def sparse_layers(self, dense_layers: Iterable[int]) -> tuple[int, ...]:
        """This stage's layers that take the sparse path, ascending (global indices)."""
        dense = set(dense_layers)
        return tuple(i for i in self.layers if i not in dense)


def reporting_stage(num_layers: int, size: int, dense_layers: Iterable[int]) -> int:
    """The pipeline stage whose tensor-parallel rank 0 counts prefill tokens and observes the
    per-step histograms (density, gate and attention time): the first stage that has a sparse
    layer (stage 0 when no stage has one). Every process computes the same answer from vLLM's
    mapping, so exactly one process in the engine counts. Its per-step histograms describe that
    stage's layers, as under tensor parallelism they describe rank 0's heads; the per-layer block
    counters are counted by every stage for its own layers and sum to the whole model's."""
    dense = set(dense_layers)
    for rank in range(size):
        if any(i not in dense for i in compat.stage_layers(num_layers, rank, size)):
            return rank
    return 0
