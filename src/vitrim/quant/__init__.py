"""ONNX export and int8 / 4-bit quantization through ONNX Runtime (the ``vitrim[onnx]`` extra).

``import vitrim.quant`` works without the extra; onnx and onnxruntime load on first use.
"""

from vitrim.quant.bench import measure_onnx
from vitrim.quant.check import Agreement
from vitrim.quant.errors import (CalibrationError, ExportCheckError, ExportError, MissingDependencyError,
                                 MissingMetadataError, OnnxFileError, QuantConfigError, QuantizationError)
from vitrim.quant.export import ExportResult, export
from vitrim.quant.metadata import Preprocessing
from vitrim.quant.quantize import CALIBRATORS, SCHEMES, QuantizeResult, quantize
from vitrim.quant.runtime import OnnxModel

__all__ = ["Agreement", "CALIBRATORS", "CalibrationError", "ExportCheckError", "ExportError", "ExportResult",
           "MissingDependencyError", "MissingMetadataError", "OnnxFileError", "OnnxModel", "Preprocessing",
           "QuantConfigError", "QuantizationError", "QuantizeResult", "SCHEMES", "export", "measure_onnx",
           "quantize"]
