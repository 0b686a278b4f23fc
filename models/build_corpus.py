"""Build the weight-stripped ONNX model corpus used by the tests (``models/corpus/``).

Every model is built with random initialisation (``torch.manual_seed(0)``), exported with BOTH the legacy
TorchScript exporter (``dynamo=False``) and the dynamo exporter (``dynamo=True``), stripped of its float
weights with :func:`corpus_tools.strip_weights` (``models/corpus_tools.py``), and saved as one self-contained file
``models/corpus/<name>.<legacy|dynamo>.onnx``.  Each committed file is checked: weights refilled from seed 0,
``onnx.checker``, an onnxruntime session, one run on random inputs with finite outputs.
``models/corpus/manifest.json`` lists every file (inputs, value ranges, node count, opset, ...) and every
export that failed, with the first line of its error.

Usage::

    python models/build_corpus.py                    # everything (several minutes)
    python models/build_corpus.py --only resnet50,bert --exporter dynamo
    python models/build_corpus.py --skip-existing    # resume: keep files that are already there
    python models/build_corpus.py --family hand      # one family: torchvision, timm, transformers, hand
    python models/build_corpus.py --list

Needs torch==2.13.0 (CPU), onnxscript, torchvision==0.28.0, timm, transformers; see models/README.md.
Nothing is downloaded: all weights are random.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from corpus_tools import make_inputs, refill_weights, strip_weights  # models/, this script's folder

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "corpus"
MANIFEST = OUT_DIR / "manifest.json"

SEED = 0
LEGACY_OPSET = 17
_vision_ready = False


def _vision():
    """Import torchvision (and timm, which imports it) on CPU torch: declare the two missing op schemas.

    The torchvision wheel from PyPI is a CUDA build; its C++ ops do not load with CPU torch, and its import
    then fails in ``register_fake("torchvision::nms")``.  Models work, ``torchvision.ops`` do not.
    """
    global _vision_ready
    if not _vision_ready:
        try:
            import torchvision  # noqa: F401  (a matching CPU build needs no shim)
        except RuntimeError:
            for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[mod]
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _vision._lib = lib  # keep the registration alive
            import torchvision  # noqa: F401
        _vision_ready = True
    import torchvision
    return torchvision


# ================================================================================================ specs
@dataclass
class Spec:
    name: str
    family: str
    source: str
    build: Callable[[], tuple[nn.Module, dict[str, torch.Tensor]]]
    ranges: dict[str, tuple] = field(default_factory=dict)   # input name -> (low, high), inclusive for ints
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # input/output -> {axis: symbol}
    outputs: list[str] = field(default_factory=lambda: ["output"])
    legacy_opset: int = LEGACY_OPSET
    exporters: tuple[str, ...] = ("legacy", "dynamo")


SPECS: list[Spec] = []


def spec(name, family, source, outputs=("output",), **kw):
    def deco(fn):
        SPECS.append(Spec(name, family, source, fn, outputs=list(outputs), **kw))
        return fn
    return deco


def image(size, channels=3, batch=1):
    return {"input": torch.randn(batch, channels, size, size)}


# ------------------------------------------------------------------------------------------ torchvision
BATCH_DYNAMIC = {"input": {0: "batch"}, "output": {0: "batch"}}


def tv(name, size=64, opset=LEGACY_OPSET, note="", dynamic_batch=False, **kwargs):
    def build():
        models = _vision().models
        # a dynamic dim must not be traced at size 1 (torch.export specialises it)
        return getattr(models, name)(weights=None, **kwargs), image(size, batch=2 if dynamic_batch else 1)
    src = f"torchvision.models.{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) random init, " \
          f"input {size}x{size}" + (", dynamic batch" if dynamic_batch else "") + (f"; {note}" if note else "")
    SPECS.append(Spec(name, "torchvision", src, build, legacy_opset=opset,
                      dynamic=BATCH_DYNAMIC if dynamic_batch else {}))


tv("resnet50", dynamic_batch=True)
tv("mobilenet_v2", opset=13)
tv("mobilenet_v3_small")
tv("efficientnet_b0")
tv("regnet_y_400mf")
tv("densenet121")
tv("convnext_tiny")
tv("swin_t", size=112, note="windows padded to 7 at the last stage")
tv("shufflenet_v2_x1_0")
tv("squeezenet1_1", opset=11)
tv("googlenet", aux_logits=False, init_weights=True)
tv("mnasnet1_0")
tv("vit_b_16", image_size=64, note="16 patches; legacy export runs with grad enabled (MHA fast path)")
tv("resnext50_32x4d")
tv("inception_v3", size=96, aux_logits=False, init_weights=True)


# ------------------------------------------------------------------------------------------------- timm
def tm(name, size=64, opset=LEGACY_OPSET, **kwargs):
    def build():
        _vision()
        import timm
        return timm.create_model(name, pretrained=False, **kwargs), image(size)
    args = "".join(f", {k}={v}" for k, v in kwargs.items())
    SPECS.append(Spec(f"timm_{name}", "timm", f"timm.create_model('{name}'{args}) random init, "
                      f"input {size}x{size}", build, legacy_opset=opset))


tm("resnet18", opset=13)
tm("mobilenetv3_large_100")
tm("tf_efficientnet_lite0")
tm("ghostnet_100")
tm("repvgg_a0")
tm("cspdarknet53")
tm("mobilevit_xxs")
tm("deit_tiny_patch16_224", img_size=64)
tm("levit_128s", size=128, img_size=128)
tm("edgenext_xx_small")
tm("regnety_002")
tm("convnext_atto")
tm("hrnet_w18_small")
tm("dla34")
tm("rexnet_100")
tm("mobileone_s0")
tm("fastvit_t8")


# ----------------------------------------------------------------------------------------- transformers
VOCAB = 1000
SEQ = 16


class HFWrapper(nn.Module):
    """Call a transformers model with keyword inputs and return plain tensors."""

    def __init__(self, model, keys, input_names):
        super().__init__()
        self.model, self.keys, self.input_names = model, keys, input_names

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        kw = {"input_ids": input_ids}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if decoder_input_ids is not None:
            kw["decoder_input_ids"] = decoder_input_ids
        if getattr(self.model.config, "use_cache", None) is not None:
            kw["use_cache"] = False
        out = self.model(**kw)
        return tuple(out[k] for k in self.keys)


class HFPixelWrapper(nn.Module):
    def __init__(self, model, keys):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return tuple(out[k] for k in self.keys)


def text_inputs(batch=1, decoder=False, mask=True):
    g = torch.Generator().manual_seed(1)
    d = {"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=g)}
    if mask:
        d["attention_mask"] = torch.ones(batch, SEQ, dtype=torch.int64)
    if decoder:
        d["decoder_input_ids"] = torch.randint(0, VOCAB, (batch, SEQ // 2), generator=g)
    return d


TEXT_RANGES = {"input_ids": (0, VOCAB - 1), "attention_mask": (0, 1), "decoder_input_ids": (0, VOCAB - 1)}
TEXT_DYNAMIC = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def hf(name, source, outputs, dynamic=False, opset=LEGACY_OPSET):
    def deco(fn):
        dyn = {}
        if dynamic:
            dyn = dict(TEXT_DYNAMIC)
            for o in outputs:
                dyn[o] = {0: "batch", 1: "sequence"} if o != "pooler_output" else {0: "batch"}
        SPECS.append(Spec(name, "transformers", source, fn, ranges=TEXT_RANGES, dynamic=dyn,
                          outputs=list(outputs), legacy_opset=opset))
        return fn
    return deco


@hf("bert", "transformers BertModel: vocab 1000, hidden 128, 2 layers, 4 heads, ffn 512; seq 16",
    ["last_hidden_state", "pooler_output"], dynamic=True)
def _bert():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=128, attn_implementation="eager")
    m = BertModel(cfg)
    return HFWrapper(m, ["last_hidden_state", "pooler_output"], ["input_ids", "attention_mask"]), \
        text_inputs(batch=2)


@hf("distilbert", "transformers DistilBertForSequenceClassification: vocab 1000, dim 128, 2 layers, 4 heads, "
    "3 labels; seq 16", ["logits"], opset=13)
def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=128, n_layers=2, n_heads=4, hidden_dim=512,
                           max_position_embeddings=128, num_labels=3, attn_implementation="eager")
    return HFWrapper(DistilBertForSequenceClassification(cfg), ["logits"], None), text_inputs()


@hf("gpt2", "transformers GPT2LMHeadModel (tied lm_head): vocab 1000, n_embd 128, 2 layers, 4 heads, "
    "use_cache=False; seq 16", ["logits"], dynamic=True)
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=128, use_cache=False,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                     attn_implementation="eager")
    return HFWrapper(GPT2LMHeadModel(cfg), ["logits"], None), text_inputs(batch=2)


@hf("llama_gqa", "transformers LlamaForCausalLM: vocab 1000, hidden 128, 2 layers, 4 query heads / 2 kv heads "
    "(GQA), SwiGLU 344, RMSNorm, rotary; seq 16", ["logits"])
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      use_cache=False, attn_implementation="eager")
    return HFWrapper(LlamaForCausalLM(cfg), ["logits"], None), text_inputs()


@hf("qwen2", "transformers Qwen2ForCausalLM: vocab 1000, hidden 128, 2 layers, 4 query heads / 2 kv heads, "
    "qkv bias, sdpa attention; seq 16", ["logits"])
def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      use_cache=False, attn_implementation="sdpa")
    return HFWrapper(Qwen2ForCausalLM(cfg), ["logits"], None), text_inputs()


@hf("t5", "transformers T5ForConditionalGeneration (encoder-decoder): vocab 1000, d_model 128, d_kv 32, "
    "d_ff 256, 2+2 layers, 4 heads; encoder seq 16, decoder seq 8", ["logits"])
def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2,
                   num_heads=4, use_cache=False, decoder_start_token_id=0, pad_token_id=0,
                   attn_implementation="eager")
    return HFWrapper(T5ForConditionalGeneration(cfg), ["logits"], None), text_inputs(decoder=True)


SPECS.append(Spec(
    "hf_vit", "transformers",
    "transformers ViTForImageClassification: image 64, patch 8, hidden 128, 2 layers, 4 heads, 10 labels",
    lambda: _hf_vit(), outputs=["logits"]))


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, num_labels=10, attn_implementation="eager")
    return HFPixelWrapper(ViTForImageClassification(cfg), ["logits"]), {"pixel_values": torch.randn(1, 3, 64, 64)}


# ------------------------------------------------------------------------------------ hand-written blocks
def conv_bn_act(cin, cout, k=3, s=1, g=1, act=nn.SiLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), act())


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2, self.add = conv_bn_act(c, c), conv_bn_act(c, c), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8-style: 1x1 conv, split in two (even: chunk; uneven: split sizes), bottleneck chain, concat all."""

    def __init__(self, cin, cout, n=2, split=None, shortcut=True):
        super().__init__()
        self.split = split
        hidden = cout // 2 if split is None else split[1]
        first = hidden if split is None else split[0]
        self.cv1 = conv_bn_act(cin, first + hidden, 1)
        self.m = nn.ModuleList(Bottleneck(hidden, shortcut) for _ in range(n))
        self.cv2 = conv_bn_act(first + (n + 1) * hidden, cout, 1)

    def forward(self, x):
        x = self.cv1(x)
        y = list(x.chunk(2, 1)) if self.split is None else list(torch.split(x, self.split, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = conv_bn_act(c, c // 2, 1), conv_bn_act(c * 2, c, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class C2fNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 2)
        self.down1 = conv_bn_act(16, 32, 3, 2)
        self.c2f1 = C2f(32, 32, n=1)
        self.down2 = conv_bn_act(32, 64, 3, 2)
        self.c2f2 = C2f(64, 64, n=2, split=[24, 40])  # uneven split
        self.c2f3 = C2f(64, 64, n=1, shortcut=False)
        self.sppf = SPPF(64)
        self.head = nn.Conv2d(64 + 32, 21, 1)

    def forward(self, x):
        p3 = self.c2f1(self.down1(self.stem(x)))
        p4 = self.sppf(self.c2f3(self.c2f2(self.down2(p3))))
        up = F.interpolate(p4, scale_factor=2.0, mode="nearest")
        return self.head(torch.cat([up, p3], 1))


@spec("hand_c2f_yolo", "hand", "YOLOv8-style stack: Conv-BN-SiLU, C2f (chunk(2) and uneven split [24,40]), "
      "SPPF, nearest upsample + concat neck; input 64x64, dynamic batch", dynamic=BATCH_DYNAMIC)
def _c2f():
    return C2fNet(), image(64, batch=2)


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        act = nn.ReLU
        self.e1 = nn.Sequential(conv_bn_act(3, 16, act=act), conv_bn_act(16, 16, act=act))
        self.e2 = nn.Sequential(conv_bn_act(16, 32, act=act), conv_bn_act(32, 32, act=act))
        self.e3 = nn.Sequential(conv_bn_act(32, 64, act=act), conv_bn_act(64, 64, act=act))
        self.pool = nn.MaxPool2d(2)
        self.up3 = nn.ConvTranspose2d(64, 32, 2, 2)
        self.d3 = conv_bn_act(64, 32, act=act)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d2 = conv_bn_act(32 + 16, 16, act=act)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        s1 = self.e1(x)
        s2 = self.e2(self.pool(s1))
        b = self.e3(self.pool(s2))
        y = self.d3(torch.cat([self.up3(b), s2], 1))
        y = self.d2(torch.cat([self.up2(y), s1], 1))
        return self.out(y)


@spec("hand_unet", "hand", "UNet: 3-level encoder, ConvTranspose2d and bilinear Upsample decoder, skip Concats; "
      "input 64x64", legacy_opset=13)
def _unet():
    return UNet(), image(64)


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 2:
            self.left = nn.Sequential(conv_bn_act(cin, cin, 3, 2, g=cin, act=nn.Identity),
                                      conv_bn_act(cin, half, 1, act=nn.ReLU))
        bin_ = cin if stride == 2 else half
        self.right = nn.Sequential(conv_bn_act(bin_, half, 1, act=nn.ReLU),
                                   conv_bn_act(half, half, 3, stride, g=half, act=nn.Identity),
                                   conv_bn_act(half, half, 1, act=nn.ReLU))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return channel_shuffle(out, 2)


@spec("hand_shuffle", "hand", "ShuffleNetV2 units: channel split (chunk), depthwise branches, "
      "channel shuffle reshape->transpose->reshape; input 64x64")
def _shuffle():
    m = nn.Sequential(conv_bn_act(3, 24, 3, 2, act=nn.ReLU), ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1),
                      ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(96, 10))
    return m, image(64)


@spec("hand_pixelshuffle_sr", "hand", "ESPCN-style x2 super-resolution: convs -> conv to 3*r^2 -> PixelShuffle(2) "
      "(+ PixelUnshuffle input stem); input 32x32")
def _sr():
    class SR(nn.Module):
        def __init__(self):
            super().__init__()
            self.unshuffle = nn.PixelUnshuffle(2)
            self.body = nn.Sequential(nn.Conv2d(12, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
                                      nn.Conv2d(32, 3 * 16, 3, 1, 1))
            self.shuffle = nn.PixelShuffle(4)

        def forward(self, x):
            return self.shuffle(self.body(self.unshuffle(x)))
    return SR(), image(32)


class SE(nn.Module):
    def __init__(self, c, r=4, linear=False):
        super().__init__()
        self.linear = linear
        if linear:
            self.fc = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c), nn.Sigmoid())
        else:
            self.fc = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.ReLU(), nn.Conv2d(c // r, c, 1), nn.Hardsigmoid())

    def forward(self, x):
        if self.linear:
            b, c = x.shape[:2]
            s = self.fc(x.mean((2, 3))).view(b, c, 1, 1)
        else:
            s = self.fc(F.adaptive_avg_pool2d(x, 1))
        return x * s


@spec("hand_se", "hand", "Squeeze-and-excitation: conv-1x1 SE (ReLU/Hardsigmoid) and Linear SE (mean->view), "
      "residual; input 64x64")
def _se():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn_act(3, 32, 3, 2, act=nn.ReLU)
            self.b1 = nn.Sequential(conv_bn_act(32, 32, act=nn.ReLU), SE(32))
            self.b2 = nn.Sequential(conv_bn_act(32, 64, 3, 2, act=nn.ReLU), SE(64, linear=True))
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.b1(x)
            return self.head(self.b2(x).mean((2, 3)))
    return Net(), image(64)


class CBAM(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1, bias=False), nn.ReLU(), nn.Conv2d(c // r, c, 1, bias=False))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        ca = torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))
        x = x * ca
        sa = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(sa))


@spec("hand_cbam", "hand", "CBAM: channel attention (avg+max pool, shared MLP) then spatial attention "
      "(channel mean/max, 7x7 conv); input 64x64")
def _cbam():
    m = nn.Sequential(conv_bn_act(3, 32, 3, 2, act=nn.ReLU), CBAM(32), conv_bn_act(32, 64, 3, 2, act=nn.ReLU),
                      CBAM(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return m, image(64)


class ResNeXtBlock(nn.Module):
    def __init__(self, cin, cout, groups=4, stride=1):
        super().__init__()
        mid = cout // 2
        self.body = nn.Sequential(conv_bn_act(cin, mid, 1, act=nn.ReLU),
                                  conv_bn_act(mid, mid, 3, stride, g=groups, act=nn.ReLU),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = nn.Identity() if (cin == cout and stride == 1) else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


@spec("hand_resnext_g4", "hand", "ResNeXt-style bottlenecks with grouped 3x3 conv (groups=4), projection "
      "shortcut; input 64x64")
def _resnext():
    m = nn.Sequential(conv_bn_act(3, 32, 3, 2, act=nn.ReLU), ResNeXtBlock(32, 64), ResNeXtBlock(64, 64),
                      ResNeXtBlock(64, 128, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    return m, image(64)


class GQAttention(nn.Module):
    def __init__(self, dim=128, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.hd)
        self.k = nn.Linear(dim, kv_heads * self.hd)
        self.v = nn.Linear(dim, kv_heads * self.hd)
        self.o = nn.Linear(heads * self.hd, dim)

    def repeat_kv(self, t):
        b, kv, s, d = t.shape
        n = self.h // self.kv
        return t[:, :, None, :, :].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.hd).transpose(1, 2)
        k = self.repeat_kv(self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2))
        v = self.repeat_kv(self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, self.h * self.hd)
        return self.o(y)


@spec("hand_gqa", "hand", "Grouped-query attention written by hand: 4 query heads, 2 kv heads, repeat_kv via "
      "expand+reshape, LayerNorm, residual MLP; input 1x16x128")
def _gqa():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.att = nn.LayerNorm(128), GQAttention()
            self.ln2 = nn.LayerNorm(128)
            self.mlp = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))

        def forward(self, x):
            x = x + self.att(self.ln1(x))
            return x + self.mlp(self.ln2(x))
    return nn.Sequential(Block(), Block()), {"input": torch.randn(1, SEQ, 128)}


@spec("hand_lstm_classifier", "hand", "Embedding(1000,64) -> 2-layer LSTM(64) batch_first -> Linear(64,5) on the "
      "last step; tokens 1x16", ranges={"input_ids": (0, VOCAB - 1)})
def _lstm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 64)
            self.rnn = nn.LSTM(64, 64, num_layers=2, batch_first=True)
            self.fc = nn.Linear(64, 5)

        def forward(self, input_ids):
            y, _ = self.rnn(self.emb(input_ids))
            return self.fc(y[:, -1])
    return Net(), {"input_ids": torch.randint(0, VOCAB, (1, SEQ))}


@spec("hand_gru", "hand", "Embedding(1000,48) -> bidirectional GRU(64) -> mean over time -> Linear(128,4); "
      "tokens 1x16", ranges={"input_ids": (0, VOCAB - 1)})
def _gru():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 48)
            self.rnn = nn.GRU(48, 64, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(128, 4)

        def forward(self, input_ids):
            y, _ = self.rnn(self.emb(input_ids))
            return self.fc(y.mean(1))
    return Net(), {"input_ids": torch.randint(0, VOCAB, (1, SEQ))}


@spec("hand_conv1d_flatten", "hand", "Conv1d(4,16)-ReLU-Conv1d(16,32,stride 2)-ReLU -> Flatten -> Linear(512,10): "
      "channels couple to Linear input features in blocks of 16; input 1x4x32")
def _conv1d():
    m = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 32, 3, stride=2, padding=1),
                      nn.BatchNorm1d(32), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
    return m, {"input": torch.randn(1, 4, 32)}


@spec("hand_unflatten_decoder", "hand", "Linear(32,64*4*4) -> view(-1,64,4,4) -> ConvTranspose2d x2 -> Unflatten "
      "branch; input 1x32 latent")
def _decoder():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 64 * 4 * 4)
            self.up1 = nn.ConvTranspose2d(64, 32, 4, 2, 1)
            self.up2 = nn.ConvTranspose2d(32, 3, 4, 2, 1)
            self.fc2 = nn.Sequential(nn.Linear(32, 8 * 16 * 16), nn.Unflatten(1, (8, 16, 16)))
            self.mix = nn.Conv2d(3 + 8, 3, 1)

        def forward(self, z):
            x = self.fc(z).view(-1, 64, 4, 4)
            x = self.up2(F.relu(self.up1(F.relu(x))))
            return torch.sigmoid(self.mix(torch.cat([x, self.fc2(z)], 1)))
    return Net(), {"input": torch.randn(1, 32)}


