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


class NotSearchable(UnprocessableQuery):
    """A similarity request names something the node cannot search from: not stored, not
    analysed yet, or similarity search is off."""


class NotPermitted(Exception):
    """The calling AE asked for a service ``dicom.permissions`` does not grant it."""


class RetrieveError(Exception):
    """A C-MOVE or C-GET the node cannot carry out; ``str(exc)`` says why."""


class UnknownDestination(RetrieveError):
    """The Move Destination is not an AE title listed in ``[[destinations]]``."""


class TooManyMatches(RetrieveError):
    """More instances match than one retrieval can count (its counters are 16-bit)."""


class DestinationUnavailable(RetrieveError):
    """The move destination cannot be reached, or refused the association."""


class StartupError(Exception):
    """The node cannot start; the message names the setting involved."""


class ModelConfigError(StartupError):
    """``model.*`` names no usable model: missing, corrupt or mismatched bundle, or a
    setting the bundle cannot honour. A configuration error: the message names the key."""


class NoModelConfigured(ModelConfigError):
    """``model.bundle`` is not set: the node stores and serves, workers have nothing to do."""


class TlsConfigError(StartupError):
    """``tls.*`` names a file the node cannot use: missing, unreadable, not PEM, an encrypted
    key, or a key that does not match its certificate. A configuration error: the message
    names the key."""
