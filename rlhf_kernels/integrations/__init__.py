"""Drop-in integrations: run TRL, verl or OpenRLHF on rlhf_kernels' ops.

Each submodule (``trl``, ``verl``, ``openrlhf``) has ``patch()``, ``unpatch()``
and the context manager ``patched()``. ``patch()`` replaces the framework's
eager functions by adapters over our public ops at every place the framework
looks them up: the defining module's attribute and every name that another of
its modules imported (``from x import f`` binds a second reference that a
patch of ``x.f`` alone would miss). ``unpatch()`` puts every original back.

The adapters keep the framework's signatures and semantics (clamps, mask
handling, normalisation, output dtypes), not ours; each says where they
differ. A framework version that is not in the tested set is refused before
anything is patched (``allow_untested=True`` overrides), as is a framework
that is not installed.

Importing this package imports no framework.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["FrameworkNotInstalledError", "UntestedVersionError", "Patcher"]


class FrameworkNotInstalledError(ImportError):
    """The framework to patch is not installed (or cannot be imported)."""


class UntestedVersionError(RuntimeError):
    """The installed framework version is not one the adapters were tested against."""


@dataclass
class _Target:
    module: str  # where the function is defined
    name: str
    make: Callable[[Callable], Callable]  # original -> replacement


@dataclass
class Patcher:
    """Patches one framework. ``targets`` are (defining module, attribute,
    factory(original) -> replacement); ``consumers`` are the framework's
    modules (trainers, workers) imported before patching so that the names
    they imported get swapped too; a consumer that fails to import (a missing
    optional dependency) is skipped, since it then cannot look anything up."""

    framework: str  # import name
    distribution: str  # pip name, for importlib.metadata
    tested_versions: frozenset[str]
    targets: list[_Target]
    consumers: tuple[str, ...] = ()
    _saved: list[tuple[object, str, object]] = field(default_factory=list)
    _replacements: dict[int, tuple[object, object]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise FrameworkNotInstalledError(
                f"{self.distribution} is not installed; rlhf_kernels.integrations.{self.framework} "
                f"patches it (tested with {self.distribution} {', '.join(sorted(self.tested_versions))})"
            ) from None

    @property
    def is_patched(self) -> bool:
        return bool(self._saved)

    def patch(self, *, allow_untested: bool = False) -> None:
        with self._lock:
            if self._saved:
                return  # already patched: patch() is idempotent
            version = self.version()
            if version not in self.tested_versions and not allow_untested:
                raise UntestedVersionError(
                    f"{self.distribution} {version} is not a tested version "
                    f"(tested: {', '.join(sorted(self.tested_versions))}); nothing was patched. "
                    f"Pass allow_untested=True to patch anyway."
                )
            # Resolve everything before changing anything, so a failure patches nothing.
            originals = []
            for target in self.targets:
                try:
                    module = importlib.import_module(target.module)
                except ImportError as exc:
                    raise FrameworkNotInstalledError(
                        f"cannot import {target.module} from {self.distribution} {version}: {exc}; nothing was patched"
                    ) from exc
                owner, _, attr = target.name.rpartition(".")
                holder = module
                for part in owner.split(".") if owner else ():
                    holder = getattr(holder, part, None)
                if holder is None or attr not in vars(holder):
                    raise UntestedVersionError(
                        f"{self.distribution} {version} has no {target.module}.{target.name}; nothing was patched"
                    )
                originals.append((target, vars(holder)[attr], holder, attr))
            for consumer in self.consumers:
                with contextlib.suppress(Exception):
                    importlib.import_module(consumer)
            swaps = {}
            for target, original, holder, attr in originals:
                replacement = target.make(original)
                replacement.__wrapped_original__ = original
                swaps[id(original)] = (original, replacement)
                if isinstance(holder, type):  # a method: the class is its one lookup
                    self._saved.append((holder, attr, original))
                    setattr(holder, attr, replacement)
            for namespace, name, value in self._lookups():
                hit = swaps.get(id(value))
                if hit is not None and hit[0] is value:
                    self._saved.append((namespace, name, value))
                    _set(namespace, name, hit[1])
            self._replacements = {id(r): (o, r) for o, r in swaps.values()}

    def unpatch(self) -> None:
        with self._lock:
            for namespace, name, original in reversed(self._saved):
                _set(namespace, name, original)
            # Modules imported after patch() bound the replacements: restore those too.
            for namespace, name, value in self._lookups():
                hit = self._replacements.get(id(value))
                if hit is not None and hit[1] is value:
                    _set(namespace, name, hit[0])
            self._saved.clear()
            self._replacements = {}

    @contextlib.contextmanager
    def patched(self, *, allow_untested: bool = False) -> Iterator[None]:
        self.patch(allow_untested=allow_untested)
        try:
            yield
        finally:
            self.unpatch()

    def patched_names(self) -> list[str]:
        """``module.attribute`` of every lookup currently patched."""
        return [f"{_describe(namespace)}.{name}" if isinstance(name, str) else f"{_describe(namespace)}[{name!r}]"
                for namespace, name, _ in self._saved]

    def _lookups(self):
        """(namespace, key, value) of every module attribute of the framework,
        and of every entry of a dict held in one: registries such as verl's
        ``POLICY_LOSS_REGISTRY`` hold the functions the trainers call by name."""
        prefix = self.framework + "."
        for modname, module in list(sys.modules.items()):
            if module is None or not (modname == self.framework or modname.startswith(prefix)):
                continue
            for name, value in list(vars(module).items()):
                yield module, name, value
                if isinstance(value, dict):
                    for key, entry in list(value.items()):
                        yield value, key, entry


def _set(namespace, name, value) -> None:
    if isinstance(namespace, dict):
        namespace[name] = value
    else:
        setattr(namespace, name, value)


def _describe(namespace) -> str:
    if isinstance(namespace, type):
        return f"{namespace.__module__}.{namespace.__qualname__}"
    if isinstance(namespace, dict):
        for modname, module in list(sys.modules.items()):
            for name, value in list(vars(module).items() if module is not None else ()):
                if value is namespace:
                    return f"{modname}.{name}"
        return "<dict>"
    return namespace.__name__