@spec("hand_glu_mlp", "hand", "GLU MLP: Linear(64, 2*128) -> chunk(2) -> a*sigmoid(b) -> Linear(128,64), two "
      "residual layers; input 1x8x64")
def _glu():
    class GLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(64, 256), nn.Linear(128, 64)

        def forward(self, x):
            a, b = self.up(x).chunk(2, dim=-1)
            return x + self.down(a * torch.sigmoid(b))
    return nn.Sequential(GLU(), GLU(), nn.Linear(64, 10)), {"input": torch.randn(1, 8, 64)}


@spec("hand_focus_stem", "hand", "YOLOv5 Focus / space-to-depth stem: cat(x[...,::2,::2], x[...,1::2,::2], "
      "x[...,::2,1::2], x[...,1::2,1::2]) -> Conv-BN-SiLU; input 64x64")
def _focus():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_bn_act(12, 32)
            self.body = nn.Sequential(conv_bn_act(32, 64, 3, 2), conv_bn_act(64, 64))
            self.head = nn.Conv2d(64, 8, 1)

        def forward(self, x):
            x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
            return self.head(self.body(self.conv(x)))
    return Net(), image(64)


@spec("hand_norms", "hand", "GroupNorm(4,32), InstanceNorm2d(affine), LayerNorm over features; input 64x64")
def _norms():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.gn = nn.Conv2d(3, 32, 3, 2, 1), nn.GroupNorm(4, 32)
            self.c2, self.inorm = nn.Conv2d(32, 48, 3, 2, 1), nn.InstanceNorm2d(48, affine=True)
            self.ln, self.fc = nn.LayerNorm(48), nn.Linear(48, 10)

        def forward(self, x):
            x = F.relu(self.gn(self.c1(x)))
            x = F.relu(self.inorm(self.c2(x)))
            return self.fc(self.ln(x.mean((2, 3))))
    return Net(), image(64)


