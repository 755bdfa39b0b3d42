"""The method registry: `@register` adds a Method class under its name, after checking that its options' names
are unique across the core options and every other method (they become flags and YAML keys). Methods from outside
the package register the same way, from a module named by option `method_module` (a module name or a .py file;
config.yaml records it, so resumed and launched processes import it too) or through the `nlora.methods` entry-point
group of an installed distribution."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ..errors import NloraError
from ..method_catalog import ENTRY_POINT_GROUP, unknown_method
from ..options import field_name, option_fields, public_name
from .base import Method

METHODS: dict[str, type[Method]] = {}
_loaded_entry_points = False


def _core_keys() -> set[str]:
    from ..config import config_fields  # registration happens after config is importable

    return {public_name(f.name) for f in config_fields()}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` a `--method`. Refuses a name taken by another class, and option names that
    collide with core options or another method's."""
    name = getattr(cls, "name", None)
    if not name:
        raise NloraError(f"method class {cls.__name__} has no 'name'")
    previous = METHODS.get(name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise NloraError(f"method name {name!r} is taken by {previous.__module__}.{previous.__qualname__}")
    core = _core_keys()
    for key in cls.Options.keys():
        if key in core:
            raise NloraError(f"method {name!r}: option {key!r} is a core option's name; choose another")
        owner = option_owner(key, exclude=name)
        if owner is not None and METHODS[owner].Options is not cls.Options:
            raise NloraError(f"method {name!r}: option {key!r} is already method {owner!r}'s; choose another "
                             "name (for example prefixed with the method's)")
    METHODS[name] = cls
    return cls


def option_owner(key: str, exclude: str | None = None) -> str | None:
    """The first registered method (in name order) that has option `key`."""
    key = public_name(field_name(key))
    return next((m for m in sorted(METHODS) if m != exclude and key in METHODS[m].Options.keys()), None)


def import_method_modules(modules: list[str]) -> None:
    """Import each module name or .py file (they register methods); an error names the one that fails."""
    for spec in modules:
        try:
            if spec.endswith(".py"):
                path = Path(spec).resolve()
                if not path.is_file():
                    raise NloraError(f"option 'method_module': file {spec} does not exist")
                module_name = f"nlora_user_method_{path.stem}"
                if module_name in sys.modules:
                    continue
                loader = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[module_name] = module
                try:
                    loader.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]  # half-imported: a later attempt runs it again
                    raise
            else:
                importlib.import_module(spec)
        except NloraError as e:
            if str(e).startswith("option 'method_module'"):
                raise
            raise NloraError(f"option 'method_module': {spec}: {e}") from None  # e.g. a name a method has
        except Exception as e:  # the user's code: say which module, keep the cause
            raise NloraError(f"option 'method_module': importing {spec!r} failed: {type(e).__name__}: {e}") from e


def load_entry_points() -> None:
    """Import the methods that installed distributions declare in the `nlora.methods` group (once)."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:  # another package's: when it is broken, the other methods still work
            loaded = ep.load()
            if isinstance(loaded, type) and issubclass(loaded, Method) and loaded.name not in METHODS:
                register(loaded)
        except Exception as e:
            print(f"nlora: warning: entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP} failed to "
                  f"load, its methods are not available: {type(e).__name__}: {e}", file=sys.stderr)


def load_methods(modules: list[str] | None = None) -> dict[str, type[Method]]:
    """Every method: the package's, those of `modules` (option method_module) and the entry points'."""
    import_method_modules(modules or [])
    load_entry_points()
    return METHODS


def get_method(name: str, modules: list[str] | None = None) -> type[Method]:
    load_methods(modules)
    if name not in METHODS:
        raise unknown_method(name, list(METHODS))
    return METHODS[name]


def split_method_options(method: str, modules: list[str], values: dict[str, Any], lenient: set[str] = frozenset(),
                         saved_run: bool = False, source: str = "options") -> tuple[dict[str, Any], dict[str, Any]]:
    """Split user keys into core keys and the options of `method` (parsed, all of them). A key of another method is an error naming that
    method, unless it is in `lenient` (a preset's) or, in a saved run (`saved_run`), it holds that method's
    default; an unknown key is an error listing the valid ones."""
    from ..config import config_fields

    cls = get_method(method, modules)
    core_keys = {public_name(f.name) for f in config_fields()}
    mine = set(cls.Options.keys())
    core, options, unknown = {}, {}, []
    for key, value in values.items():
        public = public_name(field_name(key))
        if public in core_keys or key == "method_options":
            core[key] = value
        elif public in mine:
            options[public] = value
        elif (owner := option_owner(public)) is not None:
            if key in lenient or (saved_run and _is_default(owner, public, value)):
                continue
            raise NloraError(f"option '{public}' belongs to method {owner!r}; this run's method is {method!r} "
                             f"(`nlora methods {method}` lists its options)")
        else:
            unknown.append(key)
    if unknown:
        valid = sorted(core_keys | mine)
        raise NloraError(f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)} (the "
                         f"core options and method {method!r}'s)")
    return core, cls.Options.from_dict(options, source=source).to_dict()


def _is_default(method: str, key: str, value: Any) -> bool:
    """Whether `value` is option `key`'s default, today's or an earlier release's (what a saved run recorded)."""
    options_cls = METHODS[method].Options
    try:
        parsed = options_cls.from_dict({key: value}).to_dict()[key]
    except NloraError:
        return False
    former = next((f.metadata.get("former_defaults", ()) for f in option_fields(options_cls)
                   if public_name(f.name) == key), ())
    return parsed == options_cls().to_dict()[key] or parsed in former


def resolve(config) -> Method:
    """The run's method with its options parsed and checked (errors name the option); normalises
    `config.method_options` to the method's full set, as config.yaml records it."""
    cls = get_method(config.method, config.method_module)
    mine = set(cls.Options.keys())
    for key in config.method_options:
        if key not in mine:
            owner = option_owner(key)
            if owner is not None:
                raise NloraError(f"option '{key}' belongs to method {owner!r}; this run's method is "
                                 f"{config.method!r} (`nlora methods {config.method}` lists its options)")
            raise NloraError(f"unknown option {key!r} for method {config.method!r}; its options: "
                             f"{', '.join(cls.Options.keys()) or 'none'}")
    options = cls.Options.from_dict(config.method_options, source="options")
    from ..options import check_fields

    check_fields(options, len(config.tasks))
    options.check(config)
    config.method_options = options.to_dict()
    return cls(config, options)


def per_task_pairs() -> dict[str, str]:
    """Scalar option -> the per-task list that replaces it, over every registered method."""
    load_entry_points()
    pairs = {}
    for cls in METHODS.values():
        for f in option_fields(cls.Options):
            if f.metadata.get("per_task_of"):
                pairs[public_name(f.metadata["per_task_of"])] = public_name(f.name)
    return pairs
