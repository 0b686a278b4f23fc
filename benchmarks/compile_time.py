"""End-to-end compile time and pruned-vs-dense onnxruntime latency, measured side by side in one run.

    pip install torch==2.13.0 && pip install -e ".[corpus]"
    python benchmarks/compile_time.py [--models resnet50 bert-base] [--ratio 0.5] [--repeats 20]

Exports ResNet-50 (torchvision, 1x3x224x224) and a BERT-base-sized encoder (transformers BertModel default
config: 12 layers, hidden 768, 12 heads, sequence 128) with random weights, prunes each with graphprune
(timing every pass), then times onnxruntime (all optimisations on, the way users run it) on the dense and the
pruned model, interleaved, and prints medians and ratios. Results go to benchmarks/results/compile_time.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

import graphprune

from torch_env import install_torchvision_shim

RESULTS = Path(__file__).resolve().parent / "results"


def export_resnet50(path: Path) -> dict:
    import torch
    install_torchvision_shim()
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    with torch.no_grad():  # non-degenerate BN statistics and gammas
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"])
    return {"input": x.numpy()}


def export_bert(path: Path) -> dict:
    import torch
    install_torchvision_shim()
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(), add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):  # positional inputs, one tensor out
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, 30000, (1, 128))
    mask = torch.ones(1, 128, dtype=torch.int64)
    torch.onnx.export(Encoder().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"])
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def latency(path_a: str, path_b: str, feed: dict, repeats: int, threads: int) -> tuple[float, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    a = ort.InferenceSession(path_a, opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(path_b, opts, providers=["CPUExecutionProvider"])
    ta, tb = [], []
    for _ in range(3):
        a.run(None, feed)
        b.run(None, feed)
    for _ in range(repeats):  # interleaved, so load on the shared machine hits both alike
        t = time.perf_counter(); a.run(None, feed); ta.append(time.perf_counter() - t)  # noqa: E702
        t = time.perf_counter(); b.run(None, feed); tb.append(time.perf_counter() - t)  # noqa: E702
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet50", "bert-base"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    exporters = {"resnet50": export_resnet50, "bert-base": export_bert}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            src = Path(tmp) / f"{name}.onnx"
            t = time.perf_counter()
            feed = exporters[name](src)
            export_s = time.perf_counter() - t
            t = time.perf_counter()
            pruned, report = graphprune.prune(str(src), ratio=args.ratio, verify=False)
            compile_s = time.perf_counter() - t
            t = time.perf_counter()
            _, report_v = graphprune.prune(str(src), ratio=args.ratio, verify=True, verify_samples=1)
            with_verify_s = time.perf_counter() - t
            out = Path(tmp) / f"{name}.pruned.onnx"
            graphprune.save(pruned, out)
            dense_ms, pruned_ms = latency(str(src), str(out), feed, args.repeats, args.threads)
            nodes = len(onnx.load(str(src), load_external_data=False).graph.node)
            rows.append((name, nodes, export_s, compile_s, with_verify_s, report, dense_ms * 1e3, pruned_ms * 1e3))
            passes = ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
            print(f"{name}: {nodes} nodes, compile {compile_s:.2f} s ({passes}); with verify {with_verify_s:.2f} s; "
                  f"MACs {report.macs_ratio:.3f}x, params {report.params_ratio:.3f}x; "
                  f"ORT dense {dense_ms*1e3:.1f} ms vs pruned {pruned_ms*1e3:.1f} ms "
                  f"(speed-up {dense_ms / pruned_ms:.2f}x)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    lines = [f"# compile time and latency (ratio {args.ratio}, {os.cpu_count()} cores, "
             f"onnxruntime {ort.__version__}, {args.threads} threads, median of {args.repeats})", "",
             "| model | nodes | compile s (no verify) | compile s (verify 1 input) | MACs after/before | "
             "params after/before | ORT dense ms | ORT pruned ms | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for name, nodes, _e, cs, vs, rep, d, pr in rows:
        lines.append(f"| {name} | {nodes} | {cs:.2f} | {vs:.2f} | {rep.macs_ratio:.3f} | {rep.params_ratio:.3f} | "
                     f"{d:.1f} | {pr:.1f} | {d / pr:.2f}x |")
    (RESULTS / "compile_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
