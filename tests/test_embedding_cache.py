"""The embedding cache: a frozen image encoder runs once per image, and the run trains exactly as without it."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from transformers.models.sam.modeling_sam import SamVisionEncoder

from convlora.artifact.methods import METHODS
from convlora.data import AugmentConfig
from convlora.models import apply_conv_lora, random_sam, tiny_sam2_config, tiny_sam_config
from convlora.training.config import TrainConfig, load_config
from convlora.training.embedding_cache import CACHE_FOLDER, CachePlan, EmbeddingCache, plan_embedding_cache
from convlora.training.engine import train
from convlora.tuner.config import ConvLoraConfig

pytestmark = pytest.mark.slow

TOLERANCE = 1e-6


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """Counts the images SAM's image encoder really runs on (one entry per call)."""
    calls: list[int] = []
    original = SamVisionEncoder.forward

    def counting(self, pixel_values=None, **kwargs):
        calls.append(int(pixel_values.shape[0]))
        return original(self, pixel_values, **kwargs)

    monkeypatch.setattr(SamVisionEncoder, "forward", counting)
    return calls


def run(tmp_path: Path, name: str, polyp_dir: Path, sam_dir: Path, *extra: str) -> dict:
    args = ["--data", str(polyp_dir), "--model", str(sam_dir), "--output_dir", str(tmp_path / name)]
    args += ["--method", "decoder", "--epochs", "3", "--batch_size", "4", "--lr", "3e-3", "--log_every_steps", "1"]
    args += ["--overlay_samples", "0", "--augment.hflip", "0"]
    train(load_config(overrides=args + list(extra)), show_progress=False)
    return json.loads((tmp_path / name / "metrics.json").read_text())


def decoder_weights(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(tmp_path / name / "adapter" / "decoder_model.safetensors")


def assert_same_training(a: dict, b: dict, weights_a: dict, weights_b: dict) -> None:
    assert len(a["history"]) == len(b["history"]) and len(a["train_loss"]) == len(b["train_loss"])
    for ours, theirs in zip(a["history"] + a["train_loss"], b["history"] + b["train_loss"], strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], abs=TOLERANCE), key
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.allclose(weights_a[key], weights_b[key], rtol=0, atol=TOLERANCE), key


def test_a_decoder_run_with_the_cache_trains_as_without_it_and_encodes_each_image_once(
    tmp_path, polyp_dir, tiny_sam_dir, encoded, capsys
):
    plain = run(tmp_path, "plain", polyp_dir, tiny_sam_dir, "--embedding_cache", "off")
    plain_calls = sum(encoded)
    encoded.clear()
    cached = run(tmp_path, "cached", polyp_dir, tiny_sam_dir, "--embedding_cache", "auto")
    out = capsys.readouterr().out
    # 8 training and 4 validation images per epoch, 4 test images at the end (the best model, not cached)
    assert plain_calls == 3 * (8 + 4) + 4
    assert sum(encoded) == 1 + (8 + 4) + 4  # one blank image learns the output layout, then each image once
    assert "embedding cache: 12 images, 0.05 MiB, in memory (training and validation images)" in out
    summary = cached["embedding_cache"]
    assert (summary["mode"], summary["hits"], summary["computed"], summary["images"]) == ("memory", 24, 12, 12)
    assert plain["embedding_cache"] == {"mode": "off", "reason": "embedding cache: off (embedding_cache off)"}
    assert [entry["epoch"] for entry in cached["epoch_seconds"]] == [0, 1, 2]
    assert_same_training(plain, cached, decoder_weights(tmp_path, "plain"), decoder_weights(tmp_path, "cached"))


