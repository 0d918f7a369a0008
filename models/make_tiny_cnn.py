#!/usr/bin/env python3
"""Write tiny_cnn.json (the graph) and tiny_cnn.npz (float32 weights) beside this script.

A small CNN on a 3x32x32 input, weights drawn from a fixed seed (He-normal), so the files are the same
bytes on every run: conv 3x3 -> max pool -> depthwise 3x3 -> conv 1x1 -> conv 3x3 + residual add ->
average pool -> dense -> softmax. The format is described in docs/models.md; `deploy push --model
models/tiny_cnn.json` pushes it, and the smoke runs it on every device from the pulled binaries.

    python3 models/make_tiny_cnn.py [OUT_DIR]
"""

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

SEED = 20261124
NAME = "tiny_cnn"


def weights(rng):
    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bias(n):
        return (rng.standard_normal(n) * 0.05).astype(np.float32)

    return {
        "conv1.weight": he((8, 3, 3, 3), 27), "conv1.bias": bias(8),
        "dw.weight": he((8, 1, 3, 3), 9), "dw.bias": bias(8),
        "pw.weight": he((16, 8, 1, 1), 8), "pw.bias": bias(16),
        "conv3.weight": he((16, 16, 3, 3), 144), "conv3.bias": bias(16),
        "fc.weight": he((256, 10), 256), "fc.bias": bias(10),
    }


GRAPH = {
    "format": "deployer-cnn/1",
    "name": NAME,
    "about": "a tiny CNN with weights from a fixed seed (models/make_tiny_cnn.py); not trained",
    "weights": NAME + ".npz",
    "input": {"name": "image", "shape": [3, 32, 32], "seed": SEED},
    "output": "probs",
    "tolerance": 1.0e-4,
    "nodes": [
        {"name": "conv1", "op": "conv2d", "inputs": ["image"], "weight": "conv1.weight", "bias": "conv1.bias",
         "stride": 1, "pad": 1, "activation": "relu"},
        {"name": "pool1", "op": "max_pool", "inputs": ["conv1"], "k": 2, "stride": 2},
        {"name": "dw", "op": "depthwise_conv2d", "inputs": ["pool1"], "weight": "dw.weight", "bias": "dw.bias",
         "stride": 1, "pad": 1, "activation": "relu6"},
        {"name": "pw", "op": "conv2d", "inputs": ["dw"], "weight": "pw.weight", "bias": "pw.bias",
         "activation": "relu"},
        {"name": "conv3", "op": "conv2d", "inputs": ["pw"], "weight": "conv3.weight", "bias": "conv3.bias",
         "stride": 1, "pad": 1},
        {"name": "res", "op": "add", "inputs": ["pw", "conv3"], "activation": "relu"},
        {"name": "pool2", "op": "avg_pool", "inputs": ["res"], "k": 4, "stride": 4},
        {"name": "fc", "op": "dense", "inputs": ["pool2"], "weight": "fc.weight", "bias": "fc.bias"},
        {"name": "probs", "op": "softmax", "inputs": ["fc"]},
    ],
}


def npz_bytes(arrays):
    """An .npz numpy reads, with fixed zip timestamps (np.savez stamps the current time)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), data.getvalue())
    return out.getvalue()


def main(argv):
    folder = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (NAME + ".npz")).write_bytes(npz_bytes(weights(np.random.default_rng(SEED))))
    (folder / (NAME + ".json")).write_text(json.dumps(GRAPH, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
