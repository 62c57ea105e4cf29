"""Every fast path of the conv-expert mixture equals the reference in moe.py; the dense one traces and compiles."""

import contextlib
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from convlora import ConvLoraConfig, apply_conv_lora
from convlora.tuner import fast_experts, resize_matrices
from convlora.tuner.fast_experts import (
    FoldedExperts,
    dense_mixture,
    fits_one_stack,
    full_conv_weight,
    gathered_experts,
    gathered_mixture,
    matrix_expert,
    matrix_stacks,
    merge_slots,
    sparse_mixture,
    stacked_experts,
)
from convlora.tuner.moe import (
    ConvExpertMixture,
    axis_plan,
    reference_expert,
    reference_mixture,
    resize_taps,
    set_routing,
)

# (constructor settings, grid shape): every interpolation mode, integer, fractional and odd/even scales,
# top-k above one, depthwise convs, non-square and one-pixel grids
CASES = {
    "reference": ({}, (6, 8, 8, 3)),
    "top2_weighted": ({"top_k": 2, "weighted_combine": True}, (5, 7, 5, 3)),
    "depthwise_top3": ({"depthwise": True, "top_k": 3}, (4, 6, 6, 3)),
    "bilinear_fractional": ({"interpolation": "bilinear", "scales": [0.5, 1, 1.5, 2]}, (4, 9, 7, 3)),
    "nearest": ({"interpolation": "nearest", "scales": [1, 2, 3]}, (3, 5, 5, 3)),
    "one_pixel": ({}, (3, 1, 1, 3)),
    "large_grid": ({}, (6, 24, 24, 3)),
}


def mixture(settings: dict, routing: str, seed: int = 0) -> ConvExpertMixture:
    torch.manual_seed(seed)
    moe = ConvExpertMixture(**{"channels": 3, "scales": list(range(1, 9)), **settings, "routing": routing})
    moe.reset_parameters(init_gate="random")
    torch.nn.init.normal_(moe.expert_bias, std=0.1)
    return moe


def run(moe: ConvExpertMixture, z: torch.Tensor, noise_seed: int = 123, reference: bool = False) -> torch.Tensor:
    torch.manual_seed(noise_seed)  # the same gate noise for every dispatch
    return moe.forward_reference(z) if reference else moe(z)


# ------------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize(
    ("size_in", "size_out"), [(8, 64), (8, 16), (5, 15), (14, 98), (16, 8), (7, 3), (1, 4), (3, 1)]
)
def test_resize_weights_are_those_of_f_interpolate(mode, size_in, size_out):
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for row, pairs in enumerate(resize_taps(size_in, size_out, mode)):
        for index, weight in pairs:
            matrix[row, index] = weight
    eye = torch.eye(size_in, dtype=torch.float64).view(size_in, 1, size_in, 1)
    align = None if mode == "nearest" else False
    expected = F.interpolate(eye, size=(size_out, 1), mode=mode, align_corners=align).view(size_in, size_out).T
    assert torch.allclose(matrix, expected, atol=1e-12)


def test_odd_scales_compute_one_conv_output_per_grid_position_and_large_even_scales_four():
    assert axis_plan(8, 3.0, "bicubic").positions == 8  # bicubic at an odd scale samples exactly
    assert axis_plan(8, 8.0, "bicubic").positions == 32  # 4 taps per output instead of the 64 up-sampled rows
    assert axis_plan(8, 2.0, "bicubic").positions == 16  # overlapping taps: every up-sampled row


@pytest.mark.parametrize("depthwise", [False, True], ids=["full", "depthwise"])
def test_the_reference_expert_at_scale_one_is_a_padded_conv_and_gelu(depthwise):
    torch.manual_seed(0)
    z = torch.randn(2, 5, 6, 3)
    weight, bias = torch.randn(3, 1 if depthwise else 3, 3, 3), torch.randn(3)
    expected = F.gelu(F.conv2d(z.permute(0, 3, 1, 2), weight, bias, padding=1, groups=3 if depthwise else 1))
    assert torch.allclose(reference_expert(z, weight, bias, 1.0), expected.permute(0, 2, 3, 1), atol=1e-6)


# ------------------------------------------------------------------ every fast path against the reference


