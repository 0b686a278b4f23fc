"""Input feeds: random verification inputs, the data-free synthetic proxy, calibration files, held-out split
and batching.

Everything that makes or slices the arrays fed to a model lives here, so verification (verify.py) and
statistics (calibration.py) both read from this module and neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import GraphpruneError, VerificationError
from .ir import Graph, attr


class CalibrationError(GraphpruneError):
    """Calibration data that does not fit the model."""


# ---- random and synthetic feeds --------------------------------------------------------------------------------
# A random input never holds more than this many elements: declared dims may be hostile (10⁹).
MAX_FEED_ELEMENTS = 1 << 26
# Default for a dynamic dim nothing fixes: 1 for a leading (batch) axis, 32 elsewhere.
DEFAULT_DIM = 32


# element types numpy holds only through ml_dtypes, which onnxruntime's Python binding does not accept
_UNFEEDABLE = {getattr(onnx.TensorProto, n) for n in ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                                                      "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "UINT4", "INT4", "FLOAT4E2M1",
                                                      "UINT2", "INT2") if hasattr(onnx.TensorProto, n)}


class Feeds(list):
    """Random feeds (one dict per sample) that remember the value chosen for every dynamic dim, so a failing
    run can say which `--dim` to pass."""
    dims: dict


_PASSTHROUGH = {"Cast", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Identity", "Dropout", "Clip", "Abs", "Neg",
                "Exp", "Log", "Sqrt", "Softplus", "Elu", "Selu", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Mish",
                "BatchNormalization", "InstanceNormalization", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min",
                "Unsqueeze", "Squeeze", "Reshape", "Pad", "Where", "PRelu"}
_SPATIAL = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv"}


def _min_spatial(graph: Graph) -> dict[str, int]:
    """Smallest trailing (spatial) length each tensor may have so every Conv/pool downstream gets at least one
    output position: walked backwards from the outputs, (need - 1) * stride + dilated kernel - pads per layer."""
    need: dict[str, int] = {}
    for node in reversed(graph.nodes):
        out_need = max([need.get(o, 1) for o in node.output if o] or [1])
        if node.op_type in _SPATIAL and node.input and node.op_type != "ConvTranspose":
            kernel = attr(node, "kernel_shape")
            if kernel is None and len(node.input) > 1 and graph.const(node.input[1]) is not None:
                kernel = list(graph.const(node.input[1]).shape[2:])
            kernel = list(kernel or [1])
            strides = list(attr(node, "strides", None) or [1] * len(kernel))
            dilations = list(attr(node, "dilations", None) or [1] * len(kernel))
            pads = list(attr(node, "pads", None) or [0] * (2 * len(kernel)))
            same = attr(node, "auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER")
            want = 1
            for k in range(len(kernel)):
                eff = (int(kernel[k]) - 1) * int(dilations[k] if k < len(dilations) else 1) + 1
                pad = 0 if same else int(pads[k]) + int(pads[k + len(kernel)]) if len(pads) >= 2 * len(kernel) else 0
                stride = int(strides[k] if k < len(strides) else 1)
                want = max(want, (out_need - 1) * stride + (1 if same else eff) - pad)
            need[node.input[0]] = max(need.get(node.input[0], 1), want)
        elif node.op_type in _PASSTHROUGH:
            for name in node.input[:1] if node.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Pad") else node.input:
                if name and not graph.is_const(name):
                    need[name] = max(need.get(name, 1), out_need)
    return need


def _fixed_by_weights(graph: Graph, name: str, rank: int, depth: int = 0) -> dict[int, int]:
    """Axes of input `name` whose size a consumer's weights fix (Conv/Gemm/MatMul/RNN/norm/broadcast const):
    onnx infers shapes forwards only, so a feature axis declared symbolic stays symbolic."""
    fixed: dict[int, int] = {}
    for node, i in graph.uses.get(name, []):
        op = node.op_type
        w = graph.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if i == 0 and w is not None and op in ("Conv", "ConvInteger") and w.ndim >= 2 and rank >= 2:
            fixed[1] = int(w.shape[1]) * int(attr(node, "group", 1))
        elif i == 0 and w is not None and op == "ConvTranspose" and w.ndim >= 2 and rank >= 2:
            fixed[1] = int(w.shape[0])
        elif i == 0 and w is not None and op in ("GRU", "LSTM", "RNN") and w.ndim == 3 and rank == 3:
            fixed[2] = int(w.shape[2])
        elif i == 0 and w is not None and op == "MatMul" and w.ndim >= 2 and rank >= 1:
            fixed[rank - 1] = int(w.shape[-2])
        elif i == 0 and w is not None and op == "Gemm" and w.ndim == 2 and rank == 2:
            fixed[0 if attr(node, "transA", 0) else 1] = int(w.shape[1] if attr(node, "transB", 0) else w.shape[0])
        elif i == 0 and op in ("BatchNormalization", "InstanceNormalization") and w is not None and rank >= 2:
            fixed[1] = int(w.size)
        elif i == 0 and op == "LayerNormalization" and w is not None:
            for k in range(1, w.ndim + 1):
                fixed[rank - k] = int(w.shape[-k])
        elif op in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
            other = graph.const(node.input[1 - i])
            if other is not None and other.ndim <= rank:
                for k in range(1, other.ndim + 1):
                    if other.shape[-k] > 1:
                        fixed[rank - k] = int(other.shape[-k])
        if op in ("Cast", "Relu", "Identity", "Dropout", "Sigmoid", "Tanh", "Clip", "LeakyRelu") and i == 0 \
                and depth < 6:
            for axis, size in _fixed_by_weights(graph, node.output[0], rank, depth + 1).items():
                fixed.setdefault(axis, size)
        elif op == "Transpose" and i == 0 and depth < 6:
            perm = attr(node, "perm") or list(range(rank))[::-1]
            if len(perm) == rank:
                for axis, size in _fixed_by_weights(graph, node.output[0], rank, depth + 1).items():
                    fixed.setdefault(int(perm[axis]), size)
    return fixed


def feed_shapes(graph: Graph, dims: dict | None = None) -> tuple[dict[str, list[int]], dict[str, int]]:
    """(input name -> concrete shape, dim name -> value chosen). One value per dim name everywhere; sizes a
    weight fixes win over defaults; spatial dims are at least what the model's kernels need; `dims` (--dim)
    wins over everything. Raises VerificationError naming the `--dim` to pass when a shape stays unusable."""
    oversized = getattr(graph, "oversized", {})
    if oversized:
        name, shape = next(iter(oversized.items()))
        raise VerificationError(f"tensor '{name}' would have shape {list(shape)}: running the model on random inputs "
                                f"would allocate from that dim, so it is not run (pass --no-verify to skip the check)")
    given = dict(dims or {})
    chosen: dict[str, int] = {}
    spatial = _min_spatial(graph)
    plans = []
    for vi in graph.inputs:
        dim_protos = list(vi.type.tensor_type.shape.dim)
        rank = len(dim_protos)
        inferred = graph.shape(vi.name) or ()
        fixed = _fixed_by_weights(graph, vi.name, rank)
        for k, d in enumerate(dim_protos):
            name = d.dim_param if d.HasField("dim_param") and d.dim_param else None
            value = int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None  # -1: Paddle's "any"
            if value is None and k < len(inferred) and isinstance(inferred[k], int) and 0 < inferred[k]:
                value = inferred[k]
            if value is None and k in fixed:
                value = fixed[k]
            if value is not None and name and name not in given:
                chosen.setdefault(name, value)
            plans.append((vi, k, name, value, rank))
    need_min = {vi.name: spatial.get(vi.name, 1) for vi in graph.inputs}
    shapes: dict[str, list[int]] = {vi.name: [] for vi in graph.inputs}
    for vi, k, name, value, rank in plans:
        if name in given:
            size = given[name]
        elif value is not None:
            size = value
        elif name in chosen:
            size = chosen[name]
        else:
            spatial_axis = (k >= 2) if rank >= 3 else (k == rank - 1 and k > 0)
            size = 1 if k == 0 else max(DEFAULT_DIM, need_min[vi.name] if spatial_axis else 1)
            if name:
                chosen[name] = size
        shapes[vi.name].append(int(size))
    for vi in graph.inputs:
        shape = shapes[vi.name]
        if int(np.prod(shape, dtype=np.float64)) > MAX_FEED_ELEMENTS:
            names = [d.dim_param or f"axis {k}" for k, d in enumerate(vi.type.tensor_type.shape.dim)]
            raise VerificationError(f"input '{vi.name}' would need {shape} = {int(np.prod(shape, dtype=np.float64))} "
                                    f"random values (more than {MAX_FEED_ELEMENTS}); its dims are {names}: pass "
                                    f"smaller --dim NAME=VALUE for the dynamic ones, or --no-verify")
    return shapes, {**chosen, **given}


def random_feeds(graph: Graph, n: int, seed: int = 0, dims: dict | None = None) -> list[dict[str, np.ndarray]]:
    """Random inputs matched to each graph input: normal floats, token ids inside the vocabulary, mask ones.
    Shapes come from `feed_shapes` (names, weights, kernel sizes, --dim); the list remembers them (.dims)."""
    rng = np.random.default_rng(seed)
    shapes, chosen = feed_shapes(graph, dims)
    feeds = Feeds()
    feeds.dims = chosen
    for _ in range(n):
        feed = {}
        for vi in graph.inputs:
            tt = vi.type.tensor_type
            shape = shapes[vi.name]
            if tt.elem_type in _UNFEEDABLE:
                raise VerificationError(f"input '{vi.name}' has element type "
                                        f"{onnx.TensorProto.DataType.Name(tt.elem_type)}, which onnxruntime's Python "
                                        f"API cannot be fed: random inputs cannot check this model (pass --no-verify)")
            try:
                dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            except Exception:
                raise VerificationError(f"input '{vi.name}' has element type {tt.elem_type}, which random inputs "
                                        f"cannot be made of") from None
            if dtype.kind == "f":
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "c":
                feed[vi.name] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
            elif dtype == np.bool_:
                feed[vi.name] = np.ones(shape, dtype=bool)
            elif dtype.kind in "OUS":
                feed[vi.name] = np.full(shape, "a", dtype=object)
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
def load_feeds(path, graph: Graph, samples: int = 256, preprocess: dict | None = None) -> dict[str, np.ndarray]:
    """All samples as arrays keyed by input name (first axis = samples), at most `samples` of them. Images of a
    folder go through `preprocess` (PruneOptions.image_preprocessing: size, mean, std, order, layout)."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    names = [vi.name for vi in graph.inputs]
    if path.suffix == ".npz" and not path.is_dir():
        feeds = _load_npz(path, names, samples)
    elif path.is_dir():
        if len(names) != 1:
            raise CalibrationError(f"a folder of samples needs a single-input model; this one has {names}")
        feeds = {names[0]: _load_folder(path, graph.inputs[0], samples, preprocess or {})}
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


