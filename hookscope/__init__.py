"""hookscope: look inside any pre-trained PyTorch model with one normal forward pass.

>>> import torch, hookscope as hs
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
>>> with hs.record(model, ["0", "1"]) as rec:
...     _ = model(torch.randn(5, 4))
>>> rec["1"].tensor.shape
torch.Size([5, 3])
"""

from .analysis import (
    NeighborhoodOverlap,
    cosine,
    cosine_matrix,
    linear_cka,
    nearest_neighbors,
    neighborhood_change,
    neighborhood_overlap,
    rsa,
    similarity_matrix,
)
from .capture import Capture
from .dataset import record_dataset
from .dataset_view import DatasetView, open_dataset
from .edit import CallInfo, at, patch
from .errors import (
    AmbiguousCallError,
    CallCountError,
    CaptureModifiedError,
    DatasetError,
    HookscopeError,
    InputError,
    InputTypeError,
    ModuleSelectionError,
    NotRecordedError,
    RecordingFileError,
    UnsortError,
    UnsupportedModelError,
)
from .frame import recording_vectors
from .io import allow_class, load, save
from .pooling import last_state, masked_pool
from .recorder import Recorder, record
from .recording import Recording
from .select import resolve_modules
from .summarize import format_summary, summary

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``hs.plot`` without ``import hookscope.plot`` (matplotlib is imported only when a plot
    function is called)."""
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AmbiguousCallError",
    "CallCountError",
    "CallInfo",
    "Capture",
    "CaptureModifiedError",
    "DatasetError",
    "DatasetView",
    "HookscopeError",
    "InputError",
    "InputTypeError",
    "ModuleSelectionError",
    "NeighborhoodOverlap",
    "NotRecordedError",
    "Recorder",
    "Recording",
    "RecordingFileError",
    "UnsortError",
    "UnsupportedModelError",
    "__version__",
    "allow_class",
    "at",
    "cosine",
    "cosine_matrix",
    "format_summary",
    "last_state",
    "linear_cka",
    "load",
    "masked_pool",
    "nearest_neighbors",
    "neighborhood_change",
    "neighborhood_overlap",
    "open_dataset",
    "patch",
    "plot",
    "record",
    "record_dataset",
    "recording_vectors",
    "resolve_modules",
    "rsa",
    "save",
    "similarity_matrix",
    "summary",
]
