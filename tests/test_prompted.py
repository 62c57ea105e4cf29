"""Prompted inference and prompted training on tiny SAMs: one encoder call per image, masks per prompt, learning."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from convlora.artifact import TaskInfo, export_trained
from convlora.artifact.methods import build_task_model
from convlora.cli import main
from convlora.data.prompts import PromptConfig, Prompts
from convlora.evaluation import prompted as evaluation_prompted
from convlora.evaluation.prompted import evaluate_prompted
from convlora.inference import Segmenter, base_task
from convlora.models import apply_conv_lora, find_sam, load_sam, random_sam, tiny_sam_config
from convlora.models.processing import postprocess_masks, preprocess
from convlora.prompting import encode_images
from convlora.training import prompted
from convlora.training.prompted import PromptedStep, prepare_prompted_model
from convlora.tuner.config import ConvLoraConfig


def count_encoder_calls(model) -> list[int]:
    calls = [0]
    find_sam(model).vision_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def picture(height: int = 48, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


BOXES = [[2, 3, 40, 30], [30, 10, 79, 47], [0, 0, 79, 47]]


def test_many_prompts_run_the_image_encoder_once():
    segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
    calls = count_encoder_calls(segmenter.model)
    masks, scores = segmenter.predict(picture(), boxes=BOXES * 10, return_scores=True)
    assert calls[0] == 1
    assert masks.shape == (30, 48, 80) and masks.dtype == bool
    assert scores.shape == (30,)


def test_each_prompt_gets_the_mask_it_gets_alone():
    segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
    image = picture()
    together, _ = segmenter.predict_prompted(image, Prompts(boxes=np.array(BOXES, np.float32)))
    for i, box in enumerate(BOXES):
        alone, _ = segmenter.predict_prompted(image, Prompts(boxes=np.array([box], np.float32)))
        assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_box_coordinates_are_mapped_from_original_pixels_through_the_resize():
    model = random_sam(tiny_sam_config())
    image = picture(40, 80)  # resized to 32 x 64 at the 64-px input: scale 0.8 on both axes
    pixel_values, info = preprocess(image, 64)
    with torch.no_grad():
        direct = model(pixel_values=pixel_values[None], input_boxes=torch.tensor([[[8.0, 4.0, 40.0, 24.0]]]),
                       multimask_output=False).pred_masks[:, 0]  # fmt: skip
    expected = postprocess_masks(direct, info)[0, 0]
    logits, _ = Segmenter(model, base_task(64, "random")).predict_prompted(
        image, Prompts(boxes=np.array([[10.0, 5.0, 50.0, 30.0]], np.float32))
    )
    assert torch.allclose(logits[0], expected, atol=1e-5)


def test_single_point_prompts_keep_the_best_rated_of_three_masks():
    model = random_sam(tiny_sam_config())
    image = picture(40, 80)  # scale 0.8: the point (20, 20) is (16, 16) in the input
    segmenter = Segmenter(model, base_task(64, "random"))
    _, auto = segmenter.predict(image, points=[[20, 20]], return_scores=True)
    _, three = segmenter.predict(image, points=[[20, 20]], multimask=True, return_scores=True)
    _, one = segmenter.predict(image, points=[[20, 20]], multimask=False, return_scores=True)
    assert auto[0] == pytest.approx(three[0])
    pixel_values, _ = preprocess(image, 64)
    with torch.no_grad():
        scores = model(pixel_values=pixel_values[None], input_points=torch.tensor([[[[16.0, 16.0]]]])).iou_scores
    assert three[0] == pytest.approx(float(scores.max()), abs=1e-6)
    assert one.shape == (1,)


def test_points_and_boxes_combine_into_one_prompt_each():
    segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
    masks = segmenter.predict(
        picture(), boxes=BOXES[:2], points=[[[10, 10], [30, 20]], [[50, 30]]], point_labels=[[1, 0], [1]]
    )
    assert masks.shape == (2, 48, 80)


def test_no_prompts_keeps_prompt_free_prediction():
    segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
    mask = segmenter.predict(picture())
    assert mask.shape == (48, 80) and mask.dtype == np.uint8


def test_bad_prompts_name_the_entry():
    segmenter = Segmenter(random_sam(tiny_sam_config()), base_task(64, "random"))
    with pytest.raises(ValueError, match=r"boxes\[1\].*outside the 80x48"):
        segmenter.predict(picture(), boxes=[[0, 0, 10, 10], [0, 0, 90, 10]])
    with pytest.raises(ValueError, match="label"):
        segmenter.predict(picture(), points=[[1, 1]], point_labels=[2])


def test_multiclass_model_refuses_prompts_clearly():
    task = TaskInfo("multiclass", 3, ["a", "b", "c"], 64, "random", "decoder")
    model = build_task_model(random_sam(tiny_sam_config()), task)
    with pytest.raises(ValueError, match="multi-class"):
        Segmenter(model, task).predict(picture(), boxes=[[0, 0, 10, 10]])


@pytest.fixture
def adapter_dir(tmp_path):
    """A prompt-free Conv-LoRA fine-tune (random weights) exported as a run's adapter folder."""
    base_dir = tmp_path / "base"
    random_sam(tiny_sam_config()).save_pretrained(base_dir)
    task = TaskInfo("binary", 2, ["background", "object"], 64, str(base_dir), "conv_lora")
    model = build_task_model(load_sam(base_dir), task, ConvLoraConfig(r=2, num_experts=2))
    out = tmp_path / "adapter"
    export_trained(model, task, out)
    return out


