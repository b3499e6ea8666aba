"""Errors Ember reports to its user.

Every error a user can cause (bad option, missing or corrupt kernel, no
/dev/kvm) is an ``EmberError`` whose message is one line naming the problem;
the CLI prints it without a traceback and exits non-zero.
"""


class EmberError(Exception):
    """A failure Ember explains in one line to its user."""


class ConfigError(EmberError):
    """The machine configuration asked for something impossible."""