def test_the_disk_cache_serves_a_resumed_run_and_recomputes_entries_that_do_not_match(
    tmp_path, polyp_dir, tiny_sam_dir, encoded
):
    run(tmp_path, "disk", polyp_dir, tiny_sam_dir, "--embedding_cache", "disk", "--epochs", "1")
    entries = sorted((tmp_path / "disk" / CACHE_FOLDER).glob("*.safetensors"))
    assert len(entries) == 12
    with safe_open(str(entries[0]), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    fingerprint = metadata["model"]
    other_model = dict(metadata, model="0" * 64)  # written for another model
    entries[0].write_bytes(safetensors.torch.save(tensors, metadata=other_model))
    entries[1].write_bytes(b"not a safetensors file")
    encoded.clear()

    resumed = run(tmp_path, "disk", polyp_dir, tiny_sam_dir, "--embedding_cache", "disk", "--resume", "latest")
    summary = resumed["embedding_cache"]
    # epochs 1 and 2: 24 look-ups, the two bad entries recomputed once and then served like the others
    assert (summary["stale"], summary["computed"], summary["hits"]) == (2, 2, 22)
    assert sum(encoded) == 1 + 2 + 4  # layout, the two recomputed images, the test images
    for entry in entries[:2]:
        with safe_open(str(entry), framework="pt") as handle:
            assert handle.metadata()["model"] == fingerprint
    # the same interruption without the cache (the schedule follows the epochs of the first part)
    run(tmp_path, "plain", polyp_dir, tiny_sam_dir, "--embedding_cache", "off", "--epochs", "1")
    plain = run(tmp_path, "plain", polyp_dir, tiny_sam_dir, "--embedding_cache", "off", "--resume", "latest")
    assert_same_training(plain, resumed, decoder_weights(tmp_path, "plain"), decoder_weights(tmp_path, "disk"))


def test_prompted_decoder_training_with_the_cache_trains_as_without_it(tmp_path, polyp_dir, tiny_sam_dir, encoded):
    prompted = ["--prompt", "box", "--epochs", "2"]
    plain = run(tmp_path, "plain", polyp_dir, tiny_sam_dir, *prompted, "--embedding_cache", "off")
    plain_calls = sum(encoded)
    encoded.clear()
    cached = run(tmp_path, "cached", polyp_dir, tiny_sam_dir, *prompted)
    assert plain_calls == 2 * (8 + 4) + 4
    assert sum(encoded) == 1 + (8 + 4) + 4
    assert cached["embedding_cache"]["hits"] == 12
    assert_same_training(plain, cached, decoder_weights(tmp_path, "plain"), decoder_weights(tmp_path, "cached"))


def test_augmentation_keeps_training_images_out_of_the_cache_and_says_why(tmp_path, polyp_dir, tiny_sam_dir, encoded):
    metrics = run(tmp_path, "flips", polyp_dir, tiny_sam_dir, "--augment.hflip", "0.5", "--epochs", "2")
    assert sum(encoded) == 1 + 2 * 8 + 4 + 4  # training images every epoch, validation images once
    summary = metrics["embedding_cache"]
    assert (summary["train_images"], summary["hits"]) == (False, 4)
    assert summary["reason"] == (
        "embedding cache: training images not cached: augmentation changes the encoder's input "
        "(augment.hflip=0.5); set it off to cache them"
    )


def test_the_cache_is_refused_when_the_encoder_trains_or_when_off():
    decoder = METHODS["decoder"].build(random_sam(tiny_sam_config()), None)
    assert plan_embedding_cache(decoder, "auto", AugmentConfig(hflip=0)) == CachePlan(use=True, train=True)
    adapted = apply_conv_lora(random_sam(tiny_sam_config()), ConvLoraConfig(r=2, num_experts=2))
    plan = plan_embedding_cache(adapted, "auto", AugmentConfig(hflip=0))
    assert not plan.use
    assert "parameter tensors of the image encoder train (e.g. vision_encoder.layers." in plan.reason
    jittered = plan_embedding_cache(decoder, "memory", AugmentConfig(hflip=0, scale=(0.8, 1.2), color_jitter=0.1))
    assert "augment.scale=[0.8, 1.2], augment.brightness=0.1" in jittered.reason and jittered.use
    decoder.vision_encoder.layers[0].attn.dropout = 0.1  # SAM's attention reads a float rate
    assert "dropout=0.1" in plan_embedding_cache(decoder, "auto", AugmentConfig(hflip=0)).reason
    assert not plan_embedding_cache(decoder, "off", AugmentConfig(hflip=0)).use


def test_the_config_refuses_an_unknown_cache_mode_and_a_budget_below_one():
    with pytest.raises(ValueError, match=r"embedding_cache must be one of \['auto', 'memory', 'disk', 'off'\]"):
        TrainConfig(data="d", embedding_cache="sometimes")
    with pytest.raises(ValueError, match="embedding_cache_mib must be >= 1, got 0"):
        TrainConfig(data="d", embedding_cache_mib=0)


def tiny_sam_hq_config():
    from transformers import SamHQConfig

    parts = {
        key: {k: v for k, v in value.items() if k != "model_type"}
        for key, value in tiny_sam_config().to_dict().items()
        if key in ("vision_config", "prompt_encoder_config", "mask_decoder_config")
    }
    parts["mask_decoder_config"]["vit_dim"] = 32
    return SamHQConfig(**parts)


FAMILIES = {"sam": (tiny_sam_config, 64), "sam_hq": (tiny_sam_hq_config, 64), "sam2": (tiny_sam2_config, 128)}


@pytest.mark.parametrize("mode", ["memory", "disk"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_outputs_are_the_encoders_own_for_every_family(tmp_path, family, mode):
    make_config, size = FAMILIES[family]
    model = random_sam(make_config(image_size=size) if family == "sam2" else make_config()).requires_grad_(False)
    encoder = model.vision_encoder
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        direct = encoder(images)
    cache = EmbeddingCache(model, mode, train=True, expected_images=3, folder=tmp_path / "cache").attach(size)
    with torch.no_grad(), cache.use("train"):
        first = encoder(images[:2])  # computed
        again = encoder(images[[2, 1, 0]])  # one computed, two served
    assert (cache.hits, cache.computed) == (2, 3)
    assert type(again) is type(direct)
    for name, value in direct.items():
        expected = list(value) if isinstance(value, (list, tuple)) else [value]
        got_first = first[name] if isinstance(first[name], (list, tuple)) else [first[name]]
        got_again = again[name] if isinstance(again[name], (list, tuple)) else [again[name]]
        assert type(again[name]) is type(value), name
        for want, one, other in zip(expected, got_first, got_again, strict=True):
            torch.testing.assert_close(one, want[:2], rtol=0, atol=TOLERANCE)
            torch.testing.assert_close(other, want[[2, 1, 0]], rtol=0, atol=TOLERANCE)
    cache.detach()
    assert "forward" not in encoder.__dict__