def per_expert(top_indices: torch.Tensor, combine: torch.Tensor | None, experts: int) -> torch.Tensor:
    """(b, e): each sample's factor per expert, zero for the experts it does not use."""
    factors = torch.ones(top_indices.shape, dtype=torch.float64) if combine is None else combine
    return torch.zeros(top_indices.shape[0], experts, dtype=factors.dtype).scatter_add(1, top_indices, factors)


def via_matrix_expert(z, weight, bias, scales, mode, top_indices, combine):
    x = rearrange(z, "b h w r -> b r h w")
    factors = per_expert(top_indices, combine, len(scales))
    out = sum(
        matrix_expert(x, weight[e], bias[e], scale, mode) * rearrange(factors[:, e], "b -> b 1 1 1")
        for e, scale in enumerate(scales)
    )
    return rearrange(out, "b r h w -> b h w r")


def via_stacked_experts(z, weight, bias, scales, mode, top_indices, combine):
    y = stacked_experts(rearrange(z, "b h w r -> b r h w"), weight, bias, scales, mode)  # every expert, padded
    return einsum(y, per_expert(top_indices, combine, len(scales)), "b e r h w, b e -> b h w r")


def via_gathered_experts(z, weight, bias, scales, mode, top_indices, combine):
    rows = rearrange(z.repeat_interleave(top_indices.shape[1], dim=0), "n h w r -> n r h w")  # (b k, r, h, w)
    y = gathered_experts(rows, weight, bias, scales, mode, top_indices.flatten())
    return rearrange(merge_slots(y, combine, top_indices.shape[1]), "b r h w -> b h w r")


PATHS = {
    "matrix": via_matrix_expert,
    "stacked": via_stacked_experts,
    "gathered": via_gathered_experts,
    "folded": lambda *args: FoldedExperts()(*args),
    "dense": dense_mixture,
    "sparse": sparse_mixture,
    "gathered_mixture": gathered_mixture,  # the path torch.compile takes (depthwise experts as full convs)
}
FULL_CONV_ONLY = {"stacked", "gathered"}
# (batch, height, width): a 4-window batch of convlora-tiny's 8x8 windows, two images' 16x16 global grids (both
# small enough for one padded chain), a grid too large for one (the sorted plan of stacks), a non-square grid
GRIDS = {
    "windows_4x8x8": (4, 8, 8),
    "global_2x16x16": (2, 16, 16),
    "large_6x24x24": (6, 24, 24),
    "rect_3x5x7": (3, 5, 7),
}
# how samples are routed: top-1 spread over experts of several matrix shapes, every sample to one expert,
# top-2 with gate factors, depthwise convs
ROUTINGS = ["top1_spread", "top1_one_expert", "top2_weighted", "depthwise_top2"]


def routed(routing: str, batch: int, experts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    first = (torch.arange(batch) * 3) % experts
    if routing == "top1_spread":
        return first[:, None], None
    if routing == "top1_one_expert":
        return torch.full((batch, 1), 5), None
    return torch.stack([first, (first + 1) % experts], dim=1), torch.rand(batch, 2, dtype=torch.float64) + 0.5


def path_cases() -> list:
    return [
        pytest.param(path, routing, id=f"{path}-{routing}")
        for path in PATHS
        for routing in ROUTINGS
        if not (routing.startswith("depthwise") and path in FULL_CONV_ONLY)
    ]


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("path", "routing"), path_cases())
def test_every_fast_path_gives_the_reference_outputs_and_gradients(path, routing, train, grid):
    # in float64, so that any difference beyond rounding shows (float32 sums over a 24x24 grid differ by 1e-4)
    torch.manual_seed(0)
    batch, height, width = GRIDS[grid]
    scales, mode, channels, f64 = tuple(float(s) for s in range(1, 9)), "bicubic", 3, torch.float64
    weight = torch.randn(len(scales), channels, 1 if routing.startswith("depthwise") else channels, 3, 3, dtype=f64)
    bias = 0.1 * torch.randn(len(scales), channels, dtype=f64)
    top_indices, combine = routed(routing, batch, len(scales))
    z = torch.randn(batch, height, width, channels, dtype=f64)
    learns_experts = train and path != "folded"  # folded experts are frozen; gradients still reach the input

    def outputs(mix) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = [z.clone().requires_grad_(train), weight.clone().requires_grad_(learns_experts)]
        inputs += [bias.clone().requires_grad_(learns_experts)]
        factors = None if combine is None else combine.clone().requires_grad_(train)
        with contextlib.nullcontext() if train else torch.no_grad():
            out = mix(inputs[0], inputs[1], inputs[2], scales, mode, top_indices, factors)
        if not train:
            return out, []
        out.mul(torch.linspace(-1, 1, out.numel(), dtype=f64).view(out.shape)).sum().backward()
        learned = [t for t in [*inputs, factors] if t is not None and t.requires_grad]
        return out, [t.grad for t in learned]

    expected, expected_grads = outputs(reference_mixture)
    found, found_grads = outputs(PATHS[path])
    assert found.dtype == f64
    torch.testing.assert_close(found, expected, atol=1e-10, rtol=1e-9)
    assert len(found_grads) == len(expected_grads) and bool(found_grads) == train
    for found_grad, expected_grad in zip(found_grads, expected_grads, strict=True):
        torch.testing.assert_close(found_grad, expected_grad, atol=1e-10, rtol=1e-9)