def test_a_prompt_free_adapter_answers_prompts(adapter_dir):
    segmenter = Segmenter.from_pretrained(adapter_dir, device="cpu")
    calls = count_encoder_calls(segmenter.model)
    masks = segmenter.predict(picture(), boxes=BOXES)
    assert masks.shape == (3, 48, 80) and calls[0] == 1
    assert segmenter.predict(picture()).shape == (48, 80)


def test_embedded_base_is_a_promptable_vanilla_sam():
    segmenter = Segmenter.from_pretrained("convlora-tiny", device="cpu")
    assert segmenter.task.method == "base" and segmenter.task.image_size == 128
    image = np.zeros((100, 120, 3), np.uint8)
    image[30:70, 40:90] = 220
    masks = segmenter.predict(image, boxes=[[40, 30, 89, 69]])
    inside = masks[0, 30:70, 40:90].mean()
    assert masks.shape == (1, 100, 120) and inside > 0.5


def test_cli_predict_writes_a_mask_per_prompt_and_an_overlay(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(picture(48, 80, 1)).save(images / "a.png")
    Image.fromarray(picture(40, 40, 2)).save(images / "b.png")
    (tmp_path / "prompts.json").write_text(
        json.dumps({"a.png": {"boxes": BOXES[:2]}, "b.png": {"points": [[10, 12], [30, 30]], "point_labels": [1, 0]}})
    )
    out = tmp_path / "out"
    code = main(
        ["predict", "--model", "convlora-tiny", "--images", str(images), "--prompts", str(tmp_path / "prompts.json"),
         "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_0.png", "a_1.png", "b_0.png"]
    assert np.asarray(Image.open(out / "masks" / "a_1.png")).shape == (48, 80)
    assert np.asarray(Image.open(out / "overlays" / "a.png")).shape == (48, 80, 3)
    record = json.loads((out / "predictions.json").read_text())
    assert [r["prompts"] for r in record["images"]] == [2, 1]


def test_cli_predict_names_a_prompted_image_missing_from_the_folder(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(picture()).save(images / "a.png")
    (tmp_path / "p.json").write_text(json.dumps({"zebra.png": {"boxes": [[0, 0, 5, 5]]}}))
    code = main(["predict", "--model", "convlora-tiny", "--images", str(images), "--prompts",
                 str(tmp_path / "p.json"), "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "zebra.png" in capsys.readouterr().err


# --- prompted training -------------------------------------------------------------------------------------------


def blob_batch(count: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright rectangles on dark noise, and their labels (with a padded, ignored strip)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, size, size, generator=generator) * 0.2 - 1.0
    labels = torch.zeros(count, size, size, dtype=torch.long)
    for i in range(count):
        top, left = 8 + 10 * i, 6 + 12 * i
        images[i, :, top : top + 20, left : left + 24] += 2.5
        labels[i, top : top + 20, left : left + 24] = 1
        images[i, :, 4:10, 48:56] += 2.5
        labels[i, 4:10, 48:56] = 1
    labels[:, :, 60:] = 255
    return images, labels


def decoder_model():
    task = TaskInfo("binary", 2, ["background", "object"], 64, "random", "decoder")
    model = build_task_model(random_sam(tiny_sam_config()), task, freeze_iou_head=False)
    return model


def test_prompted_step_runs_the_encoder_once_for_every_prompt_of_the_batch():
    model = decoder_model()
    calls = count_encoder_calls(model)
    out = PromptedStep(model, PromptConfig(kind="box_point", correction_rounds=2))(*blob_batch())
    assert calls[0] == 1
    assert out["objects"].item() == 4 and out["skipped"].item() == 0


def test_prompted_loss_decreases_over_a_few_steps():
    torch.manual_seed(0)
    model = decoder_model()
    prepare_prompted_model(model, PromptConfig(kind="box"))
    step = PromptedStep(model, PromptConfig(kind="box", box_jitter=0.05)).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    images, labels = blob_batch()
    losses = []
    for index in range(25):
        out = step(images, labels, step=index % 3)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["task"].item())
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


def test_single_point_steps_use_three_masks_and_train_the_iou_head(monkeypatch):
    model = decoder_model()
    prepare_prompted_model(model, PromptConfig(kind="point"))
    flags = []
    original = prompted.decode_prompts

    def spy(*args, **kwargs):
        flags.append((kwargs["multimask"], kwargs["mask_inputs"] is not None, kwargs["points"].shape[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(prompted, "decode_prompts", spy)
    out = PromptedStep(model, PromptConfig(kind="point", correction_rounds=1))(*blob_batch())
    out["loss"].backward()
    assert flags == [(True, False, 1), (False, True, 2)]
    head = find_sam(model).mask_decoder.iou_prediction_head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_prompt_encoder_is_frozen_by_default_and_trainable_on_request():
    task = TaskInfo("binary", 2, ["background", "object"], 64, "random", "full")
    model = build_task_model(random_sam(tiny_sam_config()), task)
    frozen = prepare_prompted_model(model, PromptConfig(kind="box"))
    assert frozen and not any(p.requires_grad for p in find_sam(model).prompt_encoder.parameters())
    assert all(p.requires_grad for p in find_sam(model).mask_decoder.iou_prediction_head.parameters())
    model = build_task_model(random_sam(tiny_sam_config()), task)
    assert prepare_prompted_model(model, PromptConfig(kind="box", train_prompt_encoder=True)) == []
    assert all(p.requires_grad for p in find_sam(model).prompt_encoder.parameters())
    with pytest.raises(ValueError, match="needs method 'full'"):
        prepare_prompted_model(decoder_model(), PromptConfig(kind="box", train_prompt_encoder=True))


def test_prompted_preparation_trains_only_the_peft_copy_of_the_decoder():
    task = TaskInfo("binary", 2, ["background", "object"], 64, "random", "conv_lora")
    model = build_task_model(random_sam(tiny_sam_config()), task, ConvLoraConfig(r=2, num_experts=2))
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    prepare_prompted_model(model, PromptConfig(kind="point"))
    added = {n for n, p in model.named_parameters() if p.requires_grad} - before
    assert added and all("modules_to_save.default" in n for n in added)
    assert any("iou_prediction_head" in n for n in added)


def test_images_without_objects_are_skipped_and_counted():
    images, labels = blob_batch(3)
    labels[1] = 0
    out = PromptedStep(decoder_model(), PromptConfig(kind="mixed"))(images, labels)
    assert out["skipped"].item() == 1 and out["objects"].item() == 4
    empty = PromptedStep(decoder_model(), PromptConfig(kind="box"))(images, torch.zeros_like(labels))
    assert empty["skipped"].item() == 3 and empty["loss"].item() == 0.0


def test_conv_lora_prompted_step_returns_the_moe_aux_loss_from_forward():
    model = apply_conv_lora(random_sam(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2)).train()
    out = PromptedStep(model, PromptConfig(kind="box"))(*blob_batch())
    assert out["aux"].item() > 0
    out["loss"].backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_encode_images_gives_the_embeddings_the_model_uses():
    model = random_sam(tiny_sam_config())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.get_image_embeddings(images)
        assert torch.allclose(encode_images(model, images)["image_embeddings"], expected)


class _Labelled:
    """A minimal labelled dataset in memory (the interface evaluate_prompted reads)."""

    def __init__(self, images, masks, image_size=64):
        self.images, self.masks, self.image_size = images, masks, image_size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"pixel_values": preprocess(self.images[index], self.image_size)[0]}

    def original_mask(self, index):
        return self.masks[index]

    def resize_info(self, index):
        return preprocess(self.images[index], self.image_size)[1]


def test_prompted_evaluation_uses_the_same_prompts_for_every_model(monkeypatch):
    images = [picture(50, 70, i) for i in range(3)]
    masks = [np.zeros((50, 70), np.int64) for _ in range(3)]
    for i, mask in enumerate(masks):
        mask[5 + i : 30, 10:40] = 1
    masks[2][:] = 0  # an image without objects
    seen = []
    original = evaluation_prompted.predict_prompts

    def spy(model, pixel_values, info, prompts, **kwargs):
        seen.append(prompts.points.copy())
        return original(model, pixel_values, info, prompts, **kwargs)

    monkeypatch.setattr(evaluation_prompted, "predict_prompts", spy)
    dataset = _Labelled(images, masks)
    config = PromptConfig(kind="point", num_negative=1, seed=3)
    first = evaluate_prompted(random_sam(tiny_sam_config(), seed=0), dataset, config)
    second = evaluate_prompted(random_sam(tiny_sam_config(), seed=1), dataset, config)
    assert first["objects"] == 2 and first["skipped_images"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(seen[:2], seen[2:], strict=True))
    assert 0.0 <= first["object_iou"] <= 1.0 and 0.0 <= second["object_dice"] <= 1.0
    assert 0.0 <= first["iou"] <= 1.0  # the task's metrics, of the union of the prompted masks


def test_prompted_masks_become_the_task_prediction_per_class():
    logits = torch.tensor([[[5.0, -5.0, -1.0]], [[2.0, 3.0, -2.0]]])  # two objects, (n, 1, 3)
    binary = evaluation_prompted._image_logits(logits, np.array([1, 1]), "binary", 2)
    assert binary.tolist() == [[[[5.0, 3.0, -1.0]]]]
    classes = evaluation_prompted._image_logits(logits, np.array([2, 1]), "multiclass", 3)
    assert classes.argmax(dim=1).tolist() == [[[2, 1, 0]]]


def test_prompted_training_beats_the_base_models_prompted_iou_on_generated_polyps(tmp_path):
    from convlora.data import SegmentationDataset, check_dataset
    from convlora.synthetic import write_dataset

    report = check_dataset(write_dataset("polyp", tmp_path / "polyp", train=12, val=1, test=8, size=128, seed=0))
    train = SegmentationDataset.from_report(report, "train", image_size=128)
    test = SegmentationDataset.from_report(report, "test", image_size=128)
    config = PromptConfig(kind="box")
    base_scores = evaluate_prompted(load_sam("convlora-tiny"), test, config)
    task = TaskInfo("binary", 2, ["background", "polyp"], 128, "convlora-tiny", "decoder")
    model = build_task_model(load_sam("convlora-tiny"), task, freeze_iou_head=False)
    prepare_prompted_model(model, config)
    step = PromptedStep(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    order = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = [train[int(i)] for i in torch.randint(len(train), (4,), generator=order)]
        out = step(torch.stack([b["pixel_values"] for b in batch]), torch.stack([b["labels"] for b in batch]))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    tuned_scores = evaluate_prompted(model, test, config)
    assert tuned_scores["objects"] == base_scores["objects"] > 0
    assert tuned_scores["object_iou"] > base_scores["object_iou"] + 0.1


def test_train_config_takes_a_prompt_kind_and_validated_nested_settings():
    from convlora.training.config import load_config

    config = load_config(overrides=["--data", "d", "--prompt", "box", "--prompting.correction_rounds", "2"])
    assert config.prompt_config() == PromptConfig(kind="box", correction_rounds=2)
    assert load_config(overrides=["--data", "d"]).prompt_config().kind == "none"
    with pytest.raises(ValueError, match="prompting: box_jitter"):
        load_config(overrides=["--data", "d", "--prompt", "box", "--prompting.box_jitter", "3"])
    with pytest.raises(ValueError, match="need a prompt kind"):
        load_config(overrides=["--data", "d", "--prompting.max_objects", "3"])
    with pytest.raises(ValueError, match="prompt must be one of"):
        load_config(overrides=["--data", "d", "--prompt", "lasso"])


def test_cli_evaluate_scores_model_and_base_under_the_same_prompts(adapter_dir, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(2):
        Image.fromarray(picture(48, 64, i)).save(data / "images" / f"{i}.png")
        mask = np.zeros((48, 64), np.uint8)
        mask[5 + i : 30, 8:40] = 255
        Image.fromarray(mask).save(data / "masks" / f"{i}.png")
    out = tmp_path / "scores.json"
    code = main(["evaluate", "--model", str(adapter_dir), "--data", str(data), "--prompt", "box", "--compare-base",
                 "--output", str(out)])  # fmt: skip
    assert code == 0
    scores = json.loads(out.read_text())
    assert scores["model"]["objects"] == scores["base"]["objects"] == 2
    assert 0.0 <= scores["base"]["object_iou"] <= 1.0


def test_prompted_steps_repeat_their_prompts_under_the_same_torch_seed():
    images, labels = blob_batch()
    step = PromptedStep(decoder_model(), PromptConfig(kind="mixed", num_negative=2, correction_rounds=1))
    torch.manual_seed(5)
    first = step(images, labels)
    torch.manual_seed(5)
    again = step(images, labels)
    assert torch.equal(first["loss"], again["loss"])


def test_sam_hq_answers_prompts_with_one_encoder_call():
    from transformers import SamHQConfig

    parts = {
        key: {k: v for k, v in value.items() if k != "model_type"}
        for key, value in tiny_sam_config().to_dict().items()
        if key in ("vision_config", "prompt_encoder_config", "mask_decoder_config")
    }
    parts["mask_decoder_config"]["vit_dim"] = 32  # the HQ decoder reads early encoder features of this width
    segmenter = Segmenter(random_sam(SamHQConfig(**parts)), base_task(64, "random-hq"))
    calls = count_encoder_calls(segmenter.model)
    assert segmenter.predict(picture(), boxes=BOXES).shape == (3, 48, 80)
    assert calls[0] == 1


@pytest.mark.parametrize("method", ["decoder", "conv_lora", "lora", "full"])
def test_every_method_trains_prompted(method):
    task = TaskInfo("binary", 2, ["background", "object"], 64, "random", method)
    adapter = ConvLoraConfig(r=2, num_experts=2) if method in ("conv_lora", "lora") else None
    model = build_task_model(random_sam(tiny_sam_config()), task, adapter, freeze_iou_head=False).train()
    prepare_prompted_model(model, PromptConfig(kind="box_point"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = PromptedStep(model, PromptConfig(kind="box_point"))(*blob_batch())
    out["loss"].backward()
    decoder = [p for n, p in trainable.items() if "mask_decoder" in n]
    encoder = [p for n, p in trainable.items() if "vision_encoder" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder)
    assert (method == "decoder") == (not encoder)
    assert not encoder or any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
    assert not any("prompt_encoder" in n for n in trainable)


def test_cli_predict_reads_a_coco_file_as_box_prompts(tmp_path):
    from convlora.data import write_coco_boxes

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(picture(48, 80, 1)).save(images / "a.png")
    coco = write_coco_boxes(tmp_path / "coco.json", {"a.png": BOXES}, {"a.png": (48, 80)})
    out = tmp_path / "out"
    assert main(["predict", "--model", "convlora-tiny", "--images", str(images), "--prompts", str(coco),
                 "--output", str(out), "--no-overlays"]) == 0  # fmt: skip
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_0.png", "a_1.png", "a_2.png"]
    assert not (out / "overlays").exists() or not any((out / "overlays").iterdir())


@pytest.mark.slow
def test_the_engine_trains_with_box_prompts_and_the_result_beats_the_base_under_the_same_boxes(tmp_path):
    from convlora import evaluate, load_config, train
    from convlora.artifact import TaskInfo as SavedTask
    from convlora.synthetic import write_dataset

    data = write_dataset("polyp", tmp_path / "polyp", train=12, val=2, test=8, size=128, seed=0)
    config = load_config(
        data=str(data), model="convlora-tiny", method="decoder", prompt="box", output_dir=str(tmp_path / "run"),
        epochs=10, batch_size=4, lr=3e-4, metric="object_iou", overlay_samples=0,
    )  # fmt: skip
    result = train(config, show_progress=False)
    assert result.metric == "object_iou" and result.steps == 30
    assert SavedTask.read(result.adapter_dir).prompt == "box"
    both = evaluate(result.adapter_dir, data, prompt="box", compare_base=True)
    assert both["model"]["object_iou"] == pytest.approx(result.test_metrics["object_iou"], abs=1e-6)
    assert both["model"]["object_iou"] > both["base"]["object_iou"] + 0.1
