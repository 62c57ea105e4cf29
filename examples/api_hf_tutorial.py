"""Hugging Face's SAM fine-tuning tutorial with box prompts, and Conv-LoRA swapped in.

It follows Niels Rogge's notebook "Fine-tune SAM on a custom dataset" (Transformers-Tutorials): `SamProcessor`
turns each image and its mask's bounding box (jittered by up to 20 px) into `pixel_values` and `input_boxes`,
`model(pixel_values=..., input_boxes=..., multimask_output=False)` predicts one low-resolution mask per box,
and Dice + BCE (monai's `DiceCELoss(sigmoid=True, squared_pred=True)`, written out below) compares it with the
ground truth at that resolution. The one change: `apply_conv_lora` adds Conv-LoRA to the image encoder and
trains the mask decoder alongside, instead of the decoder alone; the prompt encoder stays frozen. It prints the
box-prompted validation IoU before and after, saves the adapter and reloads it with stock PEFT.

With no arguments it writes synthetic polyps to OUTPUT/data and fine-tunes the embedded 128-px base
`convlora-tiny` (its masks are 64x64, not SAM ViT-B's 256x256: sizes are read from the model), offline, well
under a minute on a 2-core CPU. With --data-dir it reads DATA/train and DATA/val, each holding images/ and
masks/ matched by file stem (binary masks, 0/1 or 0/255).

    python examples/api_hf_tutorial.py                           # synthetic polyps, convlora-tiny
    python examples/api_hf_tutorial.py --data-dir DATA --model facebook/sam-vit-base --lr 1e-4 --batch-size 2
    accelerate launch examples/api_hf_tutorial.py --data-dir DATA --model facebook/sam-vit-base --lr 1e-4

Outputs: OUTPUT/adapter and, without --data-dir, OUTPUT/data; a non-empty --output-dir it did not write is refused.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from peft import PeftModel
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import SamImageProcessor, SamProcessor

import convlora  # importing convlora registers Conv-LoRA as a PEFT method
from convlora import ConvLoraConfig, apply_conv_lora, moe_aux_loss
from convlora._io import claim_folder
from convlora.synthetic import write_dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def build_processor(model: torch.nn.Module) -> SamProcessor:
    """transformers' SamProcessor for ``model``, its sizes read from the model's config.

    For a hub checkpoint ``SamProcessor.from_pretrained("facebook/sam-vit-base")`` gives the same processor
    (1024-px input, 256-px masks); the embedded convlora-tiny ships no preprocessor_config.json.
    """
    size = model.config.vision_config.image_size  # the square input: 1024 for SAM ViT-B, 128 for convlora-tiny
    low_res = 4 * model.config.prompt_encoder_config.image_embedding_size  # the predicted masks' side: 256, 64
    image_processor = SamImageProcessor(
        size={"longest_edge": size},
        pad_size={"height": size, "width": size},
        mask_size={"longest_edge": low_res},
        mask_pad_size={"height": low_res, "width": low_res},
    )
    return SamProcessor(image_processor=image_processor)


def bounding_box(mask: np.ndarray, rng: np.random.Generator | None) -> list[float]:
    """``[x0, y0, x1, y1]`` around the mask's pixels, each side moved outwards by up to 20 px when ``rng`` is set."""
    ys, xs = np.nonzero(mask)
    jitter = rng.integers(0, 21, size=4) if rng is not None else np.zeros(4, int)
    x0, y0 = max(0, xs.min() - jitter[0]), max(0, ys.min() - jitter[1])
    x1, y1 = min(mask.shape[1], xs.max() + jitter[2]), min(mask.shape[0], ys.max() + jitter[3])
    return [float(x0), float(y0), float(x1), float(y1)]


def read_mask(path: Path) -> np.ndarray:
    mask = np.asarray(Image.open(path).convert("L"))
    return (mask > (127 if mask.max() > 1 else 0)).astype(np.uint8)  # 0/255 (JPEG too) or 0/1 -> 0/1