@spec("hand_rmsnorm_mlp", "hand", "Manual RMSNorm (x * rsqrt(mean(x^2)+eps) * w) -> Linear-SiLU-Linear residual "
      "blocks; input 1x8x64")
def _rms():
    class RMSNorm(nn.Module):
        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.w, self.eps = nn.Parameter(torch.ones(d)), eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(64)
            self.mlp = nn.Sequential(nn.Linear(64, 192, bias=False), nn.SiLU(), nn.Linear(192, 64, bias=False))

        def forward(self, x):
            return x + self.mlp(self.norm(x))
    return nn.Sequential(Block(), Block(), RMSNorm(64), nn.Linear(64, 16)), {"input": torch.randn(1, 8, 64)}


# ================================================================================================ export
def export(sp: Spec, exporter: str, model: nn.Module, inputs: dict[str, torch.Tensor]) -> onnx.ModelProto:
    args = tuple(inputs.values())
    names = list(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            import io
            buf = io.BytesIO()
            dyn = {k: v for k, v in sp.dynamic.items()} or None
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=sp.legacy_opset, input_names=names,
                              output_names=sp.outputs, dynamic_axes=dyn, do_constant_folding=True)
            return onnx.load_from_string(buf.getvalue())
        dyn_shapes = None
        if sp.dynamic:
            dims = {}
            import inspect
            params = list(inspect.signature(model.forward).parameters)
            dyn_shapes = {}
            for p, n in zip(params, names, strict=False):
                ax = sp.dynamic.get(n)
                if ax:
                    dyn_shapes[p] = {a: dims.setdefault(s, torch.export.Dim(s, min=1, max=128 if s != "batch"
                                                                                   else 64))
                                     for a, s in ax.items()}
                else:
                    dyn_shapes[p] = None
        prog = torch.onnx.export(model, args, None, dynamo=True, input_names=names, output_names=sp.outputs,
                                 dynamic_shapes=dyn_shapes, external_data=False, verbose=False)
        return prog.model_proto


