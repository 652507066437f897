"""cellmtl: predict from one microscopy image whether cells are infected and how long since onset."""

__version__ = "0.1.0"
