"""Import helpers for scripts that build models with PyTorch (the benchmarks). Not part of the package.

The PyPI torchvision wheel is a CUDA build and fails to import with the CPU torch wheel ("operator
torchvision::nms does not exist"); transformers imports torchvision too. Defining the two missing operator
schemas first lets both import (models work; torchvision.ops nms/roi_align do not).
"""
_done = False


def install_torchvision_shim() -> None:
    global _done
    if _done:
        return
    import torch
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        install_torchvision_shim._lib = lib  # keep the library object alive
    except RuntimeError:
        pass  # already defined (a real torchvision build, or another shim)
    _done = True
