"""The messages for a value a body asked for and never got.

Why a module's value did not come — the model never called the module, it
had already run (a read out of order), or the run had already finished —
written for the user, naming the line that asked (see
``Interleaver._not_provided`` and ``Interleaver.request``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._frames import describe_frame, user_frame, where_user_is

if TYPE_CHECKING:
    from .contract import ModuleHandle


def never_called_message(envoy: "ModuleHandle", kind: str, frame: Any) -> str:
    """A value asked for (at ``frame``) of a module the forward never called."""
    path = envoy._display_path() if envoy is not None else "the model"
    where = describe_frame(user_frame(frame))
    at = f" (at {where})" if where else ""
    return (
        f"`{path}.{kind}` was asked for{at}, but the model never called `{path}` in this forward pass, so "
        "no value was provided. Check that the model uses this module for this input (`print(model)` shows "
        "the tree; a module attached to the model but not used by its forward runs only when a body calls "
        "it with `hook=True`)."
    )


def after_result_message(envoy: "ModuleHandle", kind: str, waited: tuple[str, str]) -> str:
    """A value asked for after this body waited for the end of the run."""
    what, where = waited
    path = envoy._display_path() if envoy is not None else "the model"
    return (
        f"`{path}.{kind}` was asked for ({where_user_is()}), but the model had already finished: this "
        f"body read `{what}` earlier ({where}), which waits until the whole run (all of generation) "
        f"has ended, so every value of the forward passes was gone by this line. Read `{what}` after "
        "the loop over steps and after the module values, e.g.\n"
        "    for step in tracer.iter[:]:\n"
        f"        ...  # {path}.{kind} here\n"
        f"    out = {what}.save()"
    )


def too_late_message(
    envoy: "ModuleHandle",
    kind: str,
    frame: Any,
    finished: bool = False,
    ran_before: bool = False,
    waited_for: str | None = None,
) -> str:
    """A value asked for (at ``frame``) after its module had run, or after
    the forward had ``finished``; ``waited_for``: what the body waited for
    before, should that explain it."""
    path = envoy._display_path() if envoy is not None else "the model"
    accessor = "output" if kind == "output" else "input"
    where = describe_frame(user_frame(frame))
    at = f" (at {where})" if where else ""
    if finished:
        reason = "the forward pass had already finished"
    elif ran_before:
        reason = f"`{path}` had already run before that line, and did not run again"
    else:
        reason = (
            f"`{path}` did not run after that point of the forward pass: either it had already "
            "run (the forward had gone past it), or the model does not call it for this input"
        )
    message = (
        f"`{path}.{accessor}` was asked for{at}, but {reason}. Within one invoke, read "
        "module values in the order the model runs them (an output after its inputs, "
        "earlier layers before later ones), or call `tracer.cache(...)` first to read "
        "values after their module ran."
    )
    if waited_for is not None:
        message += " " + waited_for
    return message
