"""Errors a user can act on. The command line prints them without a traceback."""


class RadfedError(Exception):
    """Base class for every error radfed raises on purpose."""


class StudyConfigError(RadfedError):
    """The study file is missing, malformed or inconsistent."""


class SiteDataError(RadfedError):
    """A site's data folder cannot be used at all (single bad rows are reported instead)."""


class PrivacyRefusal(RadfedError):
    """A site refuses to answer because its reply would break a privacy rule.

    ``rule`` names the rule (see :data:`radfed.shared.privacy.RULES`).
    """

    def __init__(self, message: str, rule: str = "") -> None:
        super().__init__(message)
        self.rule = rule


class FederationError(RadfedError):
    """The sites of a study cannot be combined: a mismatch, a refusal or a missing site."""
