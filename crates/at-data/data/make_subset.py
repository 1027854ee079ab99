"""Writes the embedded Fashion-MNIST subset from Debian's dataset-fashion-mnist.

Stratified and deterministic: the first 1000 training and the first 200 test images of each class,
in file order, written as gzipped IDX files (the format of the originals) into
fashion-mnist-subset/. Run: python3 make_subset.py [/usr/share/datasets/fashion-mnist]
"""

import gzip
import struct
import sys
from pathlib import Path

PER_CLASS = {"train": 1000, "t10k": 200}


def read_idx(path):
    data = gzip.open(path).read()
    rank = data[3]
    dims = struct.unpack(">" + "I" * rank, data[4 : 4 + 4 * rank])
    return dims, data[4 + 4 * rank :]


def write_idx(path, rank, dims, payload):
    header = bytes([0, 0, 8, rank]) + struct.pack(">" + "I" * rank, *dims)
    # mtime=0 keeps the output byte-identical from run to run.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(header + payload)


def main(src):
    out = Path(__file__).parent / "fashion-mnist-subset"
    out.mkdir(exist_ok=True)
    for split, per_class in PER_CLASS.items():
        (n, rows, cols), images = read_idx(Path(src) / f"{split}-images-idx3-ubyte.gz")
        _, labels = read_idx(Path(src) / f"{split}-labels-idx1-ubyte.gz")
        size = rows * cols
        taken, chosen = [0] * 10, []
        for i in range(n):
            if taken[labels[i]] < per_class:
                taken[labels[i]] += 1
                chosen.append(i)
        write_idx(out / f"{split}-images-idx3-ubyte.gz", 3, (len(chosen), rows, cols), b"".join(images[i * size : (i + 1) * size] for i in chosen))
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", 1, (len(chosen),), bytes(labels[i] for i in chosen))
        print(f"{split}: {len(chosen)} images, {taken} per class")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
