"""A consumer of revisit's published ONNX models that knows nothing of revisit.

It imports only the standard library, numpy and onnxruntime: it reads
``latest.json``, checks the model file's sha256, loads the model with
onnxruntime, prepares a chip from the model's own metadata (band order and
scale) and prints the output as JSON on standard output::

    python consumer.py exports/onnx/latest.json chip.npy [--output embedding]
        [--chip-bands B02,B03,...]

The chip is a ``.npy`` of digital numbers, (bands, H, W) or (N, bands, H, W);
its bands are in the model's order unless ``--chip-bands`` names their order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="latest.json")
    parser.add_argument("chip", type=Path, help=".npy of digital numbers")
    parser.add_argument("--output", default="embedding", help="features or embedding")
    parser.add_argument("--chip-bands", default=None, help="the chip's band order, comma-separated")
    args = parser.parse_args()

    manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
    model_path = args.manifest.parent / manifest["files"][args.output]
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    if digest != manifest["sha256"][args.output]:
        print(f"{model_path.name}: sha256 {digest} does not match latest.json", file=sys.stderr)
        return 2

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    bands = meta["bands"].split(",")
    scale = np.float32(meta["scale"])

    chip = np.load(args.chip, allow_pickle=False)
    if chip.ndim == 3:
        chip = chip[np.newaxis]
    if args.chip_bands:
        order = args.chip_bands.split(",")
        missing = [b for b in bands if b not in order]
        if missing:
            print(f"the chip lacks bands {missing}", file=sys.stderr)
            return 2
        chip = chip[:, [order.index(b) for b in bands]]
    if chip.shape[1] != len(bands):
        print(f"the chip has {chip.shape[1]} bands, the model wants {bands}", file=sys.stderr)
        return 2
    reflectance = np.ascontiguousarray(chip.astype(np.float32) * scale)

    (out,) = session.run(None, {meta["input_name"]: reflectance})
    json.dump(
        {
            "version": manifest["version"],
            "output": meta["output"],
            "shape": list(out.shape),
            "values": out.astype(float).tolist(),
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
