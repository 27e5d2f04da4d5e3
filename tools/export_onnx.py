#!/usr/bin/env python
"""Export a trained (student) segmentor to ONNX with dynamic batch, height and width, then check it.

  python tools/export_onnx.py -p exp.voc/.../epoch-34.pth -o student.onnx [--images DATA/toy/pascal_voc/val/image]
  python tools/export_onnx.py --network resnet18 --num_classes 21 -o r18.onnx      # random weights

Input `image`: float32 (B,3,H,W), normalised with the training mean/std; output `logits` (B,C,H,W).
The check runs onnxruntime (CPU) and PyTorch on the same inputs -- the given images (up to --max_images, at
their own sizes) and random inputs of each --sizes -- prints the largest absolute logit difference and
exits with status 1 when it exceeds --tol (default 1e-4).
"""
from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import torch


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '375x500' -> (375, 500) (height x width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
        if len(parts) in (1, 2) and min(parts) > 0:
            return (parts[0], parts[-1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")


def export(model: torch.nn.Module, path: str, opset: int = 17, sample_size=(256, 256)) -> None:
    """torch.onnx.export (TorchScript exporter: needs no onnxscript) with dynamic batch/height/width axes."""
    model = model.eval().cpu()
    dummy = torch.zeros(1, 3, *sample_size)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (dummy,), path, input_names=["image"], output_names=["logits"], opset_version=opset,
                          dynamic_axes={"image": axes, "logits": axes}, do_constant_folding=True, dynamo=False)
    import onnx
    onnx.checker.check_model(onnx.load(path))


def compare(model: torch.nn.Module, path: str, inputs: list[torch.Tensor]) -> list[dict]:
    """Run ONNX Runtime and PyTorch on each (1,3,H,W) input: max |difference| of logits and argmax agreement."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rows = []
    with torch.no_grad():
        for x in inputs:
            ref = model(x).numpy()
            out = session.run(["logits"], {"image": x.numpy()})[0]
            if out.shape != ref.shape:
                raise RuntimeError(f"ONNX output shape {out.shape} != PyTorch {ref.shape} for input {tuple(x.shape)}")
            rows.append(dict(size=tuple(x.shape[2:]), max_abs_diff=float(np.abs(out - ref).max()),
                             max_abs_logit=float(np.abs(ref).max()),
                             argmax_agree=float((out.argmax(1) == ref.argmax(1)).mean())))
    return rows


def load_images(images, max_images, mean, std) -> list[torch.Tensor]:
    """The first max_images image files among `images` (files / folders), normalised, as (1,3,H,W) tensors."""
    from pathlib import Path

    from furnace.inference import image_tensor
    files = []
    for item in map(Path, images):
        files += sorted(p for p in item.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}) if item.is_dir() \
            else [item]
    if not files:
        raise FileNotFoundError(f"no images in {images}")
    return [image_tensor(f, mean, std) for f in files[:max_images]]  # furnace.inference's normalisation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--checkpoint", help="training checkpoint (its deployable network is exported)")
    src.add_argument("--network", help="export an untrained preset instead, e.g. resnet18, mobilenet_v2")
    p.add_argument("--num_classes", type=int, default=21, help="with --network")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--images", nargs="+", help="image files / folders to check on (e.g. the toy val images)")
    p.add_argument("--max_images", type=int, default=2)
    p.add_argument("--sizes", type=parse_size, nargs="*", default=[(512, 512), (375, 500)],
                   help="random check inputs, HxW (two sizes check the dynamic axes)")
    p.add_argument("--tol", type=float, default=1e-4, help="largest allowed |ONNX - PyTorch| logit difference")
    args = p.parse_args(argv)

    from furnace.data import IMAGENET_MEAN, IMAGENET_STD
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if args.checkpoint:
        from furnace.inference import Segmenter
        seg = Segmenter.from_checkpoint(args.checkpoint, device="cpu")  # the network and normalisation predict.py uses
        model, mean, std = seg.model, seg.mean, seg.std
    else:
        from furnace.models import build_segmentor
        torch.manual_seed(0)
        model = build_segmentor(args.network, args.num_classes).eval()
    export(model, args.output, args.opset)
    print(f"wrote {args.output} ({getattr(model, 'network', type(model).__name__)}, {model.num_classes} classes, "
          f"opset {args.opset}, dynamic batch/height/width)")

    inputs = load_images(args.images, args.max_images, mean, std) if args.images else []
    g = torch.Generator().manual_seed(0)
    inputs += [torch.randn(1, 3, h, w, generator=g) for h, w in args.sizes]
    if not inputs:
        raise SystemExit("nothing to check: give --images or --sizes")
    rows = compare(model, args.output, inputs)
    print("| input HxW | max abs diff | max abs logit | argmax agreement |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size'][0]}x{r['size'][1]} | {r['max_abs_diff']:.2e} | {r['max_abs_logit']:.2f} | "
              f"{100 * r['argmax_agree']:.3f}% |")
    worst = max(r["max_abs_diff"] for r in rows)
    ok = worst <= args.tol
    print(f"largest difference {worst:.2e} {'<=' if ok else '>'} tolerance {args.tol:.0e}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