def drop_bulky_node_metadata(model: onnx.ModelProto) -> None:
    """Remove the dynamo exporter's per-node stack traces and FX dumps (local paths, most of the file size);
    the module scopes (``namespace``, ``pkg.torch.onnx.name_scopes``, ``class_hierarchy``) stay."""
    bulky = {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"}
    from corpus_tools import _graphs
    for g in _graphs(model.graph):
        for n in g.node:
            keep = [(p.key, p.value) for p in n.metadata_props if p.key not in bulky]
            if len(keep) != len(n.metadata_props):
                del n.metadata_props[:]
                for k, v in keep:
                    n.metadata_props.add(key=k, value=v)


def describe_inputs(model: onnx.ModelProto, sp: Spec, inputs: dict[str, torch.Tensor]) -> list[dict]:
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        low, high = sp.ranges.get(vi.name, (None, None))
        if low is None and dtype.startswith("float"):
            low, high = -1.0, 1.0
        entry = {"name": vi.name, "shape": shape, "dtype": dtype, "low": low, "high": high}
        if any(isinstance(s, str) for s in shape) and vi.name in inputs:
            entry["example_shape"] = list(inputs[vi.name].shape)
        out.append(entry)
    return out


def verify(path: Path, entry: dict) -> float:
    """Refill, check, run once in onnxruntime; return the run time in ms."""
    import onnxruntime as ort
    m = refill_weights(onnx.load(str(path)), seed=0)
    onnx.checker.check_model(m)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = make_inputs(entry, seed=0)
    sess.run(None, feeds)  # warm-up
    t = time.perf_counter()
    outs = sess.run(None, feeds)
    ms = (time.perf_counter() - t) * 1000
    for o in outs:
        if np.issubdtype(np.asarray(o).dtype, np.floating) and not np.all(np.isfinite(o)):
            raise RuntimeError("non-finite output after refill")
    return ms


def first_line(e: BaseException) -> str:
    import re
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(e).__name__}: {e}").strip()  # no ANSI colours
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:400]
    return type(e).__name__