def test_the_path_table_reaches_every_dispatch_of_the_sparse_mixture():
    one_stack = [fits_one_stack(h, w, tuple(float(s) for s in range(1, 9)), "bicubic", 3) for _, h, w in GRIDS.values()]
    assert True in one_stack and False in one_stack  # the padded single chain and the sorted plan of stacks
    stacks = matrix_stacks(24, 24, tuple(float(s) for s in range(1, 9)), "bicubic", groups=1)
    chosen = set(routed("top1_spread", GRIDS["large_6x24x24"][0], 8)[0].flatten().tolist())
    used = [len(chosen & set(stack)) for stack in stacks]
    assert max(used) > fast_experts.GATHER_FROM + 1 and 1 in used  # a gathered chain and a chain of its own


def test_a_depthwise_conv_is_the_full_conv_of_its_diagonal_weights():
    weight, x = torch.randn(2, 3, 1, 3, 3), torch.randn(1, 3, 5, 5)
    full = full_conv_weight(weight)
    assert full.shape == (2, 3, 3, 3, 3) and full_conv_weight(full) is full
    for e in range(2):
        torch.testing.assert_close(F.conv2d(x, full[e], padding=1), F.conv2d(x, weight[e], padding=1, groups=3))


@pytest.mark.parametrize("frozen", [False, True], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_expert_of_the_mixture_equals_the_reference_expert(case, frozen):
    settings, shape = CASES[case]
    moe = mixture(settings, "sparse")
    z = torch.randn(shape)
    for index in range(moe.num_experts):
        weight, bias, scale = moe.expert_weight[index], moe.expert_bias[index], moe.scales[index]
        expected = reference_expert(z, weight, bias, scale, moe.interpolation)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            found = moe.run_expert(index, z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert torch.allclose(found, expected, atol=1e-5), moe.scales[index]


# ------------------------------------------------------------------------- the mixture's own dispatch


@pytest.mark.parametrize("routing", ["sparse", "dense", "gathered"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_gives_the_reference_outputs_aux_loss_counts_and_gradients(case, train, routing):
    settings, shape = CASES[case]
    fast, reference = mixture(settings, routing).train(train), mixture(settings, routing).train(train)
    z = torch.randn(shape)
    z_fast, z_reference = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_fast, out_reference = run(fast, z_fast), run(reference, z_reference, reference=True)
    assert torch.allclose(out_fast, out_reference, atol=1e-5)
    assert torch.equal(fast.last_expert_counts, reference.last_expert_counts)
    if not train:
        return
    assert torch.allclose(fast.aux_loss, reference.aux_loss)
    weights = torch.randn(shape)
    ((out_fast * weights).sum() + fast.aux_loss).backward()
    ((out_reference * weights).sum() + reference.aux_loss).backward()
    assert torch.allclose(z_fast.grad, z_reference.grad, atol=1e-5)
    for (name, p_fast), p_reference in zip(fast.named_parameters(), reference.parameters(), strict=True):
        if p_fast.grad is None:  # an expert no sample used: the reference multiplies its output by zero
            assert p_reference.grad is None or not p_reference.grad.any(), name
        else:
            assert torch.allclose(p_fast.grad, p_reference.grad, atol=1e-4), name


@pytest.mark.parametrize("batch", [1, 6], ids=["one_row_unpadded", "rows_padded"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "large_grid"])
def test_frozen_experts_on_small_grids_run_folded_and_give_each_sample_its_own_experts(case, batch):
    settings, shape = CASES[case]
    moe = mixture(settings, "sparse").eval()
    z = torch.randn(batch, *shape[1:]) + 2 * torch.randn(batch, 1, 1, shape[-1])  # spread the gate's choices
    scales, weight, bias = tuple(moe.scales), moe.expert_weight, moe.expert_bias
    with torch.no_grad():
        assert FoldedExperts.applies(z, weight, bias, scales, moe.interpolation)
        found = moe(z)
        expected = moe.forward_reference(z)
    assert not FoldedExperts.applies(z, weight, bias, scales, moe.interpolation)  # the experts need gradients
    assert torch.allclose(found, expected, atol=1e-5)
    if batch > 1:
        assert (moe.last_expert_counts > 0).sum() >= 2, "the case should route to several experts"


def test_folded_matrices_follow_the_expert_weights_when_they_change():
    moe = mixture({}, "sparse").eval()
    z = torch.randn(6, 8, 8, 3) + 2 * torch.randn(6, 1, 1, 3)
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.5)
    with torch.no_grad():
        before = moe(z)
    (moe.train()(z.requires_grad_()).square().sum()).backward()  # an optimiser step changes the weights in place
    optimizer.step()
    moe.eval()
    with torch.no_grad():
        after = moe(z)
        assert not torch.allclose(after, before, atol=1e-3)
        assert torch.allclose(after, moe.forward_reference(z), atol=1e-5)
        moe.load_state_dict(mixture({}, "sparse", seed=1).state_dict())  # loaded weights
        loaded = moe(z)
        assert torch.allclose(loaded, mixture({}, "sparse", seed=1).eval()(z), atol=1e-5)
        moe.load_state_dict(mixture({}, "sparse", seed=2).state_dict(), assign=True)  # new parameter objects
        assert torch.allclose(moe(z), mixture({}, "sparse", seed=2).eval()(z), atol=1e-5)
        moe.load_state_dict(mixture({}, "sparse", seed=1).state_dict())
        reset = moe(z)
        moe.reset_parameters(init_gate="random")  # re-initialised in place
        assert torch.allclose(moe(z), moe.forward_reference(z), atol=1e-5)
        moe.load_state_dict(mixture({}, "sparse", seed=1).state_dict())
    with torch.inference_mode():
        assert torch.allclose(moe(z), reset, atol=1e-6)
    doubled = moe.double()  # another dtype folds anew
    with torch.no_grad():
        assert doubled(z.double()).dtype == torch.float64
        assert torch.allclose(doubled(z.double()).float(), loaded, atol=1e-5)


def test_the_folded_cache_keeps_only_the_current_weights_and_is_bounded():
    folded = FoldedExperts(max_entries=3)
    weight, bias = torch.randn(2, 3, 3, 3, 3), torch.zeros(2, 3)
    scales, chosen = (1.0, 2.0), torch.tensor([[1], [0]])
    for side in (4, 5, 6, 7):  # four grids, three kept
        folded(torch.randn(2, side, side, 3), weight, bias, scales, "bicubic", chosen, None)
    assert [key[:2] for key in folded._entries] == [(5, 5), (6, 6), (7, 7)]
    weight.mul_(2)  # an in-place write: the next miss drops every entry folded from the old values
    z = torch.randn(2, 4, 4, 3)
    found = folded(z, weight, bias, scales, "bicubic", chosen, None)
    assert [key[:2] for key in folded._entries] == [(4, 4)]
    torch.testing.assert_close(found, reference_mixture(z, weight, bias, scales, "bicubic", chosen, None))
    with pytest.raises(ValueError, match="without gradient"):
        folded(z, weight.requires_grad_(), bias, scales, "bicubic", chosen, None)


def test_copies_of_a_mixture_start_with_an_empty_folded_cache():
    moe = mixture({}, "sparse").eval()
    with torch.no_grad():
        expected = moe(torch.ones(2, 8, 8, 3))
    assert len(moe._folded._entries) == 1
    for copied in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert len(copied._folded._entries) == 0
        with torch.no_grad():
            assert torch.allclose(copied(torch.ones(2, 8, 8, 3)), expected)


def test_the_shared_resize_matrix_cache_is_bounded():
    assert resize_matrices._cached_matrices.cache_info().maxsize == 128


def test_routing_spreads_samples_so_the_comparisons_cover_several_experts():
    moe = mixture({}, "dense").eval()
    moe(torch.randn(32, 4, 4, 3))
    assert (moe.last_expert_counts > 0).sum() >= 3


def test_auto_routing_is_sparse_in_eager_cpu_runs_and_dense_when_set():
    moe = mixture({}, "auto")
    z = torch.randn(2, 4, 4, 3)
    assert not moe.uses_dense_routing(z) and moe.dispatch(z) == "sparse"
    moe.routing = "dense"
    assert moe.uses_dense_routing(z)
    moe.routing = "gathered"
    assert moe.uses_dense_routing(z) and moe.dispatch(z) == "gathered"
    with pytest.raises(ValueError, match="routing must be one of"):
        set_routing(moe, "fast")


def test_set_routing_reaches_every_mixture_of_an_adapted_model(make_sam):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(num_experts=2))
    assert set_routing(model, "dense") == 2
    assert {m.routing for m in model.modules() if isinstance(m, ConvExpertMixture)} == {"dense"}


def test_dense_routing_exports_to_a_static_graph_without_nonzero():
    moe = mixture({}, "auto").eval()
    z = torch.randn(4, 6, 6, 3)
    program = torch.export.export(moe, (z,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any("nonzero" in t or "index_add" in t for t in targets)
    assert torch.allclose(program.module()(z), moe(z), atol=1e-6)


# the resize plans are lru_cached pure functions of plain ints: Dynamo tracing through the cache is correct
DYNAMO_LRU = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")


@DYNAMO_LRU
def test_torch_compile_of_the_mixture_matches_eager_in_train_and_eval():
    # aot_eager traces with dynamo and AOT autograd like inductor does, without compiling C++ (slow here)
    moe = mixture({"scales": [1, 2, 3]}, "auto")
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    z = torch.randn(4, 5, 5, 3)
    moe.eval()
    assert torch.allclose(compiled(z), moe(z), atol=1e-6)
    moe.train()
    expected = run(moe, z)
    assert torch.allclose(run(compiled, z), expected, atol=1e-6)
    assert compiled.aux_loss is not None


@DYNAMO_LRU
def test_torch_compile_of_an_adapted_tiny_sam_matches_eager(make_sam, images):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(num_experts=3, init_lora_weights=False)).eval()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        expected = model(pixel_values=images, multimask_output=False).pred_masks
        found = compiled(pixel_values=images, multimask_output=False).pred_masks
    assert torch.allclose(found, expected, atol=1e-5)


@pytest.mark.parametrize("side", [8, 24], ids=["one_padded_stack", "stacks_by_shape"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_sparse_dispatch_sends_each_sample_through_its_own_expert_when_stacks_share_a_chain(grad, side):
    moe = mixture({}, "sparse").eval()
    scales = tuple(moe.scales)
    z = torch.randn(32, side, side, 3) + 2 * torch.randn(32, 1, 1, 3)  # grid means spread, so does the gate
    # 8x8: every expert in one gathered chain, smaller matrices zero-padded; 24x24: one chain per matrix shape
    assert fits_one_stack(side, side, scales, moe.interpolation, 3) == (side == 8)
    with torch.no_grad():
        chosen = moe.route(z)[0][:, 0]
    # several experts of one stack (odd scales, or 4/6/8) are used: their rows share one gathered chain
    stacks = matrix_stacks(side, side, scales, moe.interpolation, groups=1)
    assert max(sum(int((chosen == e).any()) for e in stack) for stack in stacks) >= 3
    with torch.no_grad() if not grad else contextlib.nullcontext():
        out = moe(z)
    for sample in range(len(z)):
        e = int(chosen[sample])
        expected = reference_expert(z[sample : sample + 1], moe.expert_weight[e], moe.expert_bias[e], scales[e])
        assert torch.allclose(out[sample], expected[0], atol=1e-5), sample
