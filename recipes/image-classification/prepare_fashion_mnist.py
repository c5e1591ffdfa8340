"""Turn the offline Fashion-MNIST IDX files into Parquet splits that `hfkd distill` reads with the `parquet` builder.

Usage (from the repository root):

    .venv/bin/python recipes/image-classification/prepare_fashion_mnist.py [OUTPUT_DIR] [--source DIR]

OUTPUT_DIR defaults to `outputs/data/fashion-mnist`; it receives `train.parquet` (60,000 images) and
`test.parquet` (10,000 images). `--source` is the folder holding the gzip IDX files
`{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`, by default `/usr/share/datasets/fashion-mnist` (Debian package
`dataset-fashion-mnist`). Each row has an `image` column (a `datasets.Image` feature: 28x28 grayscale PNG bytes) and a
`label` column (a `datasets.ClassLabel` with the ten class names), the same layout as the Hub data set
`zalando-datasets/fashion_mnist`, which is what a user with network would load instead (`dataset_name:
zalando-datasets/fashion_mnist`, no `data_files`).

IDX format: two zero bytes, a type byte (0x08 = unsigned byte), a byte with the number of dimensions, then one
big-endian uint32 per dimension, then the data in row-major order.
"""

import argparse
import gzip
import io
import os
import struct
import sys

import numpy as np

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
DEFAULT_OUTPUT = os.path.join("outputs", "data", "fashion-mnist")
SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzip) IDX file of unsigned bytes into an array of the shape it declares."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()}).")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values.")
    return data.reshape(shape)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def build_split(source: str, prefix: str):
    import datasets

    images = read_idx(os.path.join(source, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(source, f"{prefix}-labels-idx1-ubyte.gz"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{prefix}: unexpected shapes images={images.shape} labels={labels.shape}.")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    rows = {
        "image": [{"bytes": png_bytes(img), "path": None} for img in images],
        "label": labels.astype(np.int64).tolist(),
    }
    return datasets.Dataset.from_dict(rows, features=features)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", nargs="?", default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument(
        "--source", default=DEFAULT_SOURCE, help=f"folder of the IDX files (default: {DEFAULT_SOURCE})"
    )
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    for split, prefix in SPLITS.items():
        dataset = build_split(args.source, prefix)
        path = os.path.join(args.output_dir, f"{split}.parquet")
        dataset.to_parquet(path)
        counts = np.bincount(dataset["label"], minlength=len(CLASS_NAMES))
        print(f"{path}: {len(dataset)} images, per class {counts.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