def _load_folder(folder: Path, vi, samples, preprocess: dict) -> np.ndarray:
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]
    image = None
    arrays = []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".npy":
            a = _load_npy(f)
            arrays.extend(a if a.ndim == len(dims) else [a])
        elif f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
            image = image or image_preprocessing(dims, preprocess, vi.name)
            arrays.append(_load_image(f, **image))
        if len(arrays) >= samples:
            break
    if not arrays:
        raise CalibrationError(f"{folder}: no .npy or image files")
    shapes = {np.shape(a) for a in arrays[:samples]}
    if len(shapes) != 1:
        raise CalibrationError(f"{folder}: samples have different shapes {sorted(shapes)[:4]}"
                               + ("" if image is None or image["size"] else
                                  " (the model's height and width are dynamic: pass --image-size HxW)"))
    return np.stack(arrays[:samples])


def image_preprocessing(dims: list, declared: dict, name: str = "input") -> dict:
    """The declared preprocessing with the model's input shape filling what was not given: the layout (NHWC when
    the last dim is 3 or 1 and the second is not), the channel count, and the size (the static H, W)."""
    layout = declared.get("layout") or "auto"
    if layout == "auto":
        last, second = (dims[-1], dims[1]) if len(dims) == 4 else (None, None)
        layout = "NHWC" if last in (1, 3) and second not in (1, 3) else "NCHW"
    if len(dims) == 4:
        channels, height, width = (dims[3], dims[1], dims[2]) if layout == "NHWC" else (dims[1], dims[2], dims[3])
    else:
        channels, height, width = None, None, None
    if channels not in (None, 1, 3):
        raise CalibrationError(f"input '{name}' has {channels} channels in layout {layout}: images give 1 or 3 "
                               f"(pass --image-layout, or .npy arrays)")
    size = declared.get("size") or ((height, width) if height and width else None)
    channels = channels or 3
    mean, std = tuple(declared.get("mean") or (0.0,)), tuple(declared.get("std") or (1.0,))
    for option, values in (("--image-mean", mean), ("--image-std", std)):
        if len(values) not in (1, channels):
            raise CalibrationError(f"{option} has {len(values)} values; input '{name}' has {channels} channels")
    return {"size": size, "channels": channels, "mean": mean, "std": std,
            "order": declared.get("order") or "RGB", "layout": layout}


def _load_image(f: Path, size, channels, mean, std, order, layout) -> np.ndarray:
    """One image as a float32 (C, H, W) or (H, W, C) array: decoded (bounded), converted to L or RGB, resized so
    it covers `size` with its aspect ratio kept, then center-cropped to it; scaled to 0..1, channels in `order`,
    then (x - mean) / std per channel."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise CalibrationError("reading images needs Pillow (pip install pillow), or pass .npy arrays") from exc
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
    if size:
        height, width = size
        # the smallest scale at which the image covers height x width; the overhang is cropped evenly
        scale = max(height / img.height, width / img.width)
        rw, rh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
        if (rw, rh) != (img.width, img.height):
            img = img.resize((rw, rh), Image.BICUBIC)
        left, top = (rw - width) // 2, (rh - height) // 2
        img = img.crop((left, top, left + width, top + height))
    a = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    a = a[..., None] if a.ndim == 2 else a
    if order == "BGR":
        a = a[..., ::-1]
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a if layout == "NHWC" else a.transpose(2, 0, 1))


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

