"""`Role`: the one place the names of an engine dir's models are spelled.

An engine dir holds up to four models, each under a role: the router, the small and the large pose model, and a
person detector. Roles travel through the manifest (JSON), the CLIs' flags, the service's answers and the run
summaries as their plain names, so `Role` is a `str` enum: `Role.SMALL == "small"`, and `json.dumps` writes it as
"small". Everywhere else in the package a role is written `Role.X`, never as a string literal
(`tests/test_architecture.py` checks it), so a reader can find every use of a role by searching for it.
"""

from __future__ import annotations

from enum import Enum

from dynpose.errors import DynPoseError


class Role(str, Enum):
    ROUTER = "router"
    SMALL = "small"
    LARGE = "large"
    DETECTOR = "detector"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: object, where: str = "role", allowed: tuple[Role, ...] | None = None) -> Role:
        """A role from its name; anything else is a one-line error naming the accepted names."""
        ok = allowed or tuple(cls)
        if isinstance(text, Role) and text in ok:
            return text
        if isinstance(text, str):
            for r in ok:
                if text.strip().lower() == r.value:
                    return r
        raise DynPoseError(f"{where}: {text!r} is not a role; use one of {', '.join(r.value for r in ok)}")


# The pose models, in the order summaries list them.
POSE_ROLES: tuple[Role, ...] = (Role.SMALL, Role.LARGE)
# The models an engine dir's manifest may hold besides the detector.
MODEL_ROLES: tuple[Role, ...] = (Role.ROUTER, Role.SMALL, Role.LARGE)
ROLE_NAMES: tuple[str, ...] = tuple(r.value for r in Role)
