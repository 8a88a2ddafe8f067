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
                if not hasattr(module, target.name):
                    raise UntestedVersionError(
                        f"{self.distribution} {version} has no {target.module}.{target.name}; nothing was patched"
                    )
                originals.append((target, getattr(module, target.name)))
            for consumer in self.consumers:
                with contextlib.suppress(Exception):
                    importlib.import_module(consumer)
            swaps = {}
            for target, original in originals:
                replacement = target.make(original)
                replacement.__wrapped_original__ = original
                swaps[id(original)] = (original, replacement)
            for module in self._framework_modules():
                for name, value in list(vars(module).items()):
                    hit = swaps.get(id(value))
                    if hit is not None and hit[0] is value:
                        self._saved.append((module, name, value))
                        setattr(module, name, hit[1])
            self._replacements = {id(r): (o, r) for o, r in swaps.values()}

    def unpatch(self) -> None:
        with self._lock:
            for module, name, original in reversed(self._saved):
                setattr(module, name, original)
            # Modules imported after patch() bound the replacements: restore those too.
            for module in self._framework_modules():
                for name, value in list(vars(module).items()):
                    hit = self._replacements.get(id(value))
                    if hit is not None and hit[1] is value:
                        setattr(module, name, hit[0])
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
        return [f"{module.__name__}.{name}" for module, name, _ in self._saved]

    def _framework_modules(self):
        prefix = self.framework + "."
        for name, module in list(sys.modules.items()):
            if module is not None and (name == self.framework or name.startswith(prefix)):
                yield module
