"""dreamfocus: a crisp subject on a soft, painterly background, for whole photo libraries."""

__version__ = "0.1.0"
