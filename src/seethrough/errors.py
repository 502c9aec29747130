"""The exceptions seethrough raises.

Every error the library raises on its own account derives from
:class:`SeethroughError`, so ``except seethrough.SeethroughError`` catches all
of them.  Where an error is also naturally an ``AttributeError``,
``ValueError``, ``TypeError`` or ``NameError`` it derives from that too, so
code written against plain Python or PyTorch keeps working; where nnsight
0.8.1 raises a builtin for the same misuse (``ValueError`` for an invoke
inside an invoke, or a module value read outside a trace), seethrough's error
is that builtin as well, so nnsight code's ``except`` clauses still catch it.  Exceptions raised by the
user's own code inside a trace are never wrapped: they keep their type.

Messages follow one pattern: what was wrong, where in the user's code
(``file:line``), and what to do about it.
"""

from __future__ import annotations


class SeethroughError(Exception):
    """Root of every error raised by seethrough itself."""


class NotInTraceError(SeethroughError, ValueError):
    """A module value (``.output``, ``.input``, ...) was read outside a trace
    (a ``ValueError`` too, as nnsight raises)."""


class MissedProviderError(SeethroughError):
    """A value was asked for that the model never provided: the forward pass
    ended without reaching it (the module did not run, or had already run).

    nnsight code catches it as ``Mediator.MissedProviderError``; an
    :class:`OutOfOrderError` is one (the module ran before the request)."""


class OutOfOrderError(MissedProviderError):
    """A value was asked for after the forward (or backward) pass had gone past it."""


class ModuleNotCalledError(OutOfOrderError):
    """A value of a module the model never called in this forward pass (so not
    a question of order).  nnsight 0.8.1 raises its ``OutOfOrderError`` here,
    so this is one: ``except OutOfOrderError`` written for nnsight catches it."""


class ModulePathError(SeethroughError, AttributeError):
    """A module path that does not exist in the wrapped model."""


class EnvoyClassError(SeethroughError, TypeError):
    """``envoys=`` names something that is not an Envoy subclass, or keys it by
    something that is neither a module type nor a path."""


# Misuse that plain Python would report as a TypeError, ValueError, ... : the
# error is that builtin too, so ``except TypeError`` keeps working.
class UsageTypeError(SeethroughError, TypeError):
    """An argument, or an assigned value, of a type seethrough does not take."""


class UsageValueError(SeethroughError, ValueError):
    """An argument value seethrough cannot use."""


class UsageAttributeError(SeethroughError, AttributeError):
    """An attribute that cannot be set or read that way (the message says which works)."""


class UsageKeyError(SeethroughError, KeyError):
    """A key that is not there (the message says which keys are)."""


class UsageIndexError(SeethroughError, IndexError):
    """An index out of range (the message says the range)."""


class ShapeMismatchError(SeethroughError, ValueError):
    """An assigned value does not have the shape of the value it replaces."""


class AssignTypeError(ShapeMismatchError, TypeError):
    """An assigned value of a type that cannot replace the value (a string for
    a tensor): a ``TypeError`` too, as the forward would raise under nnsight."""


class InvokeError(SeethroughError, ValueError):
    """``tracer.invoke`` used in a way that cannot be batched or scheduled (an
    invoke inside an invoke, a trace without input, a barrier not reached): a
    ``ValueError`` too, as nnsight raises."""


class BatchError(SeethroughError, ValueError):
    """The inputs of several invokes cannot be put into one batch."""


class LanguageModelError(SeethroughError, ValueError):
    """A language model could not be loaded, or an input or setting was refused."""


class InputTypeError(LanguageModelError, TypeError):
    """An input of a type a language model does not take (a ``TypeError`` too)."""


class TraceSourceError(SeethroughError):
    """The source of a ``with`` block could not be found or cannot run as a trace body."""


class NotSavedError(SeethroughError, NameError):
    """A value from a trace was used afterwards without having been saved."""


class WeightsModifiedError(SeethroughError):
    """A model weight was modified in place inside a trace."""


class CrossInvokeError(SeethroughError, NameError):
    """A name shared between invokes could not be resolved in one forward pass."""


class SourceError(SeethroughError):
    """``.source`` cannot show or instrument the operations of a forward (or function)."""
