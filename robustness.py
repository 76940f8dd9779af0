"""Robustness to acquisition shift: the held-out Dice of a trained model on clean and perturbed test images.

    python robustness.py --checkpoint OUT/best_unet.pth --data DIR [--split OUT/split.json]

Each test image (the run's ``split.json``, written next to its checkpoint) is scored clean and under each
perturbation a different camera or setting would bring: brightness and contrast +-20 %, hue shifted by +-0.05 of a
turn (HSV), a Gaussian blur of sigma 1 px, and JPEG compression at quality 50. The table gives each one's mean Dice
and its loss against the clean score. Scoring goes through the one inference path (``inference.predict_image``) with
the checkpoint's post-processing and mirroring. Colour photographs only (the hue shift needs three channels).
"""
from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np

import datasets
from checkpoint import load_checkpoint, preprocessing_of
from errors import MedSegError
from fileio import write_json_atomic
from inference import keep_largest, largest_classes, predict_image, probs_to_labels
from metrics import per_case_scores
from options import Parser
from preprocess import class_mask
from runtime import resolve_precision, select_device

log = logging.getLogger("robustness")


def _hue(image: np.ndarray, shift: float) -> np.ndarray:
    import torch

    from augment import _hsv_to_rgb, _rgb_to_hsv

    x = torch.from_numpy(np.moveaxis(image / 255.0, -1, 0)[None].astype(np.float32))
    h, s, v = _rgb_to_hsv(x)
    return np.moveaxis(_hsv_to_rgb((h + shift) % 1.0, s, v)[0].numpy(), 0, -1) * 255.0


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))


#: name -> function of an (H, W, 3) float image in 0..255
PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "clean": lambda x: x,
    "brightness +20%": lambda x: np.clip(x * 1.2, 0, 255),
    "brightness -20%": lambda x: x * 0.8,
    "contrast +20%": lambda x: np.clip((x - x.mean()) * 1.2 + x.mean(), 0, 255),
    "contrast -20%": lambda x: (x - x.mean()) * 0.8 + x.mean(),
    "hue +0.05": lambda x: _hue(x, 0.05),
    "hue -0.05": lambda x: _hue(x, -0.05),
    "blur sigma 1": lambda x: _blur(x, 1.0),
    "JPEG quality 50": lambda x: _jpeg(x, 50),
}


def robustness(checkpoint: Path, data: Path, split_path: Path) -> dict:
    """Mean test Dice (class mean) of the model under every perturbation, and the loss against clean."""
    device = select_device("auto")
    model, ckpt = load_checkpoint(checkpoint, device)
    prep = preprocessing_of(ckpt, checkpoint)[0]
    largest = largest_classes(prep.class_names, ckpt.get("postprocessing"))
    test = set(json.loads(Path(split_path).read_text(encoding="utf-8"))["test"])
    refs = [r for r in datasets.discover(data).cases if r.case_id in test]
    scores: dict[str, list[float]] = {name: [] for name in PERTURBATIONS}
    precision = resolve_precision("auto", device)
    for ref in refs:
        image, meta = datasets.read_case_image(ref)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise MedSegError(f"{ref.image}: robustness.py perturbs colour photographs (found shape {image.shape})")
        truth = datasets.read_case_mask(ref, meta)
        for name, perturb in PERTURBATIONS.items():
            probs = predict_image(model, perturb(image.astype(np.float32)), meta, prep, device=device, precision=precision)
            pred = keep_largest(probs_to_labels(probs, 0.5, prep.regions), largest, prep.regions)[0]
            dice = [per_case_scores(class_mask(pred, k, prep.regions)[None], _truth(truth, k, prep)[None])["dice"][0]
                    for k in range(1, prep.n_classes + 1)]
            scores[name].append(float(np.mean(dice)))
    clean = float(np.mean(scores["clean"]))
    rows = {name: {"dice": float(np.mean(v)), "loss": clean - float(np.mean(v))} for name, v in scores.items()}
    return {"checkpoint": str(checkpoint), "test_images": len(refs), "rows": rows}


def _truth(mask: np.ndarray, k: int, prep) -> np.ndarray:
    from preprocess import to_classes

    return class_mask(to_classes(mask, prep), k, prep.regions)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="robustness.py", description="Held-out Dice of a trained model on clean and perturbed test images "
               "(research software, not a medical device).")
    p.add_argument("--checkpoint", required=True, help="the trained model (run.py --data writes it)")
    p.add_argument("--data", required=True, help="the dataset folder the model was trained on")
    p.add_argument("--split", default=None, help="the run's split.json (default: split.json beside --checkpoint, "
                   "then in output_figures/)")
    p.add_argument("--output", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ckpt = Path(args.checkpoint)
    split = Path(args.split) if args.split else next((q for q in (ckpt.parent / "split.json",
                                                                  Path("output_figures/split.json")) if q.is_file()), None)
    try:
        if split is None:
            raise MedSegError(f"{ckpt}: no split.json beside it; pass --split (run.py writes it to --output-dir)")
        res = robustness(ckpt, Path(args.data), split)
    except MedSegError as exc:
        print(f"robustness.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'perturbation':18} {'Dice':>7} {'loss':>7}   ({res['test_images']} test images)")
    for name, row in res["rows"].items():
        print(f"{name:18} {row['dice']:7.4f} {row['loss']:+7.4f}")
    if args.output:
        write_json_atomic(Path(args.output), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