class BoxPromptDataset(Dataset):
    """Images with one box prompt each (from the mask) and the mask at the model's low resolution."""

    def __init__(self, split_dir: Path, processor: SamProcessor, jitter_seed: int | None = None) -> None:
        if not (split_dir / "images").is_dir() or not (split_dir / "masks").is_dir():
            raise ValueError(f"{split_dir} needs images/ and masks/ (expected DATA/train and DATA/val laid out so)")
        masks = {path.stem: path for path in (split_dir / "masks").iterdir()}
        images = sorted(p for p in (split_dir / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        pairs = [(image, masks[image.stem]) for image in images if image.stem in masks]
        self.pairs = [(image, mask) for image, mask in pairs if read_mask(mask).any()]  # no object: no box
        if not self.pairs:
            raise ValueError(f"{split_dir}: no image in images/ has a non-empty mask with the same stem in masks/")
        self.processor, self.jitter_seed = processor, jitter_seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image, mask = Image.open(image_path).convert("RGB"), read_mask(mask_path)
        rng = None if self.jitter_seed is None else np.random.default_rng([self.jitter_seed, index])
        inputs = self.processor(
            image, input_boxes=[[bounding_box(mask, rng)]], segmentation_maps=mask, return_tensors="pt"
        )
        # pixel_values (3, S, S), input_boxes (1, 4) in input pixels, labels (m, m) resized and padded like the image
        return {
            "pixel_values": inputs["pixel_values"][0],
            "input_boxes": inputs["input_boxes"][0].float(),
            "labels": inputs["labels"][0].float(),
        }


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice with squared predictions per mask, plus BCE: monai's DiceCELoss of the tutorial."""
    probs = logits.sigmoid()
    intersection = (probs * target).sum(dim=(-2, -1))
    denominator = (probs**2).sum(dim=(-2, -1)) + (target**2).sum(dim=(-2, -1))
    dice = 1.0 - (2.0 * intersection + 1e-5) / (denominator + 1e-5)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def predict(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    outputs = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    return outputs.pred_masks[:, 0, 0].float()  # (b, m, m): one box per image, one mask per box


@torch.no_grad()
def box_iou(model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator) -> float:
    """Foreground IoU of the box-prompted masks over the split, at the masks' resolution."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)
    for batch in dataloader:
        predicted, target = predict(model, batch) > 0, batch["labels"] > 0.5
        counts = torch.stack([(predicted & target).flatten(1).sum(1), (predicted | target).flatten(1).sum(1)])
        totals += accelerator.gather_for_metrics(counts.T).sum(0)
    return (totals[0] / totals[1].clamp_min(1)).item()


def get_dataloaders(
    data_dir: Path, processor: SamProcessor, batch_size: int, seed: int
) -> tuple[DataLoader, DataLoader]:
    train = BoxPromptDataset(data_dir / "train", processor, jitter_seed=seed)
    val = BoxPromptDataset(data_dir / "val", processor)  # tight boxes for evaluation
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(train, batch_size, shuffle=True, generator=generator), DataLoader(val, batch_size)


def training_function(args: argparse.Namespace) -> None:
    # Top-k routing leaves some experts unused in a step: DDP must be told so.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(args.seed)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        claim_folder(out, "run", option="--output-dir")  # refuses a non-empty folder this script did not write
        if args.data_dir is None:
            write_dataset("polyp", out / "data", train=args.train_images, val=16, test=0, seed=args.seed)
    accelerator.wait_for_everyone()
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"

    base = convlora.load_sam(args.model)
    if base.config.model_type != "sam":
        raise ValueError(f"--model {args.model} is a {base.config.model_type} model; SamProcessor takes SAM models")
    train_dataloader, val_dataloader = get_dataloaders(data_dir, build_processor(base), args.batch_size, args.seed)

    model = apply_conv_lora(base, ConvLoraConfig(r=4, num_experts=4))
    # The tutorial's freeze, kept explicit: apply_conv_lora already trains only the adapters and the mask decoder.
    for name, param in model.named_parameters():
        if "prompt_encoder" in name:
            param.requires_grad_(False)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0)
    model, optimizer, train_dataloader, val_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, val_dataloader
    )
    accelerator.print(f"val box IoU before fine-tuning: {box_iou(model, val_dataloader, accelerator):.4f}")

    losses = []
    for epoch in range(args.epochs):
        model.train()
        total = torch.zeros((), device=accelerator.device)
        for batch in train_dataloader:
            loss = dice_bce_loss(predict(model, batch), batch["labels"]) + moe_aux_loss(model)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            total += loss.detach()
        losses.append(accelerator.reduce(total, "mean").item() / len(train_dataloader))
        accelerator.print(f"epoch {epoch + 1}/{args.epochs}: loss {losses[-1]:.4f}")
    accelerator.print(f"val box IoU after fine-tuning: {box_iou(model, val_dataloader, accelerator):.4f}")
    if not losses[-1] < losses[0]:
        raise RuntimeError(f"the training loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")

    batch = next(iter(val_dataloader))  # every process takes part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
        trained.save_pretrained(out / "adapter")  # adapter_config.json + adapter_model.safetensors
        with torch.no_grad():
            # Stock PEFT reloads it onto a fresh base: nothing convlora-specific but the import above.
            reloaded = PeftModel.from_pretrained(convlora.load_sam(args.model), out / "adapter")
            reloaded = reloaded.to(accelerator.device).eval()
            difference = (predict(reloaded, batch) - predict(trained, batch)).abs().max().item()
        print(f"reloaded adapter: max |logit difference| {difference:.2e}")
        if difference > 1e-4:
            raise RuntimeError(f"the reloaded adapter gives other masks (max |logit difference| {difference:.2e})")
        print(f"adapter saved to {out / 'adapter'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convlora-tiny", help="SAM checkpoint: embedded name, folder or hub id")
    parser.add_argument("--data-dir", default=None, help="DATA/{train,val}/{images,masks}; synthetic if unset")
    parser.add_argument("--output-dir", default="runs/api_hf_tutorial", help="adapter (and synthetic data) go here")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=32, help="size of the synthetic training split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the script checks that the loss falls)")
    training_function(args)


if __name__ == "__main__":
    main()
