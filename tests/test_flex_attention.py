"""Spatial-bias attention: the FlexAttention path equals the SDPA reference in values and gradients."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block
from torch.nn.attention.flex_attention import create_mask

from jin.layers import AttentionSpec, SpatialAttention, SpatialBias, dense_mask, flex_mask, grid_coords, prepare_mask
from jin.layers.attention import allowed
from jin.encoders import Tokens
from jin.layers.spatial_bias import offset_row
from prob_jepa.predictor import LevelTokens, ModalityTokens

# On CPU flex_attention runs its unfused reference, which is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, HEADS, N, HEAD_DIM, GRID = 2, 3, 40, 16, 8
STRUCTURES = ["none", "shared_groups", "groups_and_valid", "valid", "groups_without_bias", "shared_reads", "reads_and_valid"]


def lattice_coords(batch: int = B, n: int = N) -> torch.Tensor:
    """``[batch, n, 3]`` tokens drawn from the 8×8, 4×4 and 2×2 grids (three scales, one lattice)."""
    pool = torch.cat([grid_coords(g).flatten(0, 1) for g in (GRID, GRID // 2, GRID // 4)])
    return torch.stack([pool[torch.randperm(len(pool))[:n]] for _ in range(batch)])


def random_structure(structure: str) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Random ``(group, valid, reads)``: -1 = context, 0..2 = task blocks; key 0 is shared and valid, so no row is
    empty. With a ``reads`` table: groups 0..3, group 0 read by all, the rest read at random (and by themselves)."""
    group = torch.randint(-1, 3, (B, N))
    group[:, 0] = -1
    valid = torch.rand(B, N) < 0.6
    valid[:, 0] = True
    reads = (torch.rand(4, 4) < 0.5) | torch.eye(4, dtype=torch.bool)
    reads[:, 0] = True
    return {
        "none": (None, None, None),
        "shared_groups": (group[:1], None, None),
        "groups_and_valid": (group, valid, None),
        "valid": (None, valid, None),
        "groups_without_bias": (group, None, None),
        "shared_reads": (group[:1] + 1, None, reads),
        "reads_and_valid": (group + 1, valid, reads),
    }[structure]


def make_spec(bias: SpatialBias, coords: torch.Tensor, structure: str) -> AttentionSpec:
    group, valid, reads = random_structure(structure)
    return AttentionSpec.build(None if structure == "groups_without_bias" else bias, coords, group, valid, reads)


def materialize(score_mod, batch: int, heads: int, n: int) -> torch.Tensor:
    """``score_mod(0, b, h, q, kv)`` at every index → ``[B, H, N, N]``, vmapped as flex's math reference does."""
    fn = score_mod
    for axis in (4, 3, 2, 1):  # kv, q, h, b; the score is mapped along every one
        fn = torch.vmap(fn, in_dims=(0, *(0 if i == axis else None for i in range(1, 5))))
    idx = [torch.arange(s, dtype=torch.int32) for s in (batch, heads, n, n)]
    return fn(torch.zeros(batch, heads, n, n), *idx)


def test_offset_row_is_spatial_bias_index():
    torch.manual_seed(0)
    bias = SpatialBias(HEADS, 16, GRID, max_scale_delta=1)
    coords = torch.rand(B, N, 3) * 3 - 1  # off the lattice, past both clamps
    d = coords[:, :, None, :] - coords[:, None, :, :]
    assert torch.equal(offset_row(d[..., 0], d[..., 1], d[..., 2], GRID, 1), bias.index(coords))


