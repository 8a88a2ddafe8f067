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

Calls an adapter cannot serve with the same semantics go to the framework's
own function ("hand-backs"). ``report()`` says, per patched function, how many
calls our ops served and how many were handed back, by reason; the first
hand-back of each reason logs one warning on the ``rlhf_kernels.integrations``
logger, and ``patch(strict=True)`` raises ``HandBackError`` instead::

    from rlhf_kernels import integrations
    from rlhf_kernels.integrations import verl

    verl.patch()
    ...  # train
    print(integrations.format_report())
    # verl.compute_policy_loss_vanilla  served 412  handed back 0
    # verl.agg_loss                     served 1236 handed back 4 (loss_mat is not a tensor: 4)

Importing this package imports no framework.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import logging
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "FrameworkNotInstalledError",
    "UntestedVersionError",
    "HandBackError",
    "Patcher",
    "report",
    "reset_report",
    "format_report",
]

logger = logging.getLogger(__name__)


class FrameworkNotInstalledError(ImportError):
    """The framework to patch is not installed (or cannot be imported)."""


class UntestedVersionError(RuntimeError):
    """The installed framework version is not one the adapters were tested against."""


class HandBackError(ValueError):
    """Under ``patch(strict=True)``: a call our adapter would hand back to the
    framework's own function. The message names the function and the reason."""


# Coverage, per "framework.function": calls served and hand-backs by reason.
_report_lock = threading.Lock()
_served: Counter[str] = Counter()
_handed_back: dict[str, Counter[str]] = {}
_warned: set[tuple[str, str]] = set()
_strict: dict[str, bool] = {}  # framework -> patched with strict=True
_frames = threading.local()  # the stack of adapter calls in progress on this thread


def report() -> dict[str, dict]:
    """Coverage of the patched functions since the last ``reset_report()``:
    ``{"verl.agg_loss": {"served": 12, "handed_back": {reason: count}}, ...}``
    for every function called at least once."""
    with _report_lock:
        keys = sorted(set(_served) | set(_handed_back))
        return {k: {"served": _served[k], "handed_back": dict(_handed_back.get(k, {}))} for k in keys}


def reset_report() -> None:
    """Zero the counts of ``report()`` (and re-arm the one warning per reason)."""
    with _report_lock:
        _served.clear()
        _handed_back.clear()
        _warned.clear()


def format_report() -> str:
    """``report()`` as a table, one line per function."""
    rows = report()
    if not rows:
        return "no patched function was called"
    width = max(len(k) for k in rows)
    lines = []
    for key, row in rows.items():
        back = row["handed_back"]
        reasons = f" ({'; '.join(f'{r}: {n}' for r, n in back.items())})" if back else ""
        lines.append(f"{key:<{width}}  served {row['served']:>6}  handed back {sum(back.values()):>6}{reasons}")
    return "\n".join(lines)


def hand_back(key: str, reason: str, original: Callable, *args, **kwargs):
    """Give one call of the patched function ``key`` ("framework.function") to
    the framework's ``original``, counted under ``reason``; raises
    ``HandBackError`` where the framework was patched with ``strict=True``."""
    stack = getattr(_frames, "stack", None)
    if stack and stack[-1][0] == key:
        stack[-1][1] = True  # this call was not served
    with _report_lock:
        _handed_back.setdefault(key, Counter())[reason] += 1
        first = (key, reason) not in _warned
        _warned.add((key, reason))
    if _strict.get(key.partition(".")[0]):
        raise HandBackError(f"{key}: {reason}; rlhf_kernels does not serve this call (patched with strict=True)")
    if first:
        logger.warning("%s: %s; handed back to the framework's own function (further such calls are counted "
                       "in rlhf_kernels.integrations.report())", key, reason)
    return original(*args, **kwargs)


def count_served(key: str) -> None:
    """Count one call of ``key`` served by our ops (for the replacements that
    are classes; the function replacements are counted by the patcher)."""
    with _report_lock:
        _served[key] += 1


def served_call(key: str, fn: Callable, *args, **kwargs):
    """(fn(*args, **kwargs), whether a call of the patched function ``key``
    made inside it, in this thread, was served by our ops)."""
    served = _frames.__dict__.setdefault("served", {})
    served.pop(key, None)
    out = fn(*args, **kwargs)
    return out, served.pop(key, False)


def _weights_ok(weights) -> bool:
    """A bool mask, or per-token weights our kernels take: finite and >= 0
    everywhere (one reduction; the adapters hand the rest back)."""
    import torch

    if weights.dtype == torch.bool:
        return True
    ok = weights >= 0
    if weights.is_floating_point():
        ok &= torch.isfinite(weights)
    return bool(ok.all())


def _counting(key: str, replacement: Callable) -> Callable:
    """``replacement`` that counts each call that returns without a hand-back
    as served (a call that raises is neither: the framework raises there too)."""

    @functools.wraps(replacement)
    def counted(*args, **kwargs):
        stack = _frames.__dict__.setdefault("stack", [])
        frame = [key, False]
        stack.append(frame)
        try:
            out = replacement(*args, **kwargs)
        finally:
            stack.pop()
        if not frame[1]:
            count_served(key)
            _frames.__dict__.setdefault("served", {})[key] = True
        return out

    return counted


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

    def patch(self, *, allow_untested: bool = False, strict: bool = False) -> None:
        """Patch the framework. ``strict=True``: a call the adapters would hand
        back to the framework raises ``HandBackError`` instead."""
        with self._lock:
            _strict[self.framework] = strict
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
                if not isinstance(replacement, type):
                    replacement = _counting(f"{self.framework}.{target.name}", replacement)
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
            _strict.pop(self.framework, None)

    def hand_back(self, name: str, reason: str, original: Callable, *args, **kwargs):
        """``hand_back`` for this framework's function ``name``."""
        return hand_back(f"{self.framework}.{name}", reason, original, *args, **kwargs)

    def count_served(self, name: str) -> None:
        count_served(f"{self.framework}.{name}")

    @contextlib.contextmanager
    def patched(self, *, allow_untested: bool = False, strict: bool = False) -> Iterator[None]:
        self.patch(allow_untested=allow_untested, strict=strict)
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
