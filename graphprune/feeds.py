"""Input feeds: random verification inputs, the data-free synthetic proxy, calibration files, held-out split
and batching.

Everything that makes or slices the arrays fed to a model lives here, so verification (verify.py) and
statistics (calibration.py) both read from this module and neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import helper

from .errors import GraphpruneError
from .ir import Graph


class CalibrationError(GraphpruneError):
    """Calibration data that does not fit the model."""


# ---- random and synthetic feeds --------------------------------------------------------------------------------
def random_feeds(graph: Graph, n: int, seed: int = 0, dims: dict | None = None) -> list[dict[str, np.ndarray]]:
    """`n` random feeds matched to the graph inputs: normal floats, token ids inside the vocabulary, mask ones.
    Dynamic dims take their value from `dims` (by dim name), else 1 for a leading axis and 32 elsewhere."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds = []
    for _ in range(n):
        feed = {}
        for vi in graph.inputs:
            tt = vi.type.tensor_type
            shape = []
            for k, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                else:
                    shape.append(dims.get(d.dim_param, 1 if k == 0 else 32))
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if dtype.kind == "f":
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[vi.name] = np.ones(shape, dtype=bool)
            else:
                high = _index_bound(graph, vi.name)
                if "mask" in vi.name.lower():
                    feed[vi.name] = np.ones(shape, dtype=dtype)
                else:
                    feed[vi.name] = rng.integers(0, high, size=shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _index_bound(graph: Graph, name: str, depth: int = 0) -> int:
    """Largest safe integer value: the smallest table size this input indexes (through casts/reshapes)."""
    bound = None
    for node, i in graph.uses.get(name, []):
        if node.op_type == "Gather" and i == 1:
            shape = graph.shape(node.input[0])
            axis = 0
            for a in node.attribute:
                if a.name == "axis":
                    axis = a.i
            if shape and isinstance(shape[axis], int):
                bound = shape[axis] if bound is None else min(bound, shape[axis])
        elif node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten") and depth < 4 and i == 0:
            sub = _index_bound(graph, node.output[0], depth + 1)
            bound = sub if bound is None else min(bound, sub)
    return bound if bound is not None else 2


def synthetic_feeds(graph: Graph, samples: int = 64, seed: int = 0, dims: dict | None = None) -> dict:
    """Data-free proxy: standard-normal floats, token ids inside the vocabulary, all-ones masks; all samples
    as arrays keyed by input name (first axis = samples)."""
    feeds = random_feeds(graph, samples, seed=seed, dims=dims)
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


# ---- calibration files -----------------------------------------------------------------------------------------
def load_feeds(path, graph: Graph, samples: int = 256, image_scale: float = 1 / 255.0,
               image_mean=(0.0,), image_std=(1.0,)) -> dict[str, np.ndarray]:
    """All samples as arrays keyed by input name (first axis = samples), at most `samples` of them, from an
    `.npz` (keys = input names) or a folder of `.npy` arrays / images (single-input models)."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    names = [vi.name for vi in graph.inputs]
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            missing = [n for n in names if n not in data.files]
            if missing:
                raise CalibrationError(f"{path}: no array for model input(s) {missing}; it has {data.files}")
            feeds = {n: np.asarray(data[n])[:samples] for n in names}
    elif path.is_dir():
        if len(names) != 1:
            raise CalibrationError(f"a folder of samples needs a single-input model; this one has {names}")
        feeds = {names[0]: _load_folder(path, graph.inputs[0], samples, image_scale, image_mean, image_std)}
    else:
        raise CalibrationError(f"{path}: expected an .npz file or a folder of .npy / image files")
    counts = {len(v) for v in feeds.values()}
    if len(counts) != 1:
        raise CalibrationError(f"{path}: inputs have different sample counts {sorted(counts)}")
    for vi in graph.inputs:
        want = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        feeds[vi.name] = feeds[vi.name].astype(want, copy=False)
    return feeds


def _load_folder(folder: Path, vi, samples, scale, mean, std) -> np.ndarray:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    arrays = []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".npy":
            a = np.load(f)
            arrays.extend(a if a.ndim == len(dims) else [a])
        elif f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
            arrays.append(_load_image(f, dims, scale, mean, std))
        if len(arrays) >= samples:
            break
    if not arrays:
        raise CalibrationError(f"{folder}: no .npy or image files")
    return np.stack(arrays[:samples])


def _load_image(f: Path, dims, scale, mean, std) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise CalibrationError("reading images needs Pillow (pip install pillow), or pass .npy arrays") from exc
    channels, height, width = dims[1:4] if len(dims) == 4 else (None, None, None)
    img = Image.open(f).convert("L" if channels == 1 else "RGB")
    if height and width:
        img = img.resize((width, height), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) * scale
    a = a[..., None] if a.ndim == 2 else a
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return a.transpose(2, 0, 1)  # HWC -> CHW


# ---- split and batches -----------------------------------------------------------------------------------------
def split(feeds: dict, holdout: int):
    """(calibration part, held-out part): the held-out samples are never used for statistics."""
    n = len(next(iter(feeds.values())))
    holdout = min(holdout, max(0, n // 4))
    if holdout == 0:
        return feeds, {}
    return {k: v[: n - holdout] for k, v in feeds.items()}, {k: v[n - holdout:] for k, v in feeds.items()}


def static_batch(inputs) -> int | None:
    """The fixed leading (batch) dim of the model's inputs, if any: feeds must be run in batches of it."""
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
    return None


def batches(feeds: dict, batch: int):
    """Consecutive slices of `batch` samples (the last one may be shorter) of every array in `feeds`."""
    n = len(next(iter(feeds.values())))
    for s in range(0, n, batch):
        yield {k: v[s:s + batch] for k, v in feeds.items()}

