"""Data: parsers, tokenised samples, accumulation-aware sampling, collation into `Batch`, the DataModules."""
