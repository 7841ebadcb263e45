"""hookscope: look inside any pre-trained PyTorch model with one normal forward pass.

>>> import torch, hookscope as hs
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
>>> with hs.record(model, ["0", "1"]) as rec:
...     _ = model(torch.randn(5, 4))
>>> rec["1"].tensor.shape
torch.Size([5, 3])
"""

from .errors import (
    AmbiguousCallError,
    CallCountError,
    CaptureModifiedError,
    HookscopeError,
    ModuleSelectionError,
    NotRecordedError,
    UnsortError,
)
from .recorder import Recorder, record
from .recording import Capture, Recording
from .select import resolve_modules
from .summarize import format_summary, summary

__version__ = "0.1.0"

__all__ = [
    "AmbiguousCallError",
    "CallCountError",
    "Capture",
    "CaptureModifiedError",
    "HookscopeError",
    "ModuleSelectionError",
    "NotRecordedError",
    "Recorder",
    "Recording",
    "UnsortError",
    "__version__",
    "format_summary",
    "record",
    "resolve_modules",
    "summary",
]
