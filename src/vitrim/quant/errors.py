"""Errors of the export and quantization path; all are VitrimErrors (the CLI exits 2)."""

from vitrim.errors import ConfigError, DataError, ModelFileError, VitrimError


class MissingDependencyError(VitrimError):
    """onnx / onnxruntime / onnxscript are not installed."""


class OnnxFileError(ModelFileError):
    """A file is missing, is not an ONNX model, or ONNX Runtime cannot load it."""


class MissingMetadataError(OnnxFileError):
    """An ONNX model carries no vitrim preprocessing metadata and none was given."""


class ExportError(VitrimError):
    """Neither exporter could turn the model into ONNX."""


class ExportCheckError(ExportError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""


class QuantConfigError(ConfigError):
    """An unknown scheme or calibrator, or an option that does not fit the scheme."""


class CalibrationError(DataError):
    """The calibration set is empty, smaller than asked, or does not fit the model."""


class QuantizationError(VitrimError):
    """ONNX Runtime's quantizer failed on the model."""
