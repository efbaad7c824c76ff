"""The exception hierarchy users see.

Every failure a user can cause (bad recipe, missing file, unsupported architecture, ...) is a
`CompressorError` whose message names the file/field and says how to fix it. The CLI turns
these into one paragraph and an exit code, with no traceback unless `-v`. Anything else that
escapes is a bug in compressor, and is shown as such.
"""

from __future__ import annotations


class CompressorError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message}\nFix: {self.fix}" if self.fix else self.message


class InputError(CompressorError):
    """A missing or malformed input file: model folder, data file, calibration report."""


class CheckpointError(InputError):
    """Checkpoint files that cannot be rewritten as asked: a corrupt safetensors header, an
    index naming a missing shard, or block tensors not where the family's name template says."""


class InsufficientSpaceError(CompressorError):
    """The output's file system has less free space than the files about to be written."""


class RecipeError(CompressorError):
    """A recipe that does not parse or does not validate; lists every problem at once."""


class UnsupportedArchitectureError(CompressorError):
    """A model family compressor has no adapter for."""


class PlanError(CompressorError):
    """A recipe that cannot be applied to this model (index out of range, removes every block...)."""


class OutputExistsError(CompressorError):
    """The output folder exists and ``--overwrite`` was not given."""


class SurgeryError(CompressorError):
    """A pruned model broke an invariant; nothing was written."""

    exit_code = 1


class VerificationError(CompressorError):
    """An export did not reproduce the in-memory model; nothing was written."""

    exit_code = 1


class PushRefusedError(CompressorError):
    """A folder that is not fit to publish: unverified, changed since export, or gate-failed."""

    exit_code = 1


class HubError(CompressorError):
    """The Hugging Face Hub could not be used: no token, a rejected one, no network, no rights."""
