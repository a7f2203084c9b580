"""Append-only vocabularies made of blocks.

A vocabulary is an ordered list of blocks; a block owns a contiguous id range [offset, offset + size).
Blocks are only ever appended, so a new particle, material or geometry gets fresh ids after the
existing ones and no token is ever renumbered: a trained model keeps every embedding row it had and
only the rows of the new block are new (see model/blocks.py, which stores one table per block).

Tokens are either named (special tokens, materials, particles: looked up by name) or anonymous
ranges (the voxels of a geometry, the bins of an energy binning: looked up by block + local index).
"""

from __future__ import annotations

from dataclasses import dataclass

from calofm.errors import CalofmError


@dataclass(frozen=True)
class Block:
    name: str
    offset: int
    size: int
    names: tuple[str, ...] | None = None  # one per token for named blocks, None for ranges

    def ids(self) -> range:
        return range(self.offset, self.offset + self.size)

    def to_dict(self) -> dict:
        d = {"name": self.name, "offset": self.offset, "size": self.size}
        if self.names is not None:
            d["names"] = list(self.names)
        return d


class Vocabulary:
    def __init__(self, name: str):
        self.name = name
        self.blocks: list[Block] = []
        self._by_name: dict[str, int] = {}

    def __len__(self) -> int:
        return self.blocks[-1].offset + self.blocks[-1].size if self.blocks else 0

    def append(self, block_name: str, size: int | None = None, names: list[str] | tuple[str, ...] | None = None,
               ) -> Block:
        """Add a block after the existing ones; existing ids never change."""
        if any(b.name == block_name for b in self.blocks):
            raise CalofmError(f"vocabulary {self.name!r} already has a block {block_name!r}")
        if names is not None:
            names = tuple(str(n) for n in names)
            clash = [n for n in names if n in self._by_name] + [n for i, n in enumerate(names) if n in names[:i]]
            if clash:
                raise CalofmError(f"vocabulary {self.name!r}: token(s) {clash} already exist")
            size = len(names)
        if size is None or size <= 0:
            raise CalofmError(f"vocabulary block {block_name!r} needs a positive size")
        block = Block(block_name, len(self), int(size), names)
        self.blocks.append(block)
        for i, n in enumerate(names or ()):
            self._by_name[n] = block.offset + i
        return block

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise CalofmError(f"vocabulary {self.name!r} has no block {name!r}")

    def has(self, token: str) -> bool:
        return token in self._by_name

    def id(self, token: str) -> int:
        try:
            return self._by_name[token]
        except KeyError:
            raise CalofmError(f"unknown {self.name} {token!r}; this model knows: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._by_name)

    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b.size for b in self.blocks)

    def to_dict(self) -> dict:
        return {"name": self.name, "blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        vocab = cls(str(d["name"]))
        for b in d["blocks"]:
            block = vocab.append(str(b["name"]), size=int(b["size"]), names=b.get("names"))
            if block.offset != int(b["offset"]):
                raise CalofmError(f"vocabulary {vocab.name!r}: block {block.name!r} stored at offset {b['offset']}, "
                                  f"rebuilt at {block.offset}")
        return vocab
