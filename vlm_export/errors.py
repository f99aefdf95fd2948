"""Exceptions with messages meant for users: what went wrong and how to fix it.

The CLIs print ``str(error)`` as one line and exit non-zero; anything else is a bug and keeps its traceback.
"""


class VLMExportError(Exception):
    """Base class of every error a user can act on."""


class InputError(VLMExportError):
    """Bad user input: unreadable image, unsupported message content, prompt too long."""


class ManifestError(VLMExportError):
    """An exported folder the runtime cannot use (missing files, unknown schema version)."""


class ExportError(VLMExportError):
    """The exporter cannot handle this model or the export failed verification."""


class UnsupportedModelError(ExportError):
    """The model's family is not one vlm-export knows."""
