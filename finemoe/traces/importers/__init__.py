"""Importers of foreign routing logs into trace format v1."""

from finemoe.traces.importers.jsonl import FieldMap, ImportReport, import_jsonl

__all__ = ["FieldMap", "ImportReport", "import_jsonl"]
