"""Traces: the schema, reader/writer, model profiles, importers, prompt sources and the collector."""

from finemoe.traces.geometry import Geometry
from finemoe.traces.schema import SCHEMA_VERSION, RequestInfo, Trace

__all__ = ["Geometry", "RequestInfo", "SCHEMA_VERSION", "Trace"]
