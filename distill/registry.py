"""One registry style for every extension point: a ``Registry(kind)`` maps the names a config or a
user writes to the things they name (loss terms, deployment variants, data sources, fine-tune
methods, teachers, student towers), each with a one-line description.

The module that defines a thing registers it (``@REGISTRY.register("name")``, or
``REGISTRY.register("name", obj)``); ``python -m distill list`` prints every registry, and an
unknown name is a one-line UserError naming the closest registered one. This module imports only
the standard library and distill.errors, so any module can hold a registry without an import cycle.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
from typing import Any, Generic, Iterator, Sequence, TypeVar

from distill.errors import UserError

T = TypeVar("T")
_MISSING: Any = object()
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)\. ")  # not after "et al", "e.g"...


def first_sentence(text: str | None, limit: int = 120) -> str:
    """The first sentence of ``text``'s first paragraph on one line, cut at a word boundary when longer than ``limit``."""
    text = " ".join((text or "").strip().split("\n\n")[0].split())
    end = _SENTENCE_END.search(text)
    if end:
        text = text[: end.start() + 1]
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit - 3)
        text = text[: cut if cut > 0 else limit - 3].rstrip(",;:") + "..."
    return text


class Registry(Generic[T]):
    """Names -> registered things of one ``kind`` ("loss term", "teacher"...), in registration order.

    ``discover``: the modules that register entries here besides the one holding the registry (a
    package stands for all its modules), imported the first time the registry is read.
    """

    def __init__(self, kind: str, discover: str | Sequence[str] = ()) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._discover = [discover] if isinstance(discover, str) else list(discover)

    def _load(self) -> None:
        """Import the ``discover`` modules once, so that every entry is registered before a lookup."""
        todo, self._discover = self._discover, []
        for name in todo:
            module = importlib.import_module(name)
            for info in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
                importlib.import_module(f"{name}.{info.name}")

    def register(self, name: str, obj: Any = _MISSING, *, doc: str | None = None) -> Any:
        """Register ``obj`` as ``name`` and return it; without ``obj``, a decorator that does so.

        The description is the first sentence of ``doc``, else of ``obj``'s docstring. A name
        registered twice is a programming error (ValueError), not a user's.
        """
        if obj is _MISSING:
            return lambda thing: self.register(name, thing, doc=doc)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        self._docs[name] = first_sentence(doc if doc is not None else getattr(obj, "__doc__", None))
        return obj

    def get(self, name: str, default: Any = _MISSING, *, where: str | None = None) -> T:
        """The thing registered as ``name``; else ``default`` when given (as dict.get), else a UserError
        naming the closest name, its message started by ``where`` (the config key that gave the name)."""
        self._load()
        if name in self._items:
            return self._items[name]
        if default is not _MISSING:
            return default
        raise UserError(self.unknown(name, where))

    def unknown(self, name: Any, where: str | None = None) -> str:
        """The one-line message for an unregistered ``name``: the closest registered name, then all of them."""
        self._load()
        close = difflib.get_close_matches(str(name), list(self._items), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        listed = ", ".join(self._items) or "(none)"
        return f"{where + ': ' if where else ''}{self.kind} {name!r} is not registered{hint} registered: {listed}"

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def describe(self, name: str) -> str:
        """The one-line description of ``name``."""
        self.get(name)
        return self._docs[name]

    def entries(self) -> list[tuple[str, str]]:
        """[(name, one-line description)] in registration order: what ``python -m distill list`` prints."""
        self._load()
        return list(self._docs.items())

    def copy(self) -> "Registry[T]":
        """An independent registry with the same entries (a test registers into it and drops it)."""
        self._load()
        new: Registry[T] = Registry(self.kind)
        new._items, new._docs = dict(self._items), dict(self._docs)
        return new

    # read like a dict: registry[name], name in registry, iteration over the names, items()...
    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def keys(self) -> list[str]:
        return self.names()

    def values(self) -> list[T]:
        self._load()
        return list(self._items.values())

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._items.items())

    # only for tests' monkeypatch.setitem / delitem (which restores an entry by setting it again); code
    # registers with register()
    def __setitem__(self, name: str, obj: T) -> None:
        self._items[name] = obj
        self._docs.setdefault(name, first_sentence(getattr(obj, "doc", None) or getattr(obj, "__doc__", None)))

    def __delitem__(self, name: str) -> None:
        del self._items[name]
        del self._docs[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


# The student towers: the modules that define towers (distill/students*) register them here.
STUDENT_TOWERS: Registry[Any] = Registry("student tower")
