"""Why the node refused something: an instance, a query, or to start at all.

Deeper layers raise these with a human reason; only the edges turn them into
answers: :mod:`node.handlers` into DIMSE statuses, :mod:`node.cli` into exit codes.
"""


class IngestError(Exception):
    """An instance was refused; ``str(exc)`` says why, without patient data."""


class UnreadableDataset(IngestError):
    """The bytes are not a complete, parseable DICOM data set."""


class InvalidIdentifier(IngestError):
    """A required UID is missing or is not a UID."""


class DatasetMismatch(IngestError):
    """The data set is not the instance the request announced."""


class InstanceTooLarge(IngestError):
    """The instance exceeds ``dicom.max_instance_bytes``."""


class StorageUnavailable(IngestError):
    """The data directory cannot take the file now (full, unwritable, missing)."""


class CatalogUnavailable(IngestError):
    """The catalog database cannot record the instance now."""


class QueryError(Exception):
    """A C-FIND identifier the node cannot answer; ``str(exc)`` says why."""


class IdentifierMismatch(QueryError):
    """The identifier does not fit the information model: no or an unknown level, or a
    unique key of a level above the query level missing or not single-valued."""


class UnprocessableQuery(QueryError):
    """A key's value cannot be matched (a malformed date range, a list where one value goes)."""


class StartupError(Exception):
    """The node cannot start; the message names the setting involved."""
