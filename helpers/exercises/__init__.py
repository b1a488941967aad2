"""Every lesson's exercise checks, registered with ``helpers.checks.exercise`` on import."""

from . import (
    lesson00,  # noqa: F401
    lesson01,  # noqa: F401
    lesson02,  # noqa: F401
    lesson03,  # noqa: F401
    lesson04,  # noqa: F401
    lesson05,  # noqa: F401
    lesson06,  # noqa: F401
    lesson07,  # noqa: F401
    lesson08,  # noqa: F401
    lesson09,  # noqa: F401
    lesson10,  # noqa: F401
    lesson11,  # noqa: F401
    lesson12,  # noqa: F401
)