def load_manifest() -> dict:
    if MANIFEST.exists():
        with open(MANIFEST, encoding="utf-8") as f:
            return json.load(f)
    return {"models": [], "failed": []}


def save_manifest(man: dict) -> None:
    order = {s.name: i for i, s in enumerate(SPECS)}
    key = lambda e: (order.get(e["name"], 10 ** 6), e["name"], e["exporter"] != "legacy")  # noqa: E731
    man["models"].sort(key=key)
    man["failed"].sort(key=key)
    man["format"] = 1
    man["notes"] = ("Weights are stripped (graphprune.stripped metadata); load with "
                    "models/corpus_tools.py: refill_weights(onnx.load(file), seed). Input shape entries are "
                    "ints or symbolic dim names; example_shape is the size used at export. low/high: value range "
                    "(inclusive for integer inputs, [low, high) for float inputs).")
    man["generator"] = {"script": "models/build_corpus.py", "seed": SEED, "torch": torch.__version__,
                        "onnx": onnx.__version__}
    tmp = MANIFEST.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:  # one line per entry: readable, small diffs
        head = {k: v for k, v in man.items() if k not in ("models", "failed")}
        f.write("{\n")
        for k, v in head.items():
            f.write(f" {json.dumps(k)}: {json.dumps(v)},\n")
        for key in ("models", "failed"):
            rows = ",\n".join("  " + json.dumps(e) for e in man[key])
            f.write(f' "{key}": [\n{rows}\n ]' if rows else f' "{key}": []')
            f.write(",\n" if key == "models" else "\n")
        f.write("}\n")
    os.replace(tmp, MANIFEST)


