"""Everything that depends on the vLLM version (supported: 0.26 … 0.33) lives here.

* registering the ``SEER`` backend enum member (0.32+ has ``AttentionBackendEnum.register``; 0.26 only
  lets existing members be overridden, so the member is added the same way by hand) and making it
  survive vLLM's spawned processes (a pickling reduction that re-registers before lookup);
* host copies of per-request lengths in ``CommonAttentionMetadata`` (field names moved);
* slicing a ``CommonAttentionMetadata`` to a subset of requests;
* the widest query a decode row has under speculative decoding (the verification row);
* per-layer KV cache views for each platform's layout (and a synthetic cache in the CUDA layout
  for the warm-up), and the per-layer FP8 scales;
* this worker's tensor-parallel rank and pipeline stage, and the stage-to-layer mapping.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

SEER_NAME = "SEER"


def attention_cg_support() -> Any:
    """vLLM's ``AttentionCGSupport`` enum (moved between releases)."""
    try:  # vLLM 0.32+
        from vllm.v1.attention.backend import AttentionCGSupport
    except ImportError:  # vLLM 0.26
        from vllm.v1.attention.backends.utils import AttentionCGSupport  # type: ignore[no-redef]
    return AttentionCGSupport


def attention_backend_enum() -> Any:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum


def register_seer_member(class_path: str) -> Any:
    """Create (or return) ``AttentionBackendEnum.SEER`` pointing at ``class_path``. Idempotent."""
    from vllm.v1.attention.backends import registry

    enum = registry.AttentionBackendEnum
    member = enum._member_map_.get(SEER_NAME)
    if member is None:
        if hasattr(enum, "register"):
            member = enum.register(SEER_NAME, class_path)
        else:  # vLLM 0.26: no dynamic members; add one the way 0.32's register() does
            member = object.__new__(enum)
            member._name_, member._value_ = SEER_NAME, class_path
            setattr(enum, SEER_NAME, member)
            enum._member_map_[SEER_NAME] = member
            enum._value2member_map_[class_path] = member
            enum._member_names_.append(SEER_NAME)
    registry._ATTN_OVERRIDES[member] = class_path
    # Enum members pickle by value; a spawned child unpickles the config before plugins run, so
    # rebuild the member by name (re-running registration first).
    member.__reduce_ex__ = _reduce_seer_member  # type: ignore[method-assign]
    return member


def _reduce_seer_member(protocol: int) -> tuple[Any, tuple[()]]:
    return _seer_member, ()


def _seer_member() -> Any:
    from vllm_seer.plugin import register

    register()
    return attention_backend_enum()[SEER_NAME]


def register_custom(class_path: str) -> None:
    from vllm.v1.attention.backends.registry import register_backend

    register_backend(attention_backend_enum().CUSTOM, class_path)


def is_seer_selection(selected: Any) -> bool:
    """True when the user picked ``seer`` or the ``CUSTOM`` slot that this plugin fills."""
    if selected is None:
        return False
    name = getattr(selected, "name", None)
    if name == SEER_NAME:
        return True
    if name == "CUSTOM":
        from vllm.v1.attention.backends import registry

        return registry._ATTN_OVERRIDES.get(selected, "").startswith("vllm_seer.")
    return False


def max_decode_query_len(vllm_config: Any) -> int:
    """The widest query row that vLLM's spec-as-decode backends count as a decode.

    1 without speculative decoding; with it, the verification row of ``1 +
    num_speculative_tokens`` (one accepted token plus the drafts). vLLM 0.32+ computes this in
    ``vllm.v1.attention.backend.max_decode_query_len`` (which the builders'
    ``_init_reorder_batch_threshold(..., supports_spec_as_decode=True)`` reads; it adds another
    ``num_speculative_tokens`` for parallel drafting on model runner V1); vLLM 0.26 has the same rule
    inline in ``AttentionMetadataBuilder._init_reorder_batch_threshold``:
    ``1 + (2 if parallel_drafting else 1) * num_speculative_tokens``.
    """
    try:  # vLLM 0.32+
        from vllm.v1.attention.backend import max_decode_query_len as vllm_max_decode_query_len
    except ImportError:  # vLLM 0.26
        vllm_max_decode_query_len = None
    if vllm_max_decode_query_len is not None:
        return int(vllm_max_decode_query_len(vllm_config))
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or spec.num_speculative_tokens is None:
        return 1
    per_draft = 2 if spec.parallel_drafting else 1
    return 1 + per_draft * int(spec.num_speculative_tokens)


