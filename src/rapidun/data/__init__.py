"""Data: loaders with validation and stable ids, the one prompt format, the backdoor scenario builder."""

from rapidun.data.records import Record, load_records
from rapidun.data.template import Batch, Encoded, collate, encode, format_prompt

__all__ = ["Batch", "Encoded", "Record", "collate", "encode", "format_prompt", "load_records"]
