"""What the common GPTQ writers put into `quantization_config`, and which of it changes the tensors.

Read from each writer's serialisation code:
- GPTQModel 7.x: `BaseQuantizeConfig.to_dict` in gptqmodel/quantization/config.py (it writes both
  `method` and `quant_method`, both `format` and `checkpoint_format`, the packing word in
  `pack_dtype`, per-module overrides in `dynamic`, and its run settings under `meta`); older
  releases also wrote `damp_percent`, `true_sequential`, `static_groups`, `mse` at the top.
- AutoGPTQ 0.7: `BaseQuantizeConfig.to_dict` in auto_gptq/modeling/_base.py.
- Optimum 2.x `GPTQQuantizer.to_dict` (optimum/gptq/quantizer.py) and Transformers' `GPTQConfig`
  (utils/quantization_config.py), which also keep their loading settings (`backend`,
  `use_exllama`, ...) in the block.

Every such key is accepted and kept as it is (by `convert` and by the Transformers adapter); the
ones whose value changes how the tensors must be read are checked by `loading_problem`, so a
checkpoint this project cannot read correctly is refused with the reason instead of served wrong.
"""

from __future__ import annotations

from typing import Any

GPTQMODEL_KEYS = frozenset({
    "bits", "group_size", "desc_act", "sym", "lm_head", "method", "quant_method", "format",
    "checkpoint_format", "pack_dtype", "dynamic", "rotation", "meta", "adapter",
    "damp_percent", "damp_auto_increment", "true_sequential", "static_groups", "mse",
    "act_group_aware", "hyb_act", "v2", "v2_alpha", "gptaq", "foem", "hessian", "moe", "fallback",
    "offload_to_disk", "offload_to_disk_path", "pack_impl", "mock_quantization", "device",
    "vram_strategy", "process", "fail_safe",
})
AUTOGPTQ_KEYS = frozenset({
    "bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
    "model_name_or_path", "model_file_base_name", "quant_method", "checkpoint_format",
    "is_marlin_format",
})
OPTIMUM_KEYS = frozenset({
    "bits", "tokenizer", "dataset", "group_size", "damp_percent", "desc_act", "act_group_aware",
    "sym", "true_sequential", "format", "meta", "backend", "use_cuda_fp16", "model_seqlen",
    "block_name_to_quantize", "module_name_preceding_first_block", "batch_size", "pad_token_id",
    "use_exllama", "exllama_config", "max_input_length", "cache_block_outputs",
    "modules_in_block_to_quantize", "quant_method", "checkpoint_format", "use_marlin",
})
WRITER_KEYS = {"GPTQModel": GPTQMODEL_KEYS, "AutoGPTQ": AUTOGPTQ_KEYS, "Optimum/Transformers": OPTIMUM_KEYS}
KNOWN_FOREIGN_KEYS = GPTQMODEL_KEYS | AUTOGPTQ_KEYS | OPTIMUM_KEYS

V1_LAYOUT = "gptq"  # zero points stored minus one, int32 words: what every reader here reads


def loading_problem(qc: dict[str, Any]) -> tuple[str, str] | None:
    """`(key, why)` when a key of another writer asks for tensors this project does not read, else None."""
    for key in ("checkpoint_format", "format"):
        value = qc.get(key)
        if value is not None and value != V1_LAYOUT:
            hint = (" (GPTQ v2 stores zero points without the -1 offset; re-save it as v1 with its writer, "
                    "e.g. GPTQModel's format='gptq')" if value == "gptq_v2" else "")
            return key, f"only the GPTQ v1 layout {V1_LAYOUT!r} is supported, got {value!r}{hint}"
    if qc.get("is_marlin_format"):
        return "is_marlin_format", "Marlin-repacked tensors are not the GPTQ v1 layout; expected false"
    method = qc.get("method")
    if method is not None and method != "gptq":
        return "method", f"expected 'gptq', got {method!r}"
    pack_dtype = qc.get("pack_dtype")
    if pack_dtype is not None and pack_dtype != "int32":
        return "pack_dtype", f"codes packed in {pack_dtype!r} words; expected 'int32' (the v1 layout)"
    if qc.get("lm_head"):
        return "lm_head", "a quantized lm_head is not supported; expected false (lm_head kept in float)"
    if qc.get("dynamic"):
        return "dynamic", ("per-module overrides of bits or group size are not supported; expected none, "
                           f"got {sorted(qc['dynamic'])[:3]}")
    if qc.get("rotation"):
        return "rotation", f"rotated weights ({qc['rotation']!r}) need rotated activations; expected none"
    return None
