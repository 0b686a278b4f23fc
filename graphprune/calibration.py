"""Calibration data and streaming activation statistics.

Feeds come from a user `.npz` (keys = input names, first axis = samples), a folder of `.npy` arrays or images,
or are synthesised (data-free). Statistics are accumulated batch by batch from onnxruntime runs that expose the
needed intermediate tensors as outputs, so memory stays bounded by the widest channel Gram matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import GraphpruneError
from .ir import Graph


# Rows (samples x positions) per batch that go into a Gram matrix; moments always use every row.
GRAM_ROWS = 1024


class CalibrationError(GraphpruneError):
    """Calibration data that does not fit the model."""


def load_feeds(path, graph: Graph, samples: int = 256, image_scale: float = 1 / 255.0,
               image_mean=(0.0,), image_std=(1.0,)) -> dict[str, np.ndarray]:
    """All samples as arrays keyed by input name (first axis = samples), at most `samples` of them."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    names = [vi.name for vi in graph.inputs]
    if path.suffix == ".npz" and not path.is_dir():
        feeds = _load_npz(path, names, samples)
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
        have = feeds[vi.name]
        if have.dtype.kind not in "biufc" or (have.dtype.kind == "c" and want.kind != "c"):
            raise CalibrationError(f"{path}: array for input '{vi.name}' has dtype {have.dtype}, not numbers")
        if have.ndim == 0:
            raise CalibrationError(f"{path}: array for input '{vi.name}' is a scalar; the first axis is samples")
        rank = len(vi.type.tensor_type.shape.dim)
        if vi.type.tensor_type.HasField("shape") and have.ndim != rank:
            raise CalibrationError(f"{path}: array for input '{vi.name}' has shape {list(have.shape)}; the "
                                   f"input has {rank} dims (the first one counts samples)")
        feeds[vi.name] = have.astype(want, copy=False)
    return feeds


# Calibration arrays are read into memory: refuse more than this (per array, decompressed) up front.
MAX_CALIB_BYTES = 4 << 30
# PIL's decompression-bomb bound, set explicitly (Pillow raises DecompressionBombError above 2x this).
MAX_IMAGE_PIXELS = 64 << 20


def _npz_member_size(zf, member: str, path) -> None:
    """Bound an .npz member before numpy decompresses it (a zip bomb inflates kilobytes to gigabytes)."""
    info = zf.getinfo(member)
    if info.file_size > MAX_CALIB_BYTES:
        raise CalibrationError(f"{path}: array '{member[:-4]}' is {info.file_size} bytes uncompressed, more "
                               f"than the {MAX_CALIB_BYTES} accepted")


def _load_npz(path: Path, names, samples: int) -> dict:
    """Arrays of an .npz without pickles (allow_pickle=False), sizes bounded before decompression."""
    import zipfile
    from .fileio import open_regular
    fd, _size = open_regular(path, CalibrationError, "calibration file")
    with open(fd, "rb") as handle:
        try:
            zf = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CalibrationError(f"{path}: not an .npz archive ({exc})") from None
        with zf:
            files = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
            missing = [n for n in names if n not in files]
            if missing:
                raise CalibrationError(f"{path}: no array for model input(s) {missing}; it has {sorted(files)}")
            feeds = {}
            for n in names:
                _npz_member_size(zf, files[n], path)
                try:
                    with zf.open(files[n]) as member:
                        arr = _read_npy(member, zf.getinfo(files[n]).file_size, f"{path}: array '{n}'")
                except CalibrationError:
                    raise
                except Exception as exc:  # zlib/zip errors, bad CRC
                    raise CalibrationError(f"{path}: array '{n}' is corrupt ({type(exc).__name__}: {exc})") from None
                feeds[n] = arr[:samples]
    return feeds


