"""energy-study: orchestration of studies (the ``study`` command)."""

__version__ = "0.1.0"
