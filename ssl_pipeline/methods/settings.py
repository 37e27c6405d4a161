"""A method's recipe settings: its constructor's typed arguments after the ones the pipeline
supplies, with their defaults, as the strict `method.<name>` block of the recipe.

`settings_for` reads them from the method's source file without importing it, so checking a
recipe (`ssl-pipeline validate`) does not import torch, Lightning and lightly (about 5 seconds
here); a constructor it cannot read that way (a default that is not a literal, a type not in
`_TYPES`) is imported and read with `inspect`, as `settings_model` does.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, create_model

from ssl_pipeline.registry import load

# Constructor arguments supplied by the pipeline, not by the recipe's method block.
PIPELINE_ARGS = ("self", "backbone", "optim", "num_classes")

# The names a settings annotation may use to be read from source.
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": None, "Any": Any,
          "Literal": Literal, "Optional": Optional, "Union": Union, "list": list, "tuple": tuple,
          "dict": dict}


def settings_for(target: str) -> type[BaseModel]:
    """The settings model of the method class `target` ("module:Class"), read from its source
    when it can be, else from the imported class."""
    module, name = target.split(":")
    fields = _fields_from_source(module, name)
    return settings_model(load(target)) if fields is None else _model(name, fields)


def settings_model(method_cls: type) -> type[BaseModel]:
    """A strict pydantic model of the method's own constructor arguments and their defaults."""
    hints = typing.get_type_hints(method_cls.__init__)
    fields = {
        name: (hints[name], param.default)
        for name, param in inspect.signature(method_cls.__init__).parameters.items()
        if name not in PIPELINE_ARGS
    }
    return _model(method_cls.__name__, fields)


def _model(class_name: str, fields: dict[str, tuple[Any, Any]]) -> type[BaseModel]:
    return create_model(  # type: ignore[call-overload]
        f"{class_name}Settings",
        __config__=ConfigDict(extra="forbid", validate_assignment=True),
        **fields,
    )


def _fields_from_source(module: str, class_name: str) -> dict[str, tuple[Any, Any]] | None:
    """(annotation, default) of each setting of `class_name.__init__` in `module`'s source, or
    None when some argument is not a literal default with an annotation of `_TYPES`."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    init = cls and next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
                        None)
    if init is None or init.args.vararg or init.args.kwarg or init.args.posonlyargs:
        return None
    positional = init.args.args
    defaults = [None] * (len(positional) - len(init.args.defaults)) + list(init.args.defaults)
    arguments = [*zip(positional, defaults), *zip(init.args.kwonlyargs, init.args.kw_defaults)]
    fields = {}
    for arg, default in arguments:
        if arg.arg in PIPELINE_ARGS:
            continue
        if default is None or arg.annotation is None:
            return None  # a required setting, or an untyped one: as the imported class says
        try:
            annotation = eval(ast.unparse(arg.annotation), {"__builtins__": {}}, dict(_TYPES))
            value = ast.literal_eval(default)
        except (NameError, ValueError, TypeError, SyntaxError):
            return None
        fields[arg.arg] = (annotation, value)
    return fields
