"""promptlearn: few-shot tuning of frozen CLIP models (CoOp and baselines) on any open_clip backbone."""
__version__ = "0.1.0"

# nothing heavy is imported here: the registries (methods and their config sections, datasets, protocols
# and their recipes) fill at their first read (promptlearn.registry), torch with the modules that need it