def to_device(t: torch.Tensor, dev: torch.device | str) -> torch.Tensor:
    """Host tensor -> ``dev`` without stalling the host on CUDA: a plain ``.to(cuda)`` of pageable
    memory waits for the stream to drain (everything queued before it); this stages ``t`` in
    pinned memory (PyTorch's caching host allocator, which keeps the buffer until the copy has
    run) and copies asynchronously in stream order."""
    dev = torch.device(dev)
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


# host copies of ``seq_lens`` a ``CommonAttentionMetadata`` may carry as dataclass fields, exact ones
# first: ``seq_lens_cpu`` (a field before 0.26), ``_seq_lens_cpu`` (0.26's model runner V1 sets it;
# its public ``seq_lens_cpu`` is then a *property* that copies ``seq_lens`` to the host when the
# field is unset, a device sync), ``seq_lens_cpu_upper_bound`` (0.26's model runner V2, 0.32+)
HOST_SEQ_LENS_FIELDS = ("seq_lens_cpu", "_seq_lens_cpu", "seq_lens_cpu_upper_bound")
# host fields sliced with the requests by :func:`subset_common_metadata`
HOST_REQ_FIELDS = (*HOST_SEQ_LENS_FIELDS, "_num_computed_tokens_cpu")


def host_seq_lens(cm: Any) -> torch.Tensor:
    """``[B]`` host tensor of ``seq_lens`` (context + new) for a ``CommonAttentionMetadata``,
    read from the fields vLLM filled in, never by copying the device tensor back (on vLLM 0.26's
    model runner V2 its ``seq_lens_cpu`` property does that: a host sync on every step, which
    stalls the scheduling of the next decode step behind the GPU).

    ``seq_lens_cpu_upper_bound`` is exact for prefill rows and optimistic only for decode rows
    under asynchronous speculative decoding (every draft assumed accepted); the routing reads the
    length of prefill rows only (a row of at most the decode query length is dense whatever its
    length), and an over-estimate of the dense sub-batch's ``max_seq_len`` is safe.
    """
    if cm.seq_lens.device.type == "cpu":
        return cm.seq_lens
    fields = {f.name for f in dataclasses.fields(cm)}
    for name in HOST_SEQ_LENS_FIELDS:
        value = getattr(cm, name) if name in fields else None
        if value is not None:
            return value
    raise RuntimeError("Seer backend: this vLLM's CommonAttentionMetadata has none of the host "
                       f"copies of seq_lens {HOST_SEQ_LENS_FIELDS} set (a device read-back would "
                       "synchronise every step)")


