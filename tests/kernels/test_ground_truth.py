"""Ground-truth kernel (block max-pooled attention) vs the plain-PyTorch reference."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton runs on CPU only in interpreter mode
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_seer.kernels.ground_truth import block_attn_ground_truth_ref  # noqa: E402

triton_gt = pytest.importorskip("vllm_seer.kernels.ground_truth.triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dense_ref(q: torch.Tensor, k: torch.Tensor, b: int) -> torch.Tensor:
    """Full-map reference: softmax, 2-D max pool, row normalise."""
    t, hq, d = q.shape
    kk = k.repeat_interleave(hq // k.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk.double()) / d**0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    nb = -(-t // b)
    p = torch.nn.functional.pad(p, (0, nb * b - t, 0, nb * b - t))
    pooled = p.view(hq, nb, b, nb, b).amax(dim=(2, 4))
    return (pooled / pooled.sum(-1, keepdim=True)).float()


SHAPES = [  # (T, Hq, Hkv, D, B)
    pytest.param(64, 2, 2, 16, 32, id="two-full-blocks"),
    pytest.param(100, 4, 2, 16, 32, id="partial-last-block-gqa2"),
    pytest.param(130, 3, 1, 32, 64, id="partial-mqa-b64"),
    pytest.param(17, 1, 1, 16, 16, id="tiny-partial"),
]


@pytest.mark.parametrize("t,hq,hkv,d,b", SHAPES)
def test_reference_matches_full_map(t: int, hq: int, hkv: int, d: int, b: int) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(t, hq, d) * 2, torch.randn(t, hkv, d) * 2
    got = block_attn_ground_truth_ref(q, k, block_size=b, chunk=b)
    torch.testing.assert_close(got, _dense_ref(q, k, b), rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(hq, got.shape[1]))
    assert (got.triu(1) == 0).all()


@pytest.mark.parametrize("t,hq,hkv,d,b", SHAPES)
def test_triton_matches_reference(t: int, hq: int, hkv: int, d: int, b: int) -> None:
    torch.manual_seed(1)
    q = (torch.randn(t, hq, d) * 2).to(DEV)
    k = (torch.randn(t, hkv, d) * 2).to(DEV)
    got = triton_gt.block_attn_ground_truth(q, k, block_size=b)  # output starts NaN-filled
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, block_attn_ground_truth_ref(q, k, block_size=b),
                               rtol=1e-4, atol=1e-6)


def test_triton_strided_input() -> None:
    torch.manual_seed(2)
    qkv = torch.randn(96, 3, 4, 16, device=DEV)  # q/k are non-contiguous views of a packed tensor
    q, k = qkv[:, 0], qkv[:, 1, :2]
    torch.testing.assert_close(triton_gt.block_attn_ground_truth(q, k, block_size=32),
                               block_attn_ground_truth_ref(q, k, block_size=32),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [4096, 8000])
def test_triton_real_shapes_bf16(t: int) -> None:
    torch.manual_seed(3)
    q = torch.randn(t, 9, 64, device="cuda", dtype=torch.bfloat16) * 3
    k = torch.randn(t, 3, 64, device="cuda", dtype=torch.bfloat16) * 3
    got = triton_gt.block_attn_ground_truth(q, k)
    torch.testing.assert_close(got, block_attn_ground_truth_ref(q, k), rtol=2e-2, atol=1e-4)