def _read_npy(handle, size: int, where: str) -> np.ndarray:
    """One .npy array from a stream of `size` bytes: the header is checked before any allocation (its shape
    must fit in the bytes there are), object arrays are refused (they need pickles), no pickle is ever loaded."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(handle)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:
        raise CalibrationError(f"{where}: not a .npy array ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise CalibrationError(f"{where}: holds Python objects, which would need unpickling: refused")
    count = 1
    for d in shape:
        count *= int(d)
    need = count * dtype.itemsize
    if need > min(size, MAX_CALIB_BYTES):
        raise CalibrationError(f"{where}: header declares shape {list(shape)} ({need} bytes) but the file holds "
                               f"{size}" + (f" (at most {MAX_CALIB_BYTES} accepted)" if need > MAX_CALIB_BYTES else ""))
    data = handle.read(need)
    if len(data) != need:
        raise CalibrationError(f"{where}: truncated ({len(data)} of {need} data bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _load_npy(f: Path) -> np.ndarray:
    from .fileio import open_regular
    fd, size = open_regular(f, CalibrationError, "calibration array")
    with open(fd, "rb") as handle:
        return _read_npy(handle, size, str(f))


def _load_folder(folder: Path, vi, samples, scale, mean, std) -> np.ndarray:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    arrays = []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".npy":
            a = _load_npy(f)
            arrays.extend(a if a.ndim == len(dims) else [a])
        elif f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
            arrays.append(_load_image(f, dims, scale, mean, std))
        if len(arrays) >= samples:
            break
    if not arrays:
        raise CalibrationError(f"{folder}: no .npy or image files")
    shapes = {np.shape(a) for a in arrays[:samples]}
    if len(shapes) != 1:
        raise CalibrationError(f"{folder}: samples have different shapes {sorted(shapes)[:4]}")
    return np.stack(arrays[:samples])


def _load_image(f: Path, dims, scale, mean, std) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise CalibrationError("reading images needs Pillow (pip install pillow), or pass .npy arrays") from exc
    channels, height, width = dims[1:4] if len(dims) == 4 else (None, None, None)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        img = Image.open(f)
        if img.width * img.height > MAX_IMAGE_PIXELS:  # checked before decoding a pixel
            raise CalibrationError(f"{f}: {img.width}x{img.height} pixels, more than the {MAX_IMAGE_PIXELS} "
                                   f"accepted (decompression bomb?)")
        img = img.convert("L" if channels == 1 else "RGB")
    except CalibrationError:
        raise
    except Exception as exc:  # DecompressionBombError, truncated or not an image
        raise CalibrationError(f"{f}: not a readable image ({type(exc).__name__}: {exc})") from None
    if height and width:
        img = img.resize((width, height), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) * scale
    a = a[..., None] if a.ndim == 2 else a
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return a.transpose(2, 0, 1)  # HWC -> CHW


def synthetic_feeds(graph: Graph, samples: int = 64, seed: int = 0, dims: dict | None = None) -> dict:
    """Data-free proxy: standard-normal floats, token ids inside the vocabulary, all-ones masks."""
    from .verify import random_feeds
    batches = random_feeds(graph, samples, seed=seed, dims=dims)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


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
    n = len(next(iter(feeds.values())))
    for s in range(0, n, batch):
        yield {k: v[s:s + batch] for k, v in feeds.items()}


@dataclass
class ChannelStats:
    """Per-channel moments of one tensor along one axis, and optionally the channel Gram matrix."""
    n: int = 0
    sum: np.ndarray | None = None
    sumsq: np.ndarray | None = None
    gram: np.ndarray | None = None
    want_gram: bool = False
    # H⁻¹ per (damp, intercept, n): scoring and compensation both invert the same Hessian. Keyed on the sample
    # count too, and cleared by `add`, so statistics that grow never answer with a stale inverse.
    _inverses: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def add(self, x: np.ndarray, axis: int) -> None:
        self._inverses.clear()
        # float32 products (sgemm) per batch, float64 running sums: fast and accurate enough for statistics
        rows = np.ascontiguousarray(np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]), dtype=np.float32)
        if self.sum is None:
            c = rows.shape[1]
            self.sum, self.sumsq = np.zeros(c), np.zeros(c)
            if self.want_gram:
                self.gram = np.zeros((c, c))
        self.n += rows.shape[0]
        self.sum += rows.sum(0, dtype=np.float64)
        self.sumsq += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
        if self.want_gram:
            if len(rows) > GRAM_ROWS:  # many spatial positions: a seeded subset estimates XXᵀ/n just as well
                pick = np.random.default_rng(self.n).choice(len(rows), GRAM_ROWS, replace=False)
                self.gram += (rows[pick].T @ rows[pick]) * (len(rows) / GRAM_ROWS)
            else:
                self.gram += rows.T @ rows

    @property
    def mean(self):
        return self.sum / max(self.n, 1)

    @property
    def var(self):
        return np.maximum(self.sumsq / max(self.n, 1) - self.mean ** 2, 0.0)

    @property
    def norm(self):
        return np.sqrt(self.sumsq)

    def hessian(self, damp: float = 0.1) -> np.ndarray:
        """H = X Xᵀ / n, damped by λ·mean(diag H)·I so it can be inverted."""
        h = self.gram / max(self.n, 1)
        d = float(np.mean(np.diag(h))) or 1.0
        return h + damp * d * np.eye(len(h))

    def hessian_inv(self, damp: float = 0.1, intercept: bool = False) -> np.ndarray:
        """H⁻¹, computed once per setting and sample count (scoring and compensation both need it). With
        `intercept`, H is augmented by a constant input 1 (last row/column: the channel means, corner 1): the
        inverse then describes a refit that may also move the layer's bias."""
        key = (damp, intercept, self.n)
        if key not in self._inverses:
            h = self.hessian(damp)
            if intercept:
                c = len(h)
                aug = np.empty((c + 1, c + 1))
                aug[:c, :c] = h
                aug[:c, c] = aug[c, :c] = self.mean
                aug[c, c] = 1.0 + damp
                h = aug
            self._inverses[key] = np.linalg.inv(h)
        return self._inverses[key]


@dataclass
class Statistics:
    tensors: dict[tuple[str, int], ChannelStats] = field(default_factory=dict)
    samples: int = 0
    source: str = ""

    def get(self, name: str, axis: int) -> ChannelStats | None:
        return self.tensors.get((name, axis))


def collect(graph: Graph, wanted: dict[tuple[str, int], bool], feeds: dict, batch: int = 16,
            progress=None, source: str = "") -> Statistics:
    """Run the model on `feeds` in batches with the wanted tensors exposed; accumulate their statistics.
    `wanted` maps (tensor, axis) -> whether its Gram matrix is needed."""
    import onnxruntime as ort
    stats = Statistics(source=source)
    names = sorted({name for name, _ in wanted})
    if not names:
        return stats
    model = graph.to_model(with_value_info=False)
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, graph.dtypes.get(name, 1), None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # errors are reported by graphprune, in one line
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for key, gram in wanted.items():
        stats.tensors[key] = ChannelStats(want_gram=gram)
    total = len(next(iter(feeds.values())))
    batch = static_batch(graph.inputs) or batch
    done = 0
    for feed in batches(feeds, batch):
        values = dict(zip(names, sess.run(names, feed)))
        for (name, axis), st in stats.tensors.items():
            st.add(values[name], axis)
        done += len(next(iter(feed.values())))
        if progress:
            progress(f"calibration {done}/{total} samples")
    stats.samples = total
    return stats


def model_inputs_shape_free(model: onnx.ModelProto) -> bool:
    return all(d.HasField("dim_value") for vi in model.graph.input for d in vi.type.tensor_type.shape.dim)
