"""mmpfl_core: the compute core of the mmpfl teaching kit."""

__version__ = "0.1.0"