def subset_common_metadata(cm: Any, req_ids: list[int], rows: torch.Tensor,
                           seq_lens_host: torch.Tensor) -> Any:
    """A ``CommonAttentionMetadata`` for the requests ``req_ids`` whose query rows are ``rows``.

    The subset's queries are re-packed contiguously in request order.
    """
    qsl = cm.query_start_loc_cpu
    qlens = (qsl[1:] - qsl[:-1])[req_ids]
    new_qsl_cpu = torch.zeros(len(req_ids) + 1, dtype=qsl.dtype)
    new_qsl_cpu[1:] = qlens.cumsum(0)
    dev = cm.query_start_loc.device
    idx = torch.tensor(req_ids, dtype=torch.long)
    idx_dev = to_device(idx, cm.seq_lens.device)
    rows_dev = to_device(rows, cm.slot_mapping.device)
    changes: dict[str, Any] = {
        "query_start_loc": to_device(new_qsl_cpu, dev),
        "query_start_loc_cpu": new_qsl_cpu,
        "seq_lens": cm.seq_lens[idx_dev],
        "num_reqs": len(req_ids),
        "num_actual_tokens": int(new_qsl_cpu[-1]),
        "max_query_len": int(qlens.max()),
        "max_seq_len": int(seq_lens_host[idx].max()),
        "block_table_tensor": cm.block_table_tensor[idx_dev.to(cm.block_table_tensor.device)],
        "slot_mapping": cm.slot_mapping[rows_dev],
    }
    fields = {f.name for f in dataclasses.fields(cm)}
    for name in (*HOST_REQ_FIELDS, "is_prefilling", "dcp_local_seq_lens",
                 "dcp_local_seq_lens_cpu_upper_bound"):
        value = getattr(cm, name) if name in fields else None  # fields only: no sync property
        if isinstance(value, torch.Tensor):
            changes[name] = value[to_device(idx, value.device)]
    if "positions" in fields and isinstance(cm.positions, torch.Tensor):
        changes["positions"] = cm.positions[to_device(rows, cm.positions.device)]
    for name in ("_num_computed_tokens_cache", "_token_to_req_indices_cache",
                 "logits_indices_padded", "num_logits_indices", "max_logits_per_req", "req_idx",
                 "mm_req_doc_ranges", "rswa_prefix_lens", "replayssm_decode_base_cpu"):
        if name in fields:
            changes[name] = None
    return dataclasses.replace(cm, **changes)


CPU_ISAS = ("vec",)
logger = logging.getLogger(__name__)


def cpu_builder_isa(builder: Any, layer_names: list[str]) -> None:
    """Make vLLM's CPU metadata ``builder`` use an attention ISA whose cache layout Seer reads.

    vLLM's CPU backend (0.32: ``cpu_attn._get_attn_isa``) picks its kernels' ISA per builder:
    ``amx`` on x86 with AMX tiles for bf16 and pages of a multiple of 32 tokens, else ``vec``;
    ``vec16`` for other pages or head sizes, ``neon`` / ``vsx`` / ``vxe`` / ``rvv`` on other CPUs.
    The builder keeps it and sets it on every layer (``layer.isa``), and vLLM's cache writer and
    attention kernels both follow it. Seer's CPU path reads the ``vec`` layout (:func:`cpu_kv_views`),
    and ``vec`` serves every input ``amx`` does (x86, pages of a multiple of 32), so ``amx`` is
    replaced by ``vec`` here (the dense rows then run vLLM's vec kernels instead of AMX); any other
    ISA stops start-up with a message naming it. A builder without an ``isa`` (an older CPU
    backend) is left alone.
    """
    isa = getattr(builder, "isa", None)
    if isa is None or isa in CPU_ISAS:
        return
    if isa == "amx":
        logger.info("Seer backend: vLLM's CPU attention ISA 'amx' packs the KV cache in a layout "
                    "the Seer CPU path does not read; using its 'vec' kernels instead")
        builder.isa = "vec"
        builder._set_isa_to_layers(layer_names)
        return
    raise NotImplementedError(
        f"Seer backend: vLLM's CPU attention ISA {isa!r} (chosen from the dtype, --block-size and "
        f"head size) is not supported; supported: {', '.join(CPU_ISAS)} (and 'amx', served as "
        f"'vec'). On x86, a --block-size that is a multiple of 32 and a head size that is a "
        f"multiple of 32 give 'vec'.")


def cpu_kv_views(kv_cache: torch.Tensor, isa: str = "vec") -> tuple[torch.Tensor, torch.Tensor]:
    """CPU cache → K and V views ``[num_blocks, page, Hkv, D]`` (strided, no copy).

    vLLM's CPU cache is ``[num_blocks, Hkv, page, 2D]``; per (block, head) the K half is stored
    dim-major (``[D, page]``, what ``cpu_attn_reshape_and_cache`` writes for the ``vec`` ISA) and
    the V half token-major (``[page, D]``). Other ISAs (``amx``, ``neon``, ...) pack differently and
    are refused.
    """
    if isa not in CPU_ISAS:
        raise NotImplementedError(f"Seer backend: vLLM CPU attention ISA {isa!r} is not supported "
                                  f"(supported: {', '.join(CPU_ISAS)})")
    nb, hkv, page, two_d = kv_cache.shape
    d = two_d // 2
    s_blk, s_head = kv_cache.stride(0), kv_cache.stride(1)
    k = kv_cache.as_strided((nb, page, hkv, d), (s_blk, 1, s_head, page),
                            kv_cache.storage_offset())
    v = kv_cache.as_strided((nb, page, hkv, d), (s_blk, d, s_head, 1),
                            kv_cache.storage_offset() + page * d)
    return k, v


