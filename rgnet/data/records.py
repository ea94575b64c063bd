"""The typed records every dataset layout yields, and the error type for bad data.

Every reader (MAD, Ego4D-NLQ, native) produces the same :class:`QueryRecord` rows; seconds appear here and at the
evaluation boundary only (inside the model spans are window-relative ``(center, width)``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueryRecord:
    """One natural-language query with its single ground-truth moment."""

    query_id: str  # unique within a split (Ego4D: "<annotation_uid>_<index in language_queries>")
    video_id: str  # the long video the query is about (MAD: movie id; Ego4D: clip_uid)
    query: str  # the sentence
    start_sec: float  # ground-truth moment, seconds from the video start
    end_sec: float
    duration_sec: float  # video duration in seconds
    video_key: str  # key of the video's features in the video feature store
    query_key: str  # key of the query's token features in the text feature store


class DataError(ValueError):
    """Bad input data. The message names the file, the record and the field, and how to fix it."""

    def __init__(
        self,
        file: object,
        problem: str,
        *,
        record: object | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        where = f"{file}"
        if record is not None:
            where += f", record {record!r}"
        if field is not None:
            where += f", field '{field}'"
        message = f"{where}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)
        self.file = str(file)
        self.record = record
        self.field = field
        self.problem = problem
