"""Export the eval model: ``torch.export`` programs and ONNX files with dynamic batch, H and W.

Export-only formulations (size-generic twins of the eager steps a trace would fix to the example's size)
live here, not in the core: see :mod:`upernet_vit.export.formulations`.
"""
from .formulations import export_formulations
from .onnx import check_shapes, export_onnx
from .program import export_program

__all__ = ["check_shapes", "export_formulations", "export_onnx", "export_program"]