def cuda_kv_views(kv_cache: torch.Tensor, head_size: int, fp8: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention cache → K and V views ``[num_blocks, page, Hkv, D]``.

    vLLM 0.26 (read in its ``flash_attn.py``): logical ``[num_blocks, Hkv, page, 2D]`` with K and V
    packed in the last dim, split the way its ``FlashAttentionImpl`` does; the older layout
    ``[2, num_blocks, page, Hkv, D]`` is unbound. ``fp8``: an FP8 cache is uint8 in vLLM; the views
    are reinterpreted as that float8 dtype (:func:`fp8_cache_dtype`), as ``FlashAttentionImpl``
    does before its kernels read them.
    """
    if kv_cache.dim() == 5:
        k, v = kv_cache.unbind(0)
    else:
        k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    if fp8 is not None:
        if kv_cache.element_size() != 1:
            raise TypeError(f"Seer backend: an FP8 KV cache must be 1-byte storage, this one is "
                            f"{kv_cache.dtype}")
        k, v = k.view(fp8), v.view(fp8)
    return k, v


def synthetic_kv_cache(backend: Any, num_pages: int, page: int, num_kv_heads: int,
                       head_size: int, dtype: torch.dtype, device: torch.device | str,
                       cache_dtype_str: str = "auto") -> torch.Tensor:
    """A random cache tensor laid out exactly as vLLM's GPU model runner allocates a layer's cache
    for ``backend`` (its ``get_kv_cache_shape`` as the logical shape, memory in its
    ``get_kv_cache_stride_order``; read in 0.26's ``gpu_model_runner.py`` / ``gpu/attn_utils.py``),
    so that the start-up warm-up compiles the kernels for the strides a request will bring.

    ``dtype``: the element type (float8 for an FP8 cache: the uint8 storage vLLM keeps is read
    as float8 by :func:`cuda_kv_views` anyway). vLLM 0.32's backend classes no longer have
    ``get_kv_cache_shape`` (the layout moved to ``KVCacheLayout``); there the packed NHD layout of
    0.26 is assumed (logical ``[pages, Hkv, page, 2D]``, memory ``[pages, page, Hkv, 2D]``; not
    verified on a 0.32+ GPU: a different real layout would make the first long request compile).
    """
    if hasattr(backend, "get_kv_cache_shape"):
        shape = tuple(backend.get_kv_cache_shape(num_pages, page, num_kv_heads, head_size,
                                                 cache_dtype_str))
        try:
            order = tuple(backend.get_kv_cache_stride_order())
        except (AttributeError, NotImplementedError):
            order = tuple(range(len(shape)))
    else:
        shape, order = (num_pages, num_kv_heads, page, 2 * head_size), (0, 2, 1, 3)
    physical = torch.randn(tuple(shape[i] for i in order), device=device).to(dtype)
    return physical.permute(*[order.index(i) for i in range(len(order))])


def device_type(vllm_config: Any) -> str:
    """``cpu`` / ``cuda``: ``DeviceConfig.device_type`` (0.26 … 0.33), else the platform's."""
    dc = getattr(vllm_config, "device_config", None)
    dev = getattr(dc, "device_type", None)
    if not dev:
        from vllm.platforms import current_platform

        dev = current_platform.device_type
    return str(dev)


FP8_VIEWS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
             "fp8_e5m2": torch.float8_e5m2}


def kv_scales(layer: Any) -> tuple[float, float]:
    """vLLM's per-layer K / V cache scales (``Attention._k_scale_float`` / ``_v_scale_float``, in
    every supported release; 1.0 unless the checkpoint or ``--calculate-kv-scales`` set them)."""
    return float(layer._k_scale_float), float(layer._v_scale_float)


def kv_scale_tensors(layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's per-layer Q / K / V scales as the 0-dim fp32 device tensors its ``Attention`` layer
    keeps (``_q_scale`` / ``_k_scale`` / ``_v_scale`` buffers, 0.26 … 0.33; updated in place when
    ``--calculate-kv-scales`` computes them), for the kernels to read in-kernel: unlike
    :func:`kv_scales` nothing is copied to the host. The kernels refuse a scale of more than one
    value (per-head scales)."""
    names = ("_q_scale", "_k_scale", "_v_scale")
    scales = tuple(getattr(layer, name, None) for name in names)
    for name, t in zip(names, scales, strict=True):
        if not isinstance(t, torch.Tensor):
            raise NotImplementedError(f"Seer backend: attention layer "
                                      f"{getattr(layer, 'layer_name', '?')} has no {name} tensor "
                                      "(vLLM's per-layer FP8 scale)")
    return scales  # type: ignore[return-value]


def fp8_cache_dtype(cache_dtype: str) -> torch.dtype | None:
    """The float8 dtype vLLM stores ``--kv-cache-dtype`` as (its cache tensors are uint8), or
    ``None`` for an unquantized cache. vLLM's ``fp8`` is e4m3 (``fn``, no infinities) on CPU and
    CUDA; the CPU writer rounds toward zero (checked in tests/unit/test_fp8_cache.py)."""
    if cache_dtype in FP8_VIEWS:
        return FP8_VIEWS[cache_dtype]
    if cache_dtype.startswith("fp8"):
        raise NotImplementedError(f"Seer backend: --kv-cache-dtype {cache_dtype} is not supported")
    return None


def tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    try:
        return get_tensor_model_parallel_rank()
    except AssertionError:  # model parallel group not initialised (single process tools)
        return 0


def pp_rank_and_size() -> tuple[int, int]:
    """This worker's pipeline stage and the number of stages: the pipeline group's
    ``rank_in_group`` / ``world_size``, which vLLM's ``make_layers`` uses too (0.26, 0.32 and 0.33
    alike). ``(0, 1)`` where no group exists (single-process tools)."""
    from vllm.distributed.parallel_state import get_pp_group

    try:
        group = get_pp_group()
    except AssertionError:  # model parallel group not initialised
        return 0, 1
    return int(group.rank_in_group), int(group.world_size)


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """The global indices of the layers that pipeline stage ``pp_rank`` of ``pp_size`` builds.

    vLLM's own mapping (``vllm.distributed.utils.get_pp_indices``, the function its
    ``make_layers`` calls; the same code in 0.26, 0.32 and 0.33, ``VLLM_PP_LAYER_PARTITION``
    included). The layers keep their global index in their names (``model.layers.{i}...``).
    """
    from vllm.distributed.utils import get_pp_indices

    start, end = get_pp_indices(num_layers, pp_rank, pp_size)
    return range(start, end)


def total_num_layers(model_config: Any) -> int:
    """The whole model's hidden layer count (all pipeline stages), from vLLM's ``ModelConfig``
    (``get_total_num_hidden_layers`` in 0.26 … 0.33; the HF config's field otherwise)."""
    get_total = getattr(model_config, "get_total_num_hidden_layers", None)
    if callable(get_total):
        return int(get_total())
    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    return int(hf.num_hidden_layers)


def expected_page_sizes(cache_config: Any, preferred: Callable[[int], int]) -> list[int]:
    """The KV page size(s) vLLM will give the backend, known before it decides.

    At attention-impl construction ``cache_config.block_size`` still holds the default; vLLM
    (0.26+, ``Platform.update_block_size_for_backend``) later replaces it by the backend's
    ``get_preferred_block_size`` unless the user gave ``--block-size``
    (``cache_config.user_specified_block_size``). Where that flag is missing both candidates are
    returned (the warm-up then builds both).
    """
    size = int(cache_config.block_size)
    user = getattr(cache_config, "user_specified_block_size", None)
    if user is True:
        return [size]
    want = int(preferred(size))
    if user is False:
        return [want]
    return sorted({size, want})
