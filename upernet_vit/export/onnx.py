"""ONNX export of the eval model, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..fileio import atomic_write
from ..runs.outputs import refuse_foreign_file
from ..model import UperNetViT
from .program import export_program

logger = logging.getLogger(__name__)

Shape = Tuple[int, int, int, int]
_PROTOBUF_LIMIT = 2**31 - 2**24  # one .onnx file holds < 2 GiB; larger weights go to <file>.data


def _import_onnxruntime():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it, and onnx)
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({err}); "
            "install them with: pip install -e \".[export]\" in the checkout"
        ) from err
    return onnxruntime


WRITTEN_BY = "upernet-vit export"  # metadata_props["written_by"] of every file export_onnx writes


def is_our_export(path: str) -> bool:
    """Whether ``path`` is an ONNX file :func:`export_onnx` wrote (its ``written_by`` metadata)."""
    try:
        import onnx

        return any(p.key == "written_by" and p.value == WRITTEN_BY
                   for p in onnx.load(path, load_external_data=False).metadata_props)
    except Exception:  # not ONNX, unreadable, or onnx missing: not known to be ours
        return False


def check_export_path(path: str) -> None:
    """Refuse, before any work, an output that is a file export did not write (a user's file, a model
    folder's weights, ...) or a ``<file>.data`` beside an output that is not its own."""
    refuse_foreign_file(path, is_our_export, "path", "export")
    data = path + ".data"
    if os.path.lexists(data) and not (os.path.isfile(path) and is_our_export(path)):
        refuse_foreign_file(data, lambda _: False, "path's weights file", "export")


def check_shapes(model: UperNetViT, height: int, width: int, batch: int, dynamic: bool) -> List[Shape]:
    """The inputs ``[B, C, H, W]`` that :func:`export_onnx` compares: the export size and, for a dynamic
    graph, another batch size with H, W that are not multiples of the patch (so the padding runs)."""
    shapes = [(batch, model.in_chans, height, width)]
    if dynamic:
        p, step = model.patch_size, max(1, model.patch_size // 3)
        shapes.append((batch + 1, model.in_chans, (height // p + 1) * p + step, max(p, width - p) + step))
    return shapes


def export_onnx(
    model: UperNetViT,
    path: str | os.PathLike,
    height: int,
    width: int,
    batch: int = 1,
    dynamic: bool = True,
    opset: Optional[int] = None,
    check: bool = True,
    atol: float = 1e-4,
    metadata: Optional[Mapping[str, str]] = None,
) -> Dict[Shape, float]:
    """Write ``model`` (in eval mode) as an ONNX file: input ``image [B, in_chans, H, W]`` float32,
    normalized as for the PyTorch model -> output ``logits [B, num_classes, H, W]``.

    Args:
        model: the model (LoRA on or merged); its train/eval mode is restored afterwards.
        path: the ``.onnx`` file, written atomically and only after the check passed. Weights over
            2 GiB go to ``<file name>.data`` next to it (written first).
        height, width: the size of the traced example; with ``dynamic=False`` the only input size.
            A dynamic export needs more than 2 ViT patches per side, so no map of the example is 1 px.
        batch: the example batch size; with ``dynamic=False`` the only one.
        dynamic: batch, H and W are dynamic axes: one graph for any batch and any H, W > patch/2
            (the PyTorch model's range is H, W >= 1; smaller inputs fail in onnxruntime's reflect Pad).
        opset: ONNX opset version; ``None`` = the exporter's default.
        check: run onnxruntime (CPU) on the file and PyTorch on the same random inputs, at the export size
            and, if dynamic, at a second size (:func:`check_shapes`); ``RuntimeError`` if max |diff| >= ``atol``.
        metadata: strings stored as the ONNX model's ``metadata_props`` (e.g. preprocessing).

    Returns:
        ``{(B, C, H, W): max |onnxruntime - PyTorch|}`` per checked input shape (empty without check).
    """
    ort = _import_onnxruntime()
    stored = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.dtype != torch.float32})
    if stored:
        raise ValueError(
            f"export takes a float32 model, but parameters are stored in {', '.join(stored)} (backbone_dtype): "
            f"onnxruntime's CPU convolutions have no bfloat16 kernels; export model.float() (upernet-vit export "
            f"does this itself)"
        )
    patch = model.patch_size
    smallest = 2 * patch + 1 if dynamic else 1
    if min(height, width) < smallest or batch < 1:
        why = f" (a dynamic export traces more than 2 patches of {patch} px)" if dynamic else ""
        raise ValueError(f"export needs height, width >= {smallest}{why} and batch >= 1, got {height} x {width}, "
                         f"batch {batch}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator) for shape in check_shapes(model, height, width, batch, dynamic)]
    example = inputs[0].to(device)
    if dynamic and batch == 1:  # a size-1 axis is traced as the constant 1; 2 gives the same graph
        example = example.repeat(2, 1, 1, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                export_program(model, example, dynamic=dynamic), opset_version=opset, dynamo=True,
                input_names=["image"], output_names=["logits"], verbose=False,
            )
            expected = [model(x.to(device)).float().cpu() for x in inputs] if check else []
    finally:
        model.train(was_training)
    program.model.metadata_props.update({**(metadata or {}), "written_by": WRITTEN_BY})
    diffs: Dict[Shape, float] = {}

    def write_and_check(tmp: str) -> None:
        import onnx_ir  # the exporter's model representation (an onnxscript dependency)

        large = sum(p.numel() * p.element_size() for p in model.parameters()) > _PROTOBUF_LIMIT
        onnx_ir.save(program.model, tmp, external_data=os.path.basename(path) + ".data" if large else None)
        if not check:
            return
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        for x, ref in zip(inputs, expected):
            (out,) = session.run(None, {"image": x.numpy()})
            if out.shape != tuple(ref.shape):
                raise RuntimeError(f"ONNX output {out.shape} != PyTorch {tuple(ref.shape)} for input {tuple(x.shape)}")
            diffs[tuple(x.shape)] = float((torch.from_numpy(out) - ref).abs().max())
        if not max(diffs.values()) < atol:
            raise RuntimeError(
                f"the ONNX graph of backbone {model.backbone.name!r} differs from PyTorch by max |diff| "
                f"{diffs} (input shape: diff), not < {atol}; {os.fspath(path)!r} was not written"
            )

    atomic_write(os.fspath(path), write_and_check)
    logger.info(
        "wrote %s (%s, opset %s); max |onnxruntime - pytorch| per input shape: %s", os.fspath(path),
        "dynamic batch, height, width" if dynamic else f"fixed input {tuple(inputs[0].shape)}",
        program.model.opset_imports.get("", "default"), diffs or "not checked",
    )
    return diffs
