"""The ingest's one exception type."""

from __future__ import annotations

from common.errors import UserError


class IngestError(UserError):
    """A study that cannot be ingested: the message names the patient, the series folder and the problem.

    Attributes:
        patient: patient/case id (or None).
        series: series folder (relative to the study, or None when the problem is study-wide).
        problem: the problem alone, without the patient and series prefix.
    """

    def __init__(self, problem: str, patient: str | None = None, series: str | None = None):
        self.problem = str(problem)
        self.patient = patient
        self.series = series
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.patient:
            parts.append(f"patient {self.patient}")
        if self.series:
            parts.append(f"series {self.series}")
        return (": ".join(parts) + ": " if parts else "") + self.problem

    def with_context(self, patient: str | None = None, series: str | None = None) -> "IngestError":
        """A copy with the patient/series filled in where they were missing."""
        err = IngestError(self.problem, self.patient or patient, self.series or series)
        err.__cause__ = self.__cause__
        return err

    def __reduce__(self):  # picklable across worker processes
        return (IngestError, (self.problem, self.patient, self.series))
