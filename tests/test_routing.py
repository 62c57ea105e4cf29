"""Dense and sparse routing of the conv-expert mixture agree, and the dense one traces and compiles."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from convlora import ConvLoraConfig, apply_conv_lora
from convlora.tuner.moe import ConvExpertMixture, axis_plan, resize_taps, set_routing

# (constructor settings, grid shape): every interpolation mode, integer, fractional and odd/even scales,
# top-k above one, depthwise convs, non-square and one-pixel grids
CASES = {
    "reference": ({}, (6, 8, 8, 3)),
    "top2_weighted": ({"top_k": 2, "weighted_combine": True}, (5, 7, 5, 3)),
    "depthwise_top3": ({"depthwise": True, "top_k": 3}, (4, 6, 6, 3)),
    "bilinear_fractional": ({"interpolation": "bilinear", "scales": [0.5, 1, 1.5, 2]}, (4, 9, 7, 3)),
    "nearest": ({"interpolation": "nearest", "scales": [1, 2, 3]}, (3, 5, 5, 3)),
    "one_pixel": ({}, (3, 1, 1, 3)),
}


def mixture(settings: dict, routing: str, seed: int = 0) -> ConvExpertMixture:
    torch.manual_seed(seed)
    moe = ConvExpertMixture(**{"channels": 3, "scales": list(range(1, 9)), **settings, "routing": routing})
    moe.reset_parameters(init_gate="random")
    torch.nn.init.normal_(moe.expert_bias, std=0.1)
    return moe


def interpolate_conv_reference(moe: ConvExpertMixture, index: int, z: torch.Tensor) -> torch.Tensor:
    """The textbook expert: F.interpolate, conv2d with padding 1, GELU, F.interpolate back."""
    height, width = z.shape[-2:]
    scale = moe.scales[index]
    align = None if moe.interpolation == "nearest" else False
    y = z
    if scale != 1.0:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        y = F.interpolate(y, size=size, mode=moe.interpolation, align_corners=align)
    y = F.gelu(F.conv2d(y, moe.expert_weight[index], moe.expert_bias[index], padding=1, groups=moe.groups))
    if scale != 1.0:
        y = F.interpolate(y, size=(height, width), mode=moe.interpolation, align_corners=align)
    return y


def run(moe: ConvExpertMixture, z: torch.Tensor, noise_seed: int = 123) -> torch.Tensor:
    torch.manual_seed(noise_seed)  # the same gate noise for both dispatches
    return moe(z)


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


@pytest.mark.parametrize("frozen", [False, True], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_expert_equals_interpolate_conv_gelu_interpolate(case, frozen):
    settings, shape = CASES[case]
    moe = mixture(settings, "sparse")
    z = torch.randn(shape).permute(0, 3, 1, 2)
    for index in range(moe.num_experts):
        expected = interpolate_conv_reference(moe, index, z)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            found = moe.run_expert(index, z)
        assert torch.allclose(found, expected, atol=1e-5), moe.scales[index]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_dense_and_sparse_routing_give_the_same_outputs_aux_loss_and_gradients(case, train):
    settings, shape = CASES[case]
    sparse, dense = mixture(settings, "sparse").train(train), mixture(settings, "dense").train(train)
    z = torch.randn(shape)
    z_sparse, z_dense = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_sparse, out_dense = run(sparse, z_sparse), run(dense, z_dense)
    assert torch.allclose(out_dense, out_sparse, atol=1e-6)
    assert torch.equal(dense.last_expert_counts, sparse.last_expert_counts)
    if not train:
        return
    assert torch.allclose(dense.aux_loss, sparse.aux_loss)
    weights = torch.randn(shape)
    ((out_sparse * weights).sum() + sparse.aux_loss).backward()
    ((out_dense * weights).sum() + dense.aux_loss).backward()
    assert torch.allclose(z_dense.grad, z_sparse.grad, atol=1e-5)
    for (name, p_sparse), p_dense in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert (p_sparse.grad is None) == (p_dense.grad is None) or not p_sparse.grad.any(), name
        if p_sparse.grad is not None:
            assert torch.allclose(p_dense.grad, p_sparse.grad, atol=1e-5), name


@pytest.mark.parametrize("batch", [1, 6], ids=["one_row_unpadded", "rows_padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_folded_chain_of_frozen_experts_gives_each_sample_its_own_experts_output(case, batch):
    settings, shape = CASES[case]
    moe = mixture(settings, "sparse").eval()
    z = torch.randn(batch, *shape[1:]) + 2 * torch.randn(batch, 1, 1, shape[-1])  # spread the gate's choices
    with torch.no_grad():
        assert moe._folds(*shape[1:3])  # no gradient needed and a small grid: the folded chain runs
        found = moe(z)
        top_indices, combine, _ = moe.route(z)
    features = z.permute(0, 3, 1, 2)
    for sample in range(batch):
        factors = combine[sample] if moe.weighted_combine else torch.ones(moe.top_k)
        expected = sum(
            interpolate_conv_reference(moe, int(e), features[sample : sample + 1])[0] * float(c)
            for e, c in zip(top_indices[sample], factors, strict=True)
        )
        assert torch.allclose(found[sample], expected.permute(1, 2, 0), atol=1e-5), sample
    assert torch.equal(moe.last_expert_counts, torch.bincount(top_indices.flatten(), minlength=moe.num_experts))
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
        moe._one_stack_fits = {(8, 8): False}  # the same forward through the unfolded chain
        assert torch.allclose(after, moe(z), atol=1e-5)
        moe._one_stack_fits = {}
        moe.load_state_dict(mixture({}, "sparse", seed=1).state_dict())  # loaded weights
        loaded = moe(z)
        assert torch.allclose(loaded, mixture({}, "sparse", seed=1).eval()(z), atol=1e-5)
        moe.load_state_dict(mixture({}, "sparse", seed=2).state_dict(), assign=True)  # new parameter objects
        assert torch.allclose(moe(z), mixture({}, "sparse", seed=2).eval()(z), atol=1e-5)
        moe.load_state_dict(mixture({}, "sparse", seed=1).state_dict())
    with torch.inference_mode():
        assert torch.allclose(moe(z), loaded, atol=1e-6)
    doubled = moe.double()  # another dtype folds anew
    with torch.no_grad():
        assert doubled(z.double()).dtype == torch.float64
        assert torch.allclose(doubled(z.double()).float(), loaded, atol=1e-5)


def test_routing_spreads_samples_so_the_comparisons_cover_several_experts():
    moe = mixture({}, "dense").eval()
    moe(torch.randn(32, 4, 4, 3))
    assert (moe.last_expert_counts > 0).sum() >= 3


def test_auto_routing_is_sparse_in_eager_cpu_runs_and_dense_when_set():
    moe = mixture({}, "auto")
    z = torch.randn(2, 4, 4, 3)
    assert not moe.uses_dense_routing(z)
    moe.routing = "dense"
    assert moe.uses_dense_routing(z)
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
    z = torch.randn(32, side, side, 3) + 2 * torch.randn(32, 1, 1, 3)  # grid means spread, so does the gate
    # 8x8: every expert in one gathered chain, smaller matrices zero-padded; 24x24: one chain per matrix shape
    assert moe._one_gathered_stack(side, side) == (side == 8)
    with torch.no_grad():
        chosen = moe.route(z)[0][:, 0]
    # several experts of one stack (odd scales, or 4/6/8) are used: their rows share one gathered chain
    assert max(sum(int((chosen == e).any()) for e in stack) for stack in moe._stacks(side, side)) >= 3
    with torch.no_grad() if not grad else contextlib.nullcontext():
        out = moe(z)
    features = z.permute(0, 3, 1, 2)
    for sample in range(len(z)):
        expected = interpolate_conv_reference(moe, int(chosen[sample]), features[sample : sample + 1])
        assert torch.allclose(out[sample], expected[0].permute(1, 2, 0), atol=1e-5), sample
