"""torch.compile of Conv-LoRA: one graph without breaks, equal to eager, resize plans kept out of Dynamo's tracing."""

import pytest
import torch

from convlora import ConvLoraConfig, apply_conv_lora, moe_aux_loss
from convlora.tuner.fast_experts import dense_mixture, gathered_mixture
from convlora.tuner.moe import ConvExpertMixture

EIGHT_SCALES = [float(s) for s in range(1, 9)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo keeps compiled code on the forward's code object, shared by every test: start and end empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class RecordGraphs:
    """A Dynamo backend that keeps every graph it is given and runs it as it is."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(graph)
        return graph.forward


def mixture(routing: str = "auto", **settings) -> ConvExpertMixture:
    torch.manual_seed(0)
    moe = ConvExpertMixture(**{"channels": 3, "scales": EIGHT_SCALES, "noisy_gating": False, **settings})
    moe.routing = routing
    moe.reset_parameters(init_gate="random")
    torch.nn.init.normal_(moe.expert_bias, std=0.1)
    return moe


def spread_grid(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    """A grid whose per-sample means differ, so that the gate sends the samples to several experts."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, side, side, 3, generator=generator)
    return noise + 2 * torch.randn(batch, 1, 1, 3, generator=generator)


# (routing, constructor settings): the gathered path torch.compile takes by default (full and depthwise convs,
# top-2 with gate factors), and the dense one exports use
MIXTURES = {
    "auto": ("auto", {}),
    "auto_depthwise_top2_weighted": ("auto", {"depthwise": True, "top_k": 2, "weighted_combine": True}),
    "dense": ("dense", {}),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(MIXTURES))
def test_the_compiled_mixture_is_one_graph_with_the_reference_outputs_and_gradients(case, train):
    routing, settings = MIXTURES[case]
    compiled_moe, reference_moe = mixture(routing, **settings).train(train), mixture(routing, **settings).train(train)
    z = spread_grid(6, 8)
    z_compiled, z_reference = z.clone().requires_grad_(train), z.clone().requires_grad_(train)
    compiled = torch.compile(compiled_moe, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    found, expected = compiled(z_compiled), reference_moe.forward_reference(z_reference)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(compiled_moe.last_expert_counts, reference_moe.last_expert_counts)
    assert (compiled_moe.last_expert_counts > 0).sum() >= 3, "the case should route to several experts"
    if not train:
        return
    torch.testing.assert_close(compiled_moe.aux_loss, reference_moe.aux_loss)
    weights = torch.randn(z.shape)
    ((found * weights).sum() + compiled_moe.aux_loss).backward()
    ((expected * weights).sum() + reference_moe.aux_loss).backward()
    torch.testing.assert_close(z_compiled.grad, z_reference.grad, atol=1e-5, rtol=1e-4)
    for (name, p_compiled), p_reference in zip(
        compiled_moe.named_parameters(), reference_moe.parameters(), strict=True
    ):
        if p_compiled.grad is None:  # an expert no sample used: the reference multiplies its output by zero
            assert p_reference.grad is None or not p_reference.grad.any(), name
        else:
            torch.testing.assert_close(p_compiled.grad, p_reference.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("routing", "math"), [("auto", gathered_mixture), ("dense", dense_mixture)])
def test_dynamo_captures_the_experts_as_one_call_instead_of_reading_their_python(routing, math):
    moe = mixture(routing).eval()
    backend = RecordGraphs()
    z = spread_grid(4, 16)
    with torch.no_grad():
        found = torch.compile(moe, backend=backend, fullgraph=True)(z)
        # the eager dispatch after a capture: the shared cache of resize matrices kept no tensor made while tracing
        torch.testing.assert_close(found, moe.forward_reference(z), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(moe(z), found, atol=1e-5, rtol=1e-4)
    [graph] = backend.graphs
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    # read line by line, the resize plans left a torch.tensor(nested lists) per matrix and the einops patterns their
    # reshapes (two million bytecode steps for eight experts on a 16x16 grid); as one call, only the gate is left
    assert targets.count(math) == 1
    assert torch.tensor not in targets and torch.bmm not in targets and torch.einsum not in targets
    assert len(targets) < 40


def test_fully_dynamic_shapes_compile_and_give_the_reference_outputs():
    moe = mixture(scales=[1.0, 2.5, 3.0]).eval()  # a fractional scale: floats that dynamic=True could make symbolic
    compiled = torch.compile(moe, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for shape in [(4, 5, 5), (3, 6, 4)]:
            z = torch.randn(*shape, 3)
            torch.testing.assert_close(compiled(z), moe.forward_reference(z), atol=1e-5, rtol=1e-4)


def test_two_new_batch_sizes_cost_one_recompile_and_then_none():
    moe = mixture().eval()
    backend = RecordGraphs()
    compiled = torch.compile(moe, backend=backend)
    with torch.no_grad():
        for batch in (2, 3, 5, 7):  # the second size makes the batch dynamic; later ones reuse that graph
            z = spread_grid(batch, 8, seed=batch)
            torch.testing.assert_close(compiled(z), moe.forward_reference(z), atol=1e-5, rtol=1e-4)
    assert len(backend.graphs) == 2


def adapted(make_sam, seed: int = 0):
    torch.manual_seed(seed)
    config = ConvLoraConfig(init_lora_weights=False, noisy_gating=False, lora_dropout=0.0)
    return apply_conv_lora(make_sam(), config)


def test_a_compiled_adapted_sam_has_the_eager_masks_in_eval(make_sam, images):
    model = adapted(make_sam).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(pixel_values=images, multimask_output=False).pred_masks
        found = compiled(pixel_values=images, multimask_output=False).pred_masks
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)


def test_a_compiled_adapted_sam_has_the_eager_loss_and_gradients_in_train_with_a_noise_free_gate(make_sam, images):
    eager, compiled_model = adapted(make_sam).train(), adapted(make_sam).train()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)

    def loss_of(model, owner) -> torch.Tensor:
        masks = model(pixel_values=images, multimask_output=False).pred_masks
        loss = masks.square().mean() + moe_aux_loss(owner)
        loss.backward()
        return loss.detach()

    expected, found = loss_of(eager, eager), loss_of(compiled, compiled_model)
    assert float(moe_aux_loss(compiled_model).detach()) > 0  # the mixtures' auxiliary losses left the graph
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)
    trained = [(n, p) for n, p in compiled_model.named_parameters() if p.requires_grad]
    assert any("conv_lora_experts" in name for name, _ in trained)
    for (name, p_compiled), p_eager in zip(
        trained, [p for p in eager.parameters() if p.requires_grad], strict=True
    ):  # a part the loss does not reach (the IoU head) has no gradient in eager runs, zeros in compiled ones
        found_grad = torch.zeros_like(p_compiled) if p_compiled.grad is None else p_compiled.grad
        expected_grad = torch.zeros_like(p_eager) if p_eager.grad is None else p_eager.grad
        torch.testing.assert_close(found_grad, expected_grad, atol=1e-5, rtol=1e-3, msg=name)


def test_an_adapted_sam_captures_as_one_graph_without_breaks(make_sam, images):
    model = adapted(make_sam).train()
    explanation = torch._dynamo.explain(model)(pixel_values=images, multimask_output=False)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
