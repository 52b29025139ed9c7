"""Secret key material held in memory. Shows nothing of itself; only crypto/ and keystore/ use it."""

from __future__ import annotations

from typing import NoReturn


class KeyMaterial:
    """Raw secret bytes of one key version. No useful repr, cannot be pickled or compared."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        self._raw = bytes(raw)

    def reveal(self) -> bytes:
        return self._raw

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"KeyMaterial(<{len(self._raw)} bytes hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class ImportedMaterial(KeyMaterial):
    """Material a customer imported (BYOK), unwrapped inside a key store and checked against the
    key's spec; it carries its id (the same material always gets the same id)."""

    __slots__ = ("material_id",)

    def __init__(self, raw: bytes, material_id: str) -> None:
        super().__init__(raw)
        self.material_id = material_id

    def __repr__(self) -> str:
        return f"ImportedMaterial(<{len(self._raw)} bytes hidden>, material_id={self.material_id!r})"

    __str__ = __repr__
