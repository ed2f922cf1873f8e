"""Kernels against the torch reference in `gptq_plugins.packing`.

Triton kernels run on CPU under TRITON_INTERPRET=1 (set before they are imported) and must be
bit-identical for packing and dequantization and within output rounding for the matmul, on
shapes that are not multiples of the block sizes. The CPU paths (the int4 op for 2/3/4-bit, the
same op on nibble pairs for 8-bit, tile-wise dequantization for many rows) must reproduce the
reference dequantization exactly where bfloat16 can hold it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_packing import random_quantized

from gptq_plugins.kernels import BackendUnsupported, cpu_dispatch, tiled_dequant
from gptq_plugins.kernels.cpu_int4 import convert_to_int4pack, int4pack_matmul
from gptq_plugins.kernels.cpu_int8 import convert_to_nibble_pairs, nibble_pairs_matmul
from gptq_plugins.kernels.tiled_dequant import tiled_dequant_matmul
from gptq_plugins.packing import dequantize_packed, pack_quantized
from gptq_plugins.quant_linear import QuantLinear

BITS = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def triton_kernels():
    """(triton_layout, triton_matmul, device): compiled on a CUDA machine, else interpreted on CPU."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        from gptq_plugins.kernels import triton_layout, triton_matmul
        yield triton_layout, triton_matmul, "cuda"
        return
    with pytest.MonkeyPatch.context() as patch:
        # Read when the kernels are decorated (first import) and again by triton at launch.
        patch.setenv("TRITON_INTERPRET", "1")
        from gptq_plugins.kernels import triton_layout, triton_matmul
        if not triton_layout.INTERPRETED:
            pytest.skip("the Triton kernels were imported earlier without TRITON_INTERPRET=1")
        yield triton_layout, triton_matmul, "cpu"


def on(device, packed: dict) -> dict:
    return {name: t.to(device) for name, t in packed.items()}


def out_features_for(bits: int) -> int:
    """Smallest output width qzeros can pack that is not a multiple of the 64-wide blocks."""
    return 96 if bits == 3 else 48


def output_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> dict:
    """One or two units in the last place of the largest output: float32 sums may differ in order."""
    return {"rtol": 0, "atol": 2 * torch.finfo(dtype).eps * reference.abs().max().item()}


# ----------------------------------------------------------------------------- Triton layout
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_pack_is_bit_identical(triton_kernels, bits, act_order):
    layout, _, device = triton_kernels
    qw = random_quantized(out_features_for(bits), 224, bits, 32, act_order=act_order, seed=bits)
    expected = pack_quantized(qw)
    for name in ("codes", "scales", "zeros", "g_idx"):
        setattr(qw, name, getattr(qw, name).to(device))
    got = layout.pack_quantized_triton(qw)
    for name in expected:
        assert torch.equal(got[name].cpu(), expected[name]), name


