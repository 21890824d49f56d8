"""A mypy plugin that lets chains type-check: a ``Token[T]`` is accepted where ``T`` is expected.

At run time a Token passed to a decorated function (directly, or inside a list, tuple or dict)
is a dependency: the task runs with its value. Typed with ``ParamSpec`` alone, that call is an
error (``Token[str]`` is not a ``str``), and no overload can say "each parameter, or a token of
it" for an arbitrary signature. This plugin rewrites the parameters of a call of a decorated
function (``TaskFunction.__call__`` and ``submit_async``, and ``OperationsCoordinator.submit`` and
``submit_async`` given one) before mypy checks it:

- ``T`` becomes ``T | Token[T]``;
- ``list[T]`` also accepts ``list[Token[T]]`` and a list mixing values and tokens, likewise the
  values of ``dict[K, V]`` and the items of tuples, recursively (what the runtime substitutes);
- an abstract ``Sequence``/``Iterable``/``Collection`` of ``T`` also accepts such a list or
  tuple, a ``Mapping`` such a dict: the runtime substitutes inside those exact types only.

Everything else is checked as written, so ``Token[str]`` where an ``int`` is expected is still an
error. The plugin also checks a ``tags={...}`` dict written in the decorator call against
:class:`tokengate.Tags` (without it mypy accepts any dict there). Enable it in the configuration
of the project that uses tokengate::

    [tool.mypy]
    plugins = ["tokengate.mypy"]
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.nodes import (
    ARG_POS,
    DictExpr,
    DictionaryComprehension,
    ListComprehension,
    ListExpr,
    TypeInfo,
)
from mypy.plugin import FunctionSigContext, MethodSigContext, Plugin
from mypy.types import (
    AnyType,
    CallableType,
    FunctionLike,
    Instance,
    Parameters,
    ParamSpecType,
    ProperType,
    TupleType,
    Type,
    TypedDictType,
    UnionType,
    UnpackType,
    get_proper_type,
)

__all__ = ["TokenGatePlugin", "plugin"]

TOKEN = "tokengate._token.Token"
TASK_FUNCTION = "tokengate._decorator.TaskFunction"
_DECORATOR = "tokengate._decorator.task_token_guard"
_COORDINATOR = "tokengate._coordinator.OperationsCoordinator"
_SUBMITS = frozenset((f"{_COORDINATOR}.submit", f"{_COORDINATOR}.submit_async"))
_HOOKED = frozenset((f"{TASK_FUNCTION}.__call__", f"{TASK_FUNCTION}.submit_async"))
_SEQUENCES = frozenset(
    (
        "typing.Sequence",
        "typing.Iterable",
        "typing.Collection",
        "typing.Container",
        "typing.Reversible",
    )
)
_MAPPINGS = frozenset(("typing.Mapping",))
# Deep enough for any real signature; a recursive type alias stops here instead of looping.
_MAX_DEPTH = 4

_Wrap = Callable[[str, list[Type]], Instance]


def _is_plain(p: ProperType) -> bool:
    """Types that already accept a Token, or that the runtime passes through unchanged."""
    if isinstance(p, AnyType | ParamSpecType | UnpackType):  # ParamSpecs: left to mypy
        return True
    return isinstance(p, Instance) and p.type.fullname in ("builtins.object", TOKEN)


def _lift(t: Type, named: _Wrap, depth: int = 0, *, display: bool = False) -> Type:
    """``t``, or a Token of it, or a list/tuple/dict holding tokens where ``t`` holds values.

    ``display``: the argument is a list or dict display (or comprehension), whose type mypy
    infers from the expected type. A union of several list types gives it no context, so there
    the expected type is the single mixed form (``list[T | Token[T]]``).
    """
    p = get_proper_type(t)
    if _is_plain(p) or depth >= _MAX_DEPTH:
        return t
    if display:
        mixed = _mixed(p, named, depth)
        if mixed is not None:
            return mixed
    forms: list[Type] = []
    if isinstance(p, UnionType):  # (``list[T] | None``: the display is the list)
        forms += [_lift(item, named, depth + 1, display=display) for item in p.items]
    else:
        forms.append(t)
        forms += _containers(p, named, depth)
    forms.append(named(TOKEN, [t]))
    return UnionType.make_union(forms)


def _mixed(p: ProperType, named: _Wrap, depth: int) -> Type | None:
    """For a display: the one list or dict type holding values and tokens alike."""
    if not isinstance(p, Instance) or not p.args:
        return None
    name = p.type.fullname
    if name == "builtins.list" or name in _SEQUENCES:
        return named("builtins.list", [_lift(p.args[0], named, depth + 1)])
    if (name == "builtins.dict" or name in _MAPPINGS) and len(p.args) == 2:
        return named("builtins.dict", [p.args[0], _lift(p.args[1], named, depth + 1)])
    return None


def _containers(p: ProperType, named: _Wrap, depth: int) -> list[Type]:
    """The list/tuple/dict forms holding tokens that the runtime turns into ``p``."""
    if isinstance(p, TupleType):  # tuple[A, B]: covariant, one form covers them all
        return [p.copy_modified(items=[_lift(item, named, depth + 1) for item in p.items])]
    if not isinstance(p, Instance) or not p.args:
        return []
    name = p.type.fullname
    if name == "builtins.tuple":  # tuple[T, ...]: covariant
        return [named("builtins.tuple", [_lift(p.args[0], named, depth + 1)])]
    if name == "builtins.list" or name in _SEQUENCES:
        item = p.args[0]
        # list is invariant: a list[Token[T]] and a list[T | Token[T]] are two more forms.
        forms: list[Type] = [
            named("builtins.list", [named(TOKEN, [item])]),
            named("builtins.list", [_lift(item, named, depth + 1)]),
        ]
        if name != "builtins.list":
            forms.append(named("builtins.tuple", [_lift(item, named, depth + 1)]))
        return forms
    if (name == "builtins.dict" or name in _MAPPINGS) and len(p.args) == 2:
        key, value = p.args
        return [
            named("builtins.dict", [key, named(TOKEN, [value])]),
            named("builtins.dict", [key, _lift(value, named, depth + 1)]),
        ]
    return []


def _token_info(ret: Type) -> TypeInfo | None:
    """Token's class, from ``Token[R]`` (``__call__``) or ``Coroutine[..., Token[R]]``."""
    p = get_proper_type(ret)
    for _ in range(2):
        if not isinstance(p, Instance):
            return None
        if p.type.fullname == TOKEN:
            return p.type
        if not p.args:
            return None
        p = get_proper_type(p.args[-1])
    return None


