"""Reading IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is two zero bytes, a type code (0x08 for unsigned bytes), the
number of dimensions, each dimension as a big-endian uint32, then the data.
The Debian package `dataset-fashion-mnist` and the Keras cache hold them
gzip'd; both forms are read.
"""

import gzip
import os
import struct

import numpy as np

_UBYTE = 0x08


def read_idx(path):
    """The array stored in an IDX file (`.gz` or raw), as uint8.

    Raises:
        ValueError: if the file is not an unsigned-byte IDX file or is cut short.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read it ({error}).") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != _UBYTE or data[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file of unsigned bytes (it should start with "
            "00 00 08 and a dimension count)."
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: cut short inside its header ({len(data)} bytes).")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    values = len(data) - header
    if values != int(np.prod(dims)):
        what = "cut short" if values < int(np.prod(dims)) else "longer than its header says"
        raise ValueError(f"{path}: {what}: its header promises {dims}, but it holds "
                         f"{values} values.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_idx(directory, stem):
    """`directory/stem.gz` or `directory/stem`, whichever exists, else None."""
    for name in (f"{stem}.gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None
