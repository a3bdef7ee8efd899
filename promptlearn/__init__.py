"""promptlearn: few-shot tuning of frozen CLIP models (CoOp and baselines) on any open_clip backbone."""
__version__ = "0.1.0"