def build_one(sp: Spec, exporters: list[str], man: dict, skip_existing: bool) -> None:
    todo = [e for e in exporters if e in sp.exporters]
    if skip_existing:
        have = {(e["name"], e["exporter"]) for e in man["models"] + man["failed"]}
        todo = [e for e in todo if (sp.name, e) not in have
                or ((sp.name, e) in {(m["name"], m["exporter"]) for m in man["models"]}
                    and not (OUT_DIR / f"{sp.name}.{e}.onnx").exists())]
    if not todo:
        print(f"{sp.name:28s} skipped (exists)", flush=True)
        return
    t0 = time.perf_counter()
    try:
        torch.manual_seed(SEED)
        model, inputs = sp.build()
        model.eval()
    except Exception as e:  # noqa: BLE001
        for ex in todo:
            _record_failure(man, sp, ex, f"build: {first_line(e)}")
        print(f"{sp.name:28s} BUILD FAILED {first_line(e)}", flush=True)
        return
    for ex in todo:
        t = time.perf_counter()
        fname = f"{sp.name}.{ex}.onnx"
        path = OUT_DIR / fname
        try:
            proto = export(sp, ex, model, inputs)
            drop_bulky_node_metadata(proto)
            proto.doc_string = f"graphprune corpus: {sp.source}"
            for k, v in (("graphprune.corpus_name", sp.name), ("graphprune.exporter", ex)):
                proto.metadata_props.add(key=k, value=v)
            stripped = strip_weights(proto)
            entry = {
                "name": sp.name, "file": fname, "family": sp.family, "exporter": ex,
                "opset": next((o.version for o in stripped.opset_import if o.domain in ("", "ai.onnx")), None),
                "inputs": describe_inputs(stripped, sp, inputs),
                "outputs": [o.name for o in stripped.graph.output],
                "nodes": len(stripped.graph.node),
                "source": sp.source,
            }
            onnx.save(stripped, str(path))
            entry["size_bytes"] = path.stat().st_size
            entry["params"] = int(sum(int(np.prod(t.dims)) for t in stripped.graph.initializer))
            entry["ort_ms"] = round(verify(path, entry), 2)
        except Exception as e:  # noqa: BLE001
            if path.exists():
                path.unlink()
            _record_failure(man, sp, ex, first_line(e))
            print(f"{sp.name:28s} {ex:6s} FAILED after {time.perf_counter() - t:6.1f}s: {first_line(e)}",
                  flush=True)
            if os.environ.get("CORPUS_TRACEBACK"):
                traceback.print_exc()
            save_manifest(man)
            continue
        man["failed"] = [f for f in man["failed"] if (f["name"], f["exporter"]) != (sp.name, ex)]
        man["models"] = [m for m in man["models"] if (m["name"], m["exporter"]) != (sp.name, ex)] + [entry]
        save_manifest(man)
        print(f"{sp.name:28s} {ex:6s} ok {time.perf_counter() - t:6.1f}s  opset {entry['opset']:>2}  "
              f"{entry['nodes']:5d} nodes  {entry['size_bytes'] / 1024:7.1f} KiB  ort {entry['ort_ms']:.1f} ms",
              flush=True)
    print(f"{sp.name:28s} total {time.perf_counter() - t0:.1f}s", flush=True)