def test_dense_mask_is_bit_identical_to_spatial_bias_plus_structure():
    torch.manual_seed(0)
    bias = SpatialBias(HEADS, 16, GRID, max_scale_delta=1)
    coords = torch.rand(B, N, 3)
    num_ctx = 10
    group = torch.cat([torch.full((num_ctx,), -1), torch.arange(3).repeat_interleave(10)])
    valid = torch.rand(B, N) < 0.6
    hidden = torch.zeros(B, 1, 1, N).masked_fill(~valid[:, None, None, :], float("-inf"))
    # the predictor's task blocks as they were written before AttentionSpec: context ↔ context, block m → context + m
    ok = (group[None, :] == -1) | (group[:, None] == group[None, :])
    blocks = torch.zeros(ok.shape).masked_fill(~ok, float("-inf"))[None, None]
    today = bias(coords) + blocks + hidden
    assert torch.equal(dense_mask(AttentionSpec.build(bias, coords, group[None], valid), torch.float32), today)
    shared = coords[:1].expand(B, -1, -1)  # one coordinate tensor for the whole batch
    assert torch.equal(dense_mask(AttentionSpec.build(bias, shared), torch.float32), bias(shared))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_flex_forward_equals_sdpa_with_dense_mask(structure):
    torch.manual_seed(0)
    bias = SpatialBias(HEADS, 16, GRID, max_scale_delta=1)
    attn = SpatialAttention(HEADS * HEAD_DIM, HEADS, qkv_bias=True).eval()
    x = torch.randn(B, N, HEADS * HEAD_DIM)
    with torch.no_grad():
        spec = make_spec(bias, lattice_coords(), structure)
        flex, sdpa = attn(x, flex_mask(spec)), attn(x, dense_mask(spec, torch.float32))
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_score_and_mask_mods_materialize_to_the_dense_mask_with_its_gradients():
    torch.manual_seed(0)
    bias = SpatialBias(HEADS, 16, GRID, max_scale_delta=1)
    coords = lattice_coords()
    weight = torch.randn(B, HEADS, N, N)

    dense = dense_mask(AttentionSpec.build(bias, coords), torch.float32)
    (dense * weight).sum().backward()
    dense_grads = [p.grad.clone() for p in bias.parameters()]
    bias.zero_grad()
    fused = materialize(flex_mask(AttentionSpec.build(bias, coords)).score_mod, B, HEADS, N)
    (fused * weight).sum().backward()

    assert torch.equal(fused, dense)
    for p, g in zip(bias.parameters(), dense_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    spec = make_spec(bias, coords, "groups_and_valid")
    block_mask = flex_mask(spec).block_mask
    allowed = dense_mask(spec, torch.float32)[:, :1].isfinite()
    assert torch.equal(create_mask(block_mask.mask_mod, B, 1, N, N, "cpu"), allowed)


def test_loads_timm_block_state_dict_and_keeps_tensor_mask_behaviour():
    torch.manual_seed(0)
    dim = HEADS * HEAD_DIM
    plain, ours = Block(dim, HEADS, qkv_bias=True), Block(dim, HEADS, qkv_bias=True, attn_layer=SpatialAttention)
    ours.load_state_dict(plain.state_dict())  # strict: same parameter names and shapes
    x = torch.randn(B, N, dim)
    mask = torch.randn(B, HEADS, N, N)
    assert torch.equal(ours(x, attn_mask=mask), plain(x, attn_mask=mask))
    assert torch.equal(ours(x), plain(x))


def test_spec_trains_on_cpu_through_sdpa():
    torch.manual_seed(0)
    bias = SpatialBias(HEADS, 16, GRID, max_scale_delta=1)
    block = Block(HEADS * HEAD_DIM, HEADS, qkv_bias=True, attn_layer=SpatialAttention)
    x = torch.randn(B, N, HEADS * HEAD_DIM)
    coords, (group, valid, _) = lattice_coords(), random_structure("groups_and_valid")
    spec = AttentionSpec.build(bias, coords, group, valid)
    assert isinstance(prepare_mask(spec, x), torch.Tensor)
    block(x, attn_mask=spec).square().sum().backward()  # flex has no CPU backward: this must be SDPA
    spec_grads = [p.grad.clone() for p in [*block.parameters(), *bias.parameters()]]
    block.zero_grad()
    bias.zero_grad()
    dense = dense_mask(AttentionSpec.build(bias, coords, group, valid), torch.float32)
    block(x, attn_mask=dense).square().sum().backward()
    for p, g in zip([*block.parameters(), *bias.parameters()], spec_grads):
        assert torch.equal(p.grad, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused FlexAttention needs CUDA")
@pytest.mark.parametrize("structure", ["groups_and_valid", "reads_and_valid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flex_equals_sdpa_in_values_and_gradients(dtype, structure):
    torch.manual_seed(0)
    dim, dev = HEADS * HEAD_DIM, "cuda"
    bias = SpatialBias(HEADS, 16, GRID, max_scale_delta=1).to(dev)
    blocks = [Block(dim, HEADS, qkv_bias=True, attn_layer=SpatialAttention).to(dev) for _ in range(2)]
    x = torch.randn(B, N, dim, device=dev)
    coords = lattice_coords().to(dev)
    group, valid, reads = (None if t is None else t.to(dev) for t in random_structure(structure))
    results = []
    for path in ("flex", "sdpa"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            s = AttentionSpec.build(bias, coords, group, valid, reads)
            mask = prepare_mask(s, x) if path == "flex" else dense_mask(s, dtype)
            assert (path == "flex") == (not isinstance(mask, torch.Tensor))
            out = x
            for block in blocks:
                out = block(out, attn_mask=mask)
        out.float().square().sum().backward()
        params = [p for m in (*blocks, bias) for p in m.parameters()]
        results.append((out.float(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # relative error in norm
    (flex, flex_grads), (sdpa, sdpa_grads) = results
    for a, b in [(flex, sdpa), *zip(flex_grads, sdpa_grads)]:
        assert (a - b).norm() <= tol * b.norm()


def test_predictor_task_groups_let_a_block_see_the_context_and_itself_only():
    group = LevelTokens.task_groups(3, 2, 2)
    ok = allowed(AttentionSpec(None, None, 0, 0, group, None))[0, 0]
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 1],
        [1, 1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(ok, expected)


def test_modality_tasks_read_their_sources_and_themselves_only():
    """Two modalities (context 2 + 1 tokens), task 0 reads modality 1 (cross-modal), task 1 both (joint)."""
    context = [Tokens(torch.zeros(1, 2, 6), torch.zeros(1, 2, 3)), Tokens(torch.zeros(1, 1, 6), torch.zeros(1, 1, 3))]
    queries = [Tokens(torch.zeros(1, 1, 6), torch.zeros(1, 1, 3)), Tokens(torch.zeros(1, 2, 6), torch.zeros(1, 2, 3))]
    sources = torch.tensor([[False, True], [True, True]])
    seq = ModalityTokens(6, 4).sequence(context, queries, sources)
    ok = allowed(AttentionSpec(None, None, 0, 0, seq.group, None, seq.reads))[0, 0]
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],  # modality 0's context
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],  # modality 1's context
        [0, 0, 1, 1, 0, 0],  # task 0: modality 1 and itself
        [1, 1, 1, 0, 1, 1],  # task 1: both modalities and itself
        [1, 1, 1, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(ok, expected) and seq.num_context == 3 and seq.sizes == [1, 2]
