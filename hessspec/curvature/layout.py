"""The parameter side of a curvature operator: how a parameter pytree maps to one flat
vector, and which leaves a ``wrt=`` block selects.

A :class:`FlatLayout` records the pytree structure, each leaf's shape, dtype and path
(``"layers/0/w"``) and whether ``wrt`` selects it; it ravels a pytree to the flat vector
(``ravel_pytree`` order, the selected leaves only) and back. It is static and hashable by
value, so operators of the same parameter structure and block share compiled programs.

``wrt`` is a pytree of bools shaped like the parameters or a prefix of it (optax's mask
convention: ``{"layer1": True, "layer2": False}``), or a predicate on parameter paths
(``lambda path: path.startswith("layer1/")``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FlatLayout", "flat_layout", "is_array", "path_name", "wrt_selection"]


def is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic | float | int) and not isinstance(
        leaf, bool
    )


def path_name(path) -> str:
    """``"layers/0/w"`` for a JAX key path (dict keys, sequence indices, attributes)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """How a parameter pytree maps to one flat vector (``ravel_pytree`` order), or the
    selected leaves of it (a block): static and hashable by value, so operators of the same
    parameter structure and block share compiled programs.

    Attributes:
        treedef: the parameters' pytree structure.
        shapes: each leaf's shape.
        dtypes: each leaf's dtype (``unravel`` casts back to them).
        dtype: the flat vector's dtype (the selected leaves' common floating dtype).
        selected: per leaf, whether it is in the flat vector (all True without ``wrt``).
        paths: per leaf, its path as ``"layers/0/w"``.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    dtype: np.dtype
    selected: tuple[bool, ...]
    paths: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(
            sum(math.prod(s) for s, keep in zip(self.shapes, self.selected, strict=True) if keep)
        )

    @property
    def is_block(self) -> bool:
        return not all(self.selected)

    def select(self, leaves: list) -> list:
        """The entries of ``leaves`` (one per parameter leaf, in leaf order) whose leaf is in
        the flat vector."""
        return [x for x, keep in zip(leaves, self.selected, strict=True) if keep]

    def ravel(self, tree: Any) -> jax.Array:
        """The flat ``(size,)`` vector of a pytree shaped like the parameters (for a block:
        of its selected leaves), or of a block pytree as :meth:`unravel` returns."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        chosen_shapes = tuple(self.select(self.shapes))
        if treedef == self.treedef and tuple(np.shape(x) for x in leaves) == self.shapes:
            leaves = self.select(leaves)
        elif tuple(np.shape(x) for x in leaves) != chosen_shapes:
            size = sum(int(np.size(x)) for x in leaves)
            raise ValueError(
                f"ravel: the pytree ({size} entries, structure {treedef}) is not shaped like "
                f"the parameters ({self.treedef}) or their block ({self.size} entries); pass "
                "a pytree shaped like params."
            )
        if not leaves:
            return jnp.zeros((0,), self.dtype)
        return jnp.concatenate([jnp.ravel(jnp.asarray(x)).astype(self.dtype) for x in leaves])

    def _split(self, flat: jax.Array) -> list:
        flat = jnp.asarray(flat)
        if flat.shape != (self.size,):
            raise ValueError(
                f"unravel: expected a flat vector of shape ({self.size},), got {flat.shape}."
            )
        leaves, offset = [], 0
        for shape, dtype, keep in zip(self.shapes, self.dtypes, self.selected, strict=True):
            if not keep:
                leaves.append(None)
                continue
            size = math.prod(shape)
            leaves.append(flat[offset : offset + size].reshape(shape).astype(dtype))
            offset += size
        return leaves

    def unravel(self, flat: jax.Array) -> Any:
        """The pytree of a flat ``(size,)`` vector: shaped like the parameters, with None in
        place of the leaves outside a block."""
        return jax.tree_util.tree_unflatten(self.treedef, self._split(flat))

    def combine(self, flat: jax.Array, fixed: list) -> Any:
        """The full parameter pytree: the selected leaves from ``flat``, the others from
        ``fixed`` (their values, in leaf order)."""
        leaves = self._split(flat)
        rest = iter(fixed)
        return jax.tree_util.tree_unflatten(
            self.treedef, [next(rest) if x is None else x for x in leaves]
        )


def wrt_selection(params: Any, wrt: Any, paths: list[str]) -> tuple[bool, ...]:
    """Per leaf of ``params``, whether ``wrt`` selects it (see :func:`hessian_operator`)."""
    n = len(paths)
    if wrt is None:
        return (True,) * n
    if callable(wrt):
        chosen = tuple(bool(wrt(path)) for path in paths)
    else:
        try:
            full = jax.tree_util.tree_map(
                lambda m, sub: jax.tree_util.tree_map(lambda _: bool(m), sub), wrt, params
            )
        except (ValueError, TypeError) as err:
            raise ValueError(
                "wrt must be a pytree of bools shaped like params or a prefix of it (optax's "
                "mask convention), or a predicate on parameter paths such as "
                f"lambda path: path.startswith('layers/0'); got {type(wrt).__name__} ({err})."
            ) from None
        chosen = tuple(bool(x) for x in jax.tree_util.tree_leaves(full))
    if not any(chosen):
        raise ValueError(
            f"wrt selects no parameter; the parameter paths are {', '.join(paths[:12])}"
            + (" ..." if n > 12 else "")
            + "."
        )
    return chosen


def flat_layout(params: Any, wrt: Any = None) -> FlatLayout:
    """The :class:`FlatLayout` of a parameter pytree (of the block ``wrt`` selects).

    Raises:
        TypeError: a leaf that is not an array (e.g. a function inside an equinox module),
            named by its path, with the fix.
        ValueError: no entries, leaves that are not floating point, or a ``wrt`` that does
            not fit ``params`` or selects nothing.
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    bad = [(path, leaf) for path, leaf in with_path if not is_array(leaf)]
    if bad:
        names = ", ".join(
            f"{jax.tree_util.keystr(path) or '(root)'} ({type(leaf).__name__})"
            for path, leaf in bad[:5]
        )
        raise TypeError(
            f"params must be a pytree of arrays; these leaves are not: {names}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + ". Pass only the arrays: with equinox, params, static = eqx.partition(model, "
            "eqx.is_array) and a loss that recombines them (eqx.combine); with flax, the "
            "parameter collection (variables['params'] or nnx.state(model, nnx.Param))."
        )
    leaves = [leaf for _, leaf in with_path]
    if not leaves or sum(int(np.size(x)) for x in leaves) == 0:
        raise ValueError("params has no entries: nothing to differentiate.")
    paths = [path_name(path) for path, _ in with_path]
    selected = wrt_selection(params, wrt, paths)
    dtypes = tuple(np.dtype(jnp.result_type(x)) for x in leaves)
    ints = [
        name
        for name, dt, keep in zip(paths, dtypes, selected, strict=True)
        if keep and not jnp.issubdtype(dt, jnp.floating)
    ]
    if ints:
        raise ValueError(
            f"params must be floating point; leaves {', '.join(ints[:5])} are not. Keep "
            "integer state out of the differentiated parameters (or out of wrt)."
        )
    chosen = [dt for dt, keep in zip(dtypes, selected, strict=True) if keep]
    return FlatLayout(
        treedef=treedef,
        shapes=tuple(tuple(int(d) for d in np.shape(x)) for x in leaves),
        dtypes=dtypes,
        dtype=np.dtype(jnp.result_type(*chosen)),
        selected=selected,
        paths=tuple(paths),
    )
