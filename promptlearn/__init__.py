"""promptlearn: few-shot tuning of frozen CLIP models (CoOp and baselines) on any open_clip backbone."""
__version__ = "0.1.0"

# the registries (methods and their config sections, datasets, protocols and their recipes) are complete once
# promptlearn is imported
from promptlearn import data, methods, protocols  # noqa: E402,F401