_DISPLAYS = (ListExpr, DictExpr, ListComprehension, DictionaryComprehension)


def _accept_tokens(ctx: MethodSigContext) -> FunctionLike:
    signature: CallableType = ctx.default_signature
    token = _token_info(signature.ret_type)
    if token is None:  # not a signature this plugin knows: check it as written
        return signature

    def named(name: str, args: list[Type]) -> Instance:
        # Token by its TypeInfo: the package imports ``_token`` under TYPE_CHECKING only, so a
        # lookup by qualified name through ``tokengate`` would not find it.
        if name == TOKEN:
            return Instance(token, args)
        return ctx.api.named_generic_type(name, args)

    lifted = []
    for t, actuals in zip(signature.arg_types, ctx.args, strict=True):
        display = len(actuals) == 1 and isinstance(actuals[0], _DISPLAYS)
        lifted.append(_lift(t, named, display=display))
    return signature.copy_modified(arg_types=lifted)


def _submit_task(ctx: MethodSigContext) -> FunctionLike:
    """``coordinator.submit(fn, ...)`` and ``submit_async`` with a decorated ``fn``: checked
    against ``fn``'s own parameters, lifted as for a direct call, returning ``Token[R]``.

    Without this, a call whose arguments do not fit ``fn`` falls through to the overload for
    plain callables and is accepted as a ``Token[Token[R]]``.
    """
    signature = ctx.default_signature
    if not ctx.args or len(ctx.args[0]) != 1:
        return signature
    task = get_proper_type(ctx.api.get_expression_type(ctx.args[0][0]))
    if not (
        isinstance(task, Instance) and task.type.fullname == TASK_FUNCTION and len(task.args) == 2
    ):
        return signature
    params = get_proper_type(task.args[0])
    token = _token_info(signature.ret_type)
    if not isinstance(params, Parameters) or token is None:
        return signature

    def named(name: str, args: list[Type]) -> Instance:
        if name == TOKEN:
            return Instance(token, args)
        return ctx.api.named_generic_type(name, args)

    return signature.copy_modified(
        arg_types=[task, *(_lift(t, named) for t in params.arg_types)],
        arg_kinds=[ARG_POS, *params.arg_kinds],
        arg_names=[None, *params.arg_names],
        ret_type=_with_result(signature.ret_type, Instance(token, [task.args[1]])),
        variables=[],
    )


def _with_result(ret: Type, result: Instance) -> Type:
    """``ret`` with its ``Token[...]`` (itself, or a coroutine's result) replaced by ``result``."""
    p = get_proper_type(ret)
    if isinstance(p, Instance) and p.type.fullname == TOKEN:
        return result
    if isinstance(p, Instance) and p.args:
        return p.copy_modified(args=[*p.args[:-1], result])
    return ret


def _typed_tags(ctx: FunctionSigContext) -> FunctionLike:
    """``tags={...}`` written as a dict display is checked as :class:`tokengate.Tags`.

    The parameter also takes any ``Mapping[str, Any]`` (the Quick-Proof's untyped dict), and mypy
    would check a display against that branch and accept any key and value; with the plugin a
    display must be a valid ``Tags``, so ``{"weight": "haevy"}`` is an error.
    """
    signature = ctx.default_signature
    if "tags" not in signature.arg_names:
        return signature
    index = signature.arg_names.index("tags")
    actuals = ctx.args[index]
    if len(actuals) != 1 or not isinstance(actuals[0], DictExpr):
        return signature
    declared = get_proper_type(signature.arg_types[index])
    items = declared.items if isinstance(declared, UnionType) else [declared]
    for item in items:
        if isinstance(get_proper_type(item), TypedDictType):
            arg_types = list(signature.arg_types)
            arg_types[index] = item
            return signature.copy_modified(arg_types=arg_types)
    return signature


class TokenGatePlugin(Plugin):
    """Registers :func:`_accept_tokens` for the calls that submit a decorated function, and
    :func:`_typed_tags` for the decorator."""

    def get_method_signature_hook(
        self, fullname: str
    ) -> Callable[[MethodSigContext], FunctionLike] | None:
        if fullname in _HOOKED:
            return _accept_tokens
        return _submit_task if fullname in _SUBMITS else None

    def get_function_signature_hook(
        self, fullname: str
    ) -> Callable[[FunctionSigContext], FunctionLike] | None:
        return _typed_tags if fullname == _DECORATOR else None


def plugin(version: str) -> type[TokenGatePlugin]:
    """The entry point mypy calls (``plugins = ["tokengate.mypy"]``)."""
    return TokenGatePlugin