def test_triton_pack_rejects_out_of_range_codes(triton_kernels):
    layout, _, device = triton_kernels
    with pytest.raises(ValueError, match="^values"):
        layout.pack_rows_triton(torch.full((8, 3), 16, dtype=torch.int32, device=device), 4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_dequantize_is_bit_identical(triton_kernels, bits, act_order):
    layout, _, device = triton_kernels
    packed = pack_quantized(random_quantized(out_features_for(bits), 224, bits, 32, act_order, seed=bits))
    reference = dequantize_packed(**packed, bits=bits)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # rounded to nearest even, like torch
        got = layout.dequantize_triton(**on(device, packed), bits=bits, dtype=dtype)
        assert torch.equal(got.cpu(), reference.to(dtype)), dtype


# ----------------------------------------------------------------------------- Triton matmul
def _matmul_case(bits, group_size, act_order, in_features=224):
    packed = pack_quantized(random_quantized(out_features_for(bits), in_features, bits, group_size,
                                             act_order))
    return packed, dequantize_packed(**packed, bits=bits)


def _check_matmul(matmul, device, packed, weight, bits, m, dtype):
    """Against what the kernel computes: weights rounded to x's dtype, float32 sums."""
    x = torch.randn(m, weight.shape[1], dtype=dtype)
    y = matmul.fused_matmul(x.to(device), **on(device, packed), bits=bits).cpu()
    assert y.dtype == dtype and y.shape == (m, weight.shape[0])
    reference = x.double() @ weight.to(dtype).double().T
    torch.testing.assert_close(y.double(), reference, **output_tolerance(reference, dtype))


@pytest.mark.parametrize("group_size, in_features", [(32, 224), (64, 192), (128, 384), (-1, 224)])
@pytest.mark.parametrize("act_order", [False, True])
def test_fused_matmul_group_sizes(triton_kernels, group_size, in_features, act_order):
    _, matmul, device = triton_kernels
    packed, weight = _matmul_case(4, group_size, act_order, in_features)
    _check_matmul(matmul, device, packed, weight, 4, m=3, dtype=torch.float16)


@pytest.mark.parametrize("m", [1, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_matmul_batch_sizes_and_dtypes(triton_kernels, m, dtype):
    _, matmul, device = triton_kernels
    packed, weight = _matmul_case(4, 32, act_order=True)
    _check_matmul(matmul, device, packed, weight, 4, m=m, dtype=dtype)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_fused_matmul_other_widths(triton_kernels, bits):
    _, matmul, device = triton_kernels
    packed, weight = _matmul_case(bits, 32, act_order=True)
    _check_matmul(matmul, device, packed, weight, bits, m=5, dtype=torch.float16)


@pytest.mark.parametrize("m", [3, 70])  # fused kernel, and dequantize + matmul past 64 rows
def test_triton_backend_apply(triton_kernels, m):
    from gptq_plugins.kernels import TritonBackend
    from gptq_plugins.quant_linear import QuantLinear

    _, _, device = triton_kernels
    qw = random_quantized(48, 224, 4, 32, act_order=True)
    layer = QuantLinear.from_quantized(qw, dtype=torch.float16).to(device)
    x = torch.randn(m, 224, dtype=torch.float16)
    reference = x.double() @ qw.dequantize().half().double().T
    y = TritonBackend().apply(layer, x.to(device)).cpu()
    torch.testing.assert_close(y.double(), reference, **output_tolerance(reference, torch.float16))


_COMPILE_FOR_H100 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gptq_plugins.kernels.triton_layout import _dequantize_kernel, _pack_kernel
    from gptq_plugins.kernels.triton_matmul import _fused_matmul_kernel

    def compile_for_sm90(kernel, pointers, ints, constexprs):
        signature = {**pointers, **{name: "i32" for name in ints},
                     **{name: "constexpr" for name in constexprs}}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm

    packed = {"qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "g_idx_ptr": "*i32"}
    compile_for_sm90(_pack_kernel, {"src_ptr": "*i32", "dst_ptr": "*i32"},
                     ["n_values", "n_lanes", "src_stride_value", "src_stride_lane",
                      "dst_stride_word", "dst_stride_lane"],
                     {"BITS": 3, "BLOCK_WORDS": 32, "BLOCK_LANES": 64})
    compile_for_sm90(_dequantize_kernel, {**packed, "out_ptr": "*bf16"}, ["N", "K", "n_zero_words"],
                     {"BITS": 3, "BLOCK_K": 64, "BLOCK_N": 64, "INTERPRETED": False})
    compile_for_sm90(_fused_matmul_kernel, {"x_ptr": "*bf16", **packed, "out_ptr": "*bf16"},
                     ["M", "N", "K", "n_zero_words", "stride_xm", "stride_om"],
                     {"BITS": 4, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "INTERPRETED": False})
""")


def test_triton_kernels_compile_for_cuda():
    """Lowered to an sm_90 cubin with Triton's bundled toolchain: no GPU needed (subprocess,
    because kernels imported under the interpreter cannot be compiled)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ----------------------------------------------------------------------------- CPU int4
def test_int4_op_convention():
    """The op computes x @ W.T with W = (q - 8) * scale + offset, one scale row per group."""
    out_features, in_features, group = 32, 64, 32
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    scale = torch.randint(1, 8, (2, out_features)).float() / 64
    offset = torch.randint(-8, 8, (2, out_features)).float() / 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    scales_and_zeros = torch.stack([scale, offset], dim=-1).to(torch.bfloat16)
    w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(in_features, dtype=torch.bfloat16),
                                                    packed, group, scales_and_zeros)
    groups = torch.arange(in_features) // group
    assert torch.equal(w_t.float().T, (q - 8).float() * scale[groups].T + offset[groups].T)


def _bf16_exact_scales(n_groups, out_features, seed):
    """Scales with 3 significant bits: bfloat16 holds them and every (8 - z) * scale exactly."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 8, (n_groups, out_features), generator=gen).float() \
        * 2.0 ** -torch.randint(6, 12, (n_groups, out_features), generator=gen).float()


@pytest.mark.parametrize("in_features, group_size, op_group_size", [
    (512, 32, 32), (512, 128, 128), (512, 512, 256), (512, -1, 256),
    (576, 128, 64),  # ragged: four groups of 128 and a last one of 64
    (480, 192, 32),  # ragged: 192, 192 and 96 share sub-groups of 32
])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_conversion_reproduces_reference_exactly(in_features, group_size, op_group_size, act_order, bits):
    """2- and 3-bit codes shifted by their zero points are 4-bit codes: the same op, exactly."""
    out_features = 32
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    qw = random_quantized(out_features, in_features, bits, group_size, act_order, seed=bits,
                          scales=_bf16_exact_scales(n_groups, out_features, seed=1))
    packed = pack_quantized(qw)
    weight = convert_to_int4pack(**packed, bits=bits)
    assert weight.op_group_size == op_group_size
    assert (weight.input_order is not None) == (act_order and n_groups > 1)
    # Identity activations read the converted weight back, act-order gather included.
    w_t = int4pack_matmul(torch.eye(in_features, dtype=torch.bfloat16), weight)
    assert torch.equal(w_t.float().T, dequantize_packed(**packed, bits=bits))
    if bits < 4:  # the zero points live in the codes: no offset to round, whatever the scales
        assert not weight.scales_and_zeros[..., 1].any()


def test_int4_declines_codes_wider_than_the_op():
    packed = pack_quantized(random_quantized(32, 64, 8, 32, act_order=False))
    with pytest.raises(BackendUnsupported, match=r"bits=8: the int4 op holds codes of \[2, 3, 4\] bits"):
        convert_to_int4pack(**packed, bits=8)


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_matmul_within_bfloat16_tolerance(act_order):
    qw = random_quantized(64, 256, 4, 128, act_order, seed=2)  # arbitrary float16 scales
    packed = pack_quantized(qw)
    x = torch.randn(2, 7, 256).reshape(-1, 256)
    y = int4pack_matmul(x, convert_to_int4pack(**packed))
    assert y.dtype == torch.float32
    reference = x @ dequantize_packed(**packed, bits=4).T
    torch.testing.assert_close(y, reference, rtol=0, atol=0.02 * reference.abs().max().item())


@pytest.mark.parametrize("out_features, group_size, act_order, reason", [
    (24, 32, False, "out_features"),           # op packs 16 output rows at a time
    (32, -1, False, r"groups of \[40\] columns"),  # in=40 has no 32-multiple sub-group
    (32, 48, False, r"groups of \[16, 48\] columns"),  # ragged: a last group of 16
])
def test_int4_declines_unsupported_layers(out_features, group_size, act_order, reason):
    in_features = 40 if group_size == -1 else 64
    packed = pack_quantized(random_quantized(out_features, in_features, 4, group_size, act_order))
    with pytest.raises(BackendUnsupported, match=reason):
        convert_to_int4pack(**packed)


def test_int4_takes_any_group_assignment_with_a_common_sub_group():
    """Groups of 96, 0 and 32 columns (an odd but valid g_idx) still read back exactly."""
    packed = pack_quantized(random_quantized(32, 128, 4, 64, act_order=False, seed=3,
                                             scales=_bf16_exact_scales(2, 32, seed=3)))
    packed["g_idx"] = torch.tensor([0] * 96 + [1] * 32, dtype=torch.int32)[torch.randperm(128)]
    weight = convert_to_int4pack(**packed)
    assert weight.op_group_size == 32
    w_t = int4pack_matmul(torch.eye(128, dtype=torch.bfloat16), weight)
    assert torch.equal(w_t.float().T, dequantize_packed(**packed, bits=4))


# ----------------------------------------------------------------------------- CPU int8 (nibble pairs)
GROUPINGS = [(512, 32), (512, 128), (512, -1), (576, 128), (480, 192)]  # the last two ragged


@pytest.mark.parametrize("in_features, group_size", GROUPINGS)
@pytest.mark.parametrize("act_order", [False, True])
def test_int8_nibble_pairs_reproduce_reference_in_bfloat16(in_features, group_size, act_order):
    """Both nibbles' weights are summed in float32 inside the op and rounded once: the reference
    rounded to bfloat16, exactly (scales bfloat16 holds; the zero term then needs <= 16 bits)."""
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    packed = pack_quantized(random_quantized(32, in_features, 8, group_size, act_order, seed=8,
                                             scales=_bf16_exact_scales(n_groups, 32, seed=4)))
    weight = convert_to_nibble_pairs(**packed)
    w_t = nibble_pairs_matmul(torch.eye(in_features, dtype=torch.bfloat16), weight)
    assert torch.equal(w_t.T, dequantize_packed(**packed, bits=8).to(torch.bfloat16))


def test_int8_symmetric_zero_term_needs_no_low_part():
    """z = 128: the zero term is 8 * scale, which bfloat16 holds, so the low nibbles' offset is 0."""
    qw = random_quantized(32, 256, 8, 128, act_order=False, seed=5)
    qw.zeros.fill_(128)
    weight = convert_to_nibble_pairs(**pack_quantized(qw))
    offsets = weight.scales_and_zeros[..., 1]
    n_high = offsets.shape[0] // 2
    assert offsets[:n_high].any() and not offsets[n_high:].any()


@pytest.mark.parametrize("act_order", [False, True])
def test_int8_matmul_within_bfloat16_tolerance(act_order):
    """Arbitrary float16 scales and asymmetric zeros: off by bfloat16 rounding only (a zero term
    carried in one bfloat16 would be off by up to a quarter step of the 8-bit grid)."""
    packed = pack_quantized(random_quantized(64, 256, 8, 128, act_order, seed=2))
    x = torch.randn(14, 256, generator=torch.Generator().manual_seed(2))
    y = nibble_pairs_matmul(x, convert_to_nibble_pairs(**packed))
    assert y.dtype == torch.float32
    weight = dequantize_packed(**packed, bits=8)
    reference = x @ weight.T
    # activations and scales rounded to bfloat16 (2**-9 relative each), bounded by sum |x||w|
    bound = 2 * 2.0 ** -9 * (x.abs() @ weight.abs().T)
    assert ((y - reference).abs() <= bound).all()


# ----------------------------------------------------------------------------- the op's layout, read back
_READ_BACK = """
import torch
from gptq_plugins.kernels.op_layout import block_columns, read_codes
for out_features, in_features in ((64, 256), (80, 64), (144, 128), (48, 32), (16, 32)):
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    start = block_columns() if out_features > block_columns() else 0
    assert torch.equal(read_codes(packed, 0, out_features).T.int(), codes)
    assert torch.equal(read_codes(packed, start, out_features).T.int(), codes[start:])
print(block_columns())
"""


@pytest.mark.parametrize("capability", [None, "avx2"])
def test_op_layout_reads_back_every_code(capability):
    """Whole blocks and a shorter last one, from the first block or a later one, as the op laid
    them out on this ISA (and as PyTorch's AVX2 kernels lay them out)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, "-c", _READ_BACK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout) in (32, 64)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_kernel_state_rebuilds_the_checkpoint_qweight_exactly(bits, act_order):
    """The layer keeps its codes only in the op's weight: `qweight` comes back bit for bit."""
    qw = random_quantized(96, 576, bits, 128, act_order, seed=bits)  # ragged: a last group of 64
    packed = pack_quantized(qw)
    layer = QuantLinear.from_quantized(qw, dtype=torch.bfloat16)
    layer.post_init(backend="cpu_int8" if bits == 8 else "cpu_int4")
    assert layer.qweight is None and "qweight" not in dict(layer.named_buffers())
    assert torch.equal(layer.checkpoint_qweight(), packed["qweight"])
    assert torch.equal(layer.state_dict()["qweight"], packed["qweight"])
    assert layer.qweight is None  # dropped again after the state_dict
    assert torch.equal(layer.dequantize(), dequantize_packed(**packed, bits=bits))


# ----------------------------------------------------------------------------- tiled dequantize
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("in_features, group_size", GROUPINGS)
@pytest.mark.parametrize("act_order", [False, True])
def test_tiled_dequant_is_the_op_weight_rounded_once(bits, in_features, group_size, act_order, monkeypatch):
    """Tiles of one block (the last shorter: 96 outputs) give the op's own weight, read back through
    identity activations; with scales bfloat16 holds, that is the reference dequantization."""
    monkeypatch.setattr(tiled_dequant, "TILE_ELEMENTS", 32 * in_features)
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    packed = pack_quantized(random_quantized(96, in_features, bits, group_size, act_order, seed=bits,
                                             scales=_bf16_exact_scales(n_groups, 96, seed=bits)))
    if bits == 8:
        weight, halves, op = convert_to_nibble_pairs(**packed), 2, nibble_pairs_matmul
    else:
        weight, halves, op = convert_to_int4pack(**packed, bits=bits), 1, int4pack_matmul
    eye = torch.eye(in_features)
    w_t = tiled_dequant_matmul(eye, weight, halves=halves)
    assert w_t.dtype == torch.float32
    assert torch.equal(w_t, op(eye, weight))
    assert torch.equal(w_t.T, dequantize_packed(**packed, bits=bits).to(torch.bfloat16).float())
    float32 = tiled_dequant_matmul(eye, weight, compute_dtype=torch.float32, halves=halves)
    assert torch.equal(float32.T, dequantize_packed(**packed, bits=bits))


@pytest.mark.parametrize("bits, backend", [(4, "cpu_int4"), (3, "cpu_int4"), (8, "cpu_int8")])
def test_cpu_backends_dequantize_tiles_from_the_crossover(bits, backend, monkeypatch):
    """Below the crossover the op runs, from it the tiled path: each gives its own exact result."""
    monkeypatch.setattr(cpu_dispatch, "tiled_from_rows", lambda op_weights_per_weight=1: 5)
    layer = QuantLinear.from_quantized(random_quantized(64, 256, bits, 64, act_order=True, seed=3),
                                       dtype=torch.float32)
    layer.post_init(backend=backend)
    matmul = nibble_pairs_matmul if bits == 8 else int4pack_matmul
    for rows, expected in ((4, lambda x: matmul(x, layer.kernel_state)),
                           (5, lambda x: tiled_dequant_matmul(x, layer.kernel_state, halves=2 if bits == 8 else 1))):
        x = torch.randn(rows, 256)
        assert torch.equal(layer(x), expected(x)), rows


def test_crossover_follows_the_cpu_kind(monkeypatch):
    for kind in ("AVX-512 + bfloat16", "AVX2"):
        monkeypatch.setattr(cpu_dispatch, "cpu_features", lambda kind=kind: type("F", (), {"kind": kind}))
        assert cpu_dispatch.tiled_from_rows(2) == cpu_dispatch.TILED_FROM_ROWS[kind][2]
    monkeypatch.setattr(cpu_dispatch, "cpu_features", lambda: type("F", (), {"kind": "AVX-512"}))
    assert cpu_dispatch.tiled_from_rows(1) == cpu_dispatch.TILED_FROM_ROWS["AVX2"][1]
