"""Exceptions. Every error the user can cause is a one-line message naming the problem."""


class TestbedError(Exception):
    """Base class of every error this package raises on purpose."""

    __test__ = False  # not a pytest test class, despite the name


class SpecError(TestbedError, ValueError):
    """Bad input in a topology or link specification; raised before anything is created."""


class CapabilityError(TestbedError):
    """The kernel lacks a feature and there is no fallback."""


class CommandError(TestbedError):
    """A subprocess failed; carries argv, exit code and output."""

    def __init__(self, argv, rc, out="", err=""):
        self.argv, self.rc, self.out, self.err = list(argv), rc, out, err
        detail = (err or out or "").strip().splitlines()
        tail = detail[-1] if detail else ""
        super().__init__(f"{' '.join(map(str, self.argv))!s} exited {rc}: {tail}")
