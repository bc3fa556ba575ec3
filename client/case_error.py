"""The error of one case (a manifest row) that keeps it out while the other cases go on."""

from __future__ import annotations

from radfed.shared.errors import RadfedError


class CaseError(RadfedError):
    """One case cannot be extracted; ``reason`` is one line and has no traceback.

    Parameters
    ----------
    reason : str
        Human-readable reason.
    role : str
        Which of the case's files the reason is about: ``"image"``, ``"mask"`` or the
        manifest column of another mask (``"mask_reader2"``, ``"mask_repeat"``).
    file : str, optional
        The file inside a DICOM folder the reason is about (its name), when there is one.
    """

    def __init__(self, reason: str, role: str = "image", file: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.role = role
        self.file = file

    def __reduce__(self):  # keep role and file across worker processes
        return (type(self), (self.reason, self.role, self.file))
