"""MosaicBERT model (filled in by the Model issue)."""