def _record_failure(man, sp, ex, msg):
    man["models"] = [m for m in man["models"] if (m["name"], m["exporter"]) != (sp.name, ex)]
    man["failed"] = [f for f in man["failed"] if (f["name"], f["exporter"]) != (sp.name, ex)]
    man["failed"].append({"name": sp.name, "family": sp.family, "exporter": ex, "error": msg})
    stale = OUT_DIR / f"{sp.name}.{ex}.onnx"
    if stale.exists():
        stale.unlink()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[],
                    help="comma-separated model names (or substrings with --match); repeatable")
    ap.add_argument("--family", action="append", default=[], help="torchvision, timm, transformers, hand")
    ap.add_argument("--exporter", choices=["legacy", "dynamo", "both"], default="both")
    ap.add_argument("--skip-existing", action="store_true", help="keep models already in the manifest")
    ap.add_argument("--list", action="store_true", help="list the model names and exit")
    a = ap.parse_args(argv)
    if a.list:
        for s in SPECS:
            print(f"{s.name:28s} {s.family:13s} {s.source}")
        return 0
    only = {n.strip() for x in a.only for n in x.split(",") if n.strip()}
    unknown = only - {s.name for s in SPECS}
    if unknown:
        ap.error(f"unknown model(s): {', '.join(sorted(unknown))} (see --list)")
    specs = [s for s in SPECS if (not only or s.name in only) and (not a.family or s.family in a.family)]
    exporters = ["legacy", "dynamo"] if a.exporter == "both" else [a.exporter]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _vision()  # before transformers too: it may import torchvision lazily
    man = load_manifest()
    start = time.perf_counter()
    for sp in specs:
        build_one(sp, exporters, man, a.skip_existing)
    save_manifest(man)
    size = sum(p.stat().st_size for p in OUT_DIR.glob("*.onnx"))
    print(f"done in {time.perf_counter() - start:.0f}s: {len(man['models'])} files, {len(man['failed'])} failed, "
          f"{size / 2 ** 20:.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
