"""Conv-LoRA on SAM with plain PyTorch and Accelerate: the library's API in one sitting.

What it shows, top to bottom: a `torch.utils.data.Dataset` of image/mask files prepared with SAM's own
preprocessing, `apply_conv_lora(base, ConvLoraConfig(...))`, an Accelerate loop (AdamW and transformers'
linear warmup schedule, as accelerate's examples/nlp_example.py) on prompt-free masks with Dice + BCE plus the
experts' load-balancing loss `moe_aux_loss(model)`, IoU on the validation split, `save_pretrained`, reloading
with stock `PeftModel.from_pretrained` and `merge_and_unload()`, each checked to give the trained outputs.

With no arguments it writes synthetic polyps to OUTPUT/data and fine-tunes the embedded 128-px base
`convlora-tiny`: offline, well under a minute on a 2-core CPU. With --data-dir it reads DATA/train and DATA/val,
each holding images/ and masks/ matched by file stem (binary masks, 0/1 or 0/255).

    python examples/api_accelerate.py                            # synthetic polyps, convlora-tiny
    python examples/api_accelerate.py --data-dir DATA --model facebook/sam-vit-base --lr 1e-4 --batch-size 4 --epochs 30
    accelerate launch examples/api_accelerate.py --data-dir DATA --model facebook/sam-vit-base --mixed_precision bf16

Outputs: OUTPUT/adapter (the PEFT adapter) and, without --data-dir, OUTPUT/data. The script refuses an
existing non-empty --output-dir that it did not write.
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
from transformers import get_linear_schedule_with_warmup

import convlora  # importing convlora registers Conv-LoRA as a PEFT method
from convlora import ConvLoraConfig, apply_conv_lora, moe_aux_loss
from convlora._io import claim_folder
from convlora.models import family_of
from convlora.models.processing import IGNORE_INDEX, InputFormat, preprocess, preprocess_mask
from convlora.synthetic import write_dataset
from convlora.training.losses import BCEDiceLoss

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class MaskFolder(Dataset):
    """``split/images/*`` with ``split/masks/*`` of the same stem, as SAM inputs and {0, 1, 255} labels."""

    def __init__(self, split_dir: Path, input_size: int, input_format: InputFormat) -> None:
        if not (split_dir / "images").is_dir() or not (split_dir / "masks").is_dir():
            raise ValueError(f"{split_dir} needs images/ and masks/ (expected DATA/train and DATA/val laid out so)")
        masks = {path.stem: path for path in (split_dir / "masks").iterdir()}
        images = sorted(p for p in (split_dir / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.pairs = [(image, masks[image.stem]) for image in images if image.stem in masks]
        if not self.pairs:
            raise ValueError(f"{split_dir}: no image in images/ has a mask with the same stem in masks/")
        self.input_size, self.input_format = input_size, input_format

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = np.asarray(Image.open(image_path).convert("RGB"))  # uint8 (h, w, 3)
        mask = np.asarray(Image.open(mask_path).convert("L"))
        mask = (mask > (127 if mask.max() > 1 else 0)).astype(np.uint8)  # 0/255 (JPEG too) or 0/1 -> 0/1
        # SAM's preprocessing: longest side to the input size, normalise, pad bottom/right; the mask is fitted
        # the same way with its padding labelled IGNORE_INDEX, which the loss and the IoU skip.
        pixel_values, _ = preprocess(image, self.input_size, self.input_format)  # (3, S, S)
        labels = preprocess_mask(mask, self.input_size, self.input_format.pad_to_square)  # (S, S)
        return {"pixel_values": pixel_values, "labels": labels}


def get_dataloaders(data_dir: Path, base: torch.nn.Module, batch_size: int, seed: int) -> tuple[DataLoader, ...]:
    family = family_of(base)  # SAM, SAM-HQ, SAM 2, ...: the input size and normalisation of its own processor
    size, input_format = family.image_size(base), family.input_format
    train = MaskFolder(data_dir / "train", size, input_format)
    val = MaskFolder(data_dir / "val", size, input_format)
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(val, batch_size=batch_size),
    )


def mask_logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Prompt-free masks: SAM without prompts gives one mask per image, upsampled to the input size."""
    logits = model(pixel_values=pixel_values, multimask_output=False).pred_masks[:, 0]  # (b, 1, S/4, S/4)
    return F.interpolate(logits.float(), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate_iou(model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator) -> float:
    """Foreground IoU over the whole split (pixels summed over every image; padding ignored)."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)
    for batch in dataloader:
        predicted = mask_logits(model, batch["pixel_values"])[:, 0] > 0  # (b, S, S)
        target, valid = batch["labels"] == 1, batch["labels"] != IGNORE_INDEX
        counts = torch.stack([(predicted & target).flatten(1).sum(1), ((predicted | target) & valid).flatten(1).sum(1)])
        totals += accelerator.gather_for_metrics(counts.T).sum(0)  # (b, 2) per image, without padded duplicates
    return (totals[0] / totals[1].clamp_min(1)).item()


def training_function(config: dict, args: argparse.Namespace) -> None:
    # Top-k routing leaves some experts unused in a step: DDP must be told so.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, kwargs_handlers=[ddp])
    set_seed(config["seed"])
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        claim_folder(out, "run", option="--output-dir")  # refuses a non-empty folder this script did not write
        if args.data_dir is None:
            write_dataset("polyp", out / "data", train=config["train_images"], val=16, test=0, seed=config["seed"])
    accelerator.wait_for_everyone()
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"

    base = convlora.load_sam(args.model)
    train_dataloader, eval_dataloader = get_dataloaders(data_dir, base, config["batch_size"], config["seed"])
    model = apply_conv_lora(base, ConvLoraConfig(r=config["r"], num_experts=config["num_experts"]))
    if accelerator.is_main_process:
        model.print_trainable_parameters()  # the adapters plus the mask decoder (modules_to_save)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"])
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=len(train_dataloader), num_training_steps=len(train_dataloader) * config["epochs"]
    )
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    loss_fn = BCEDiceLoss()  # binary cross-entropy + soft Dice over the labelled pixels
    accelerator.print(f"val IoU before fine-tuning: {evaluate_iou(model, eval_dataloader, accelerator):.4f}")

    losses = []
    for epoch in range(config["epochs"]):
        model.train()
        total = torch.zeros((), device=accelerator.device)
        for batch in train_dataloader:
            logits = mask_logits(model, batch["pixel_values"])  # (b, 1, S, S)
            loss = loss_fn(logits, batch["labels"]) + moe_aux_loss(model)
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            total += loss.detach()
        losses.append(accelerator.reduce(total, "mean").item() / len(train_dataloader))
        accelerator.print(f"epoch {epoch + 1}/{config['epochs']}: loss {losses[-1]:.4f}")
    iou = evaluate_iou(model, eval_dataloader, accelerator)
    accelerator.print(f"val IoU after fine-tuning: {iou:.4f}")
    if not losses[-1] < losses[0]:
        raise RuntimeError(f"the training loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")

    pixel_values = next(iter(eval_dataloader))["pixel_values"][:2].float()  # every process takes part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()  # float32, as it will be reloaded
        trained.save_pretrained(out / "adapter")  # adapter_config.json + adapter_model.safetensors
        with torch.no_grad():
            expected = mask_logits(trained, pixel_values)
            # Stock PEFT reloads it onto a fresh base: nothing convlora-specific but the import above.
            reloaded = PeftModel.from_pretrained(convlora.load_sam(args.model), out / "adapter")
            reloaded = reloaded.to(accelerator.device).eval()
            reload_diff = (mask_logits(reloaded, pixel_values) - expected).abs().max().item()
            merged = reloaded.merge_and_unload()  # SamModel with the LoRA update folded into the weights
            merge_diff = (mask_logits(merged, pixel_values) - expected).abs().max().item()
        print(f"reloaded adapter: max |logit difference| {reload_diff:.2e}")
        print(f"merge_and_unload: max |logit difference| {merge_diff:.2e}")
        if reload_diff > 1e-4 or merge_diff > 1e-3:
            raise RuntimeError(f"outputs changed: reload {reload_diff:.2e}, merge {merge_diff:.2e}")
        print(f"adapter saved to {out / 'adapter'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convlora-tiny", help="SAM checkpoint: embedded name, folder or hub id")
    parser.add_argument("--data-dir", default=None, help="DATA/{train,val}/{images,masks}; synthetic if unset")
    parser.add_argument("--output-dir", default="runs/api_accelerate", help="adapter (and synthetic data) go here")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-images", type=int, default=64, help="size of the synthetic training split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is available")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the script checks that the loss falls)")
    config = {
        "lr": args.lr,
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "train_images": args.train_images,
        "r": 4,
        "num_experts": 4,
    }
    training_function(config, args)


if __name__ == "__main__":
    main()
