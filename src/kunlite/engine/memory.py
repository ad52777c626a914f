"""The unified device pool: one buffer of fixed-size pages per device.

Parameters are tensors that view page-aligned ranges of the pool; every other page is a KV
page. A page holds the keys and values of `page_size` tokens of one layer, so the pool is also
the tensor `kv_cache` of shape (P, 2, page_size, H_kv, d), addressed from one base pointer.

Parameters come in groups (the embedding, each decoder layer, the final norm with the LM
head). Dropping a group hands its pages to the KV side; restoring takes them back. The pool
only keeps the ownership map; the KV manager decides what lives in a KV page, and the weight
loader refills a restored group.

Invariant: every page is owned by exactly one parameter group or by the KV side, so
    param_pages + kv_pages == num_pages
at all times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Each tensor inside a group starts at a multiple of this many elements (64 B at fp32), so
# that views stay aligned for vector loads.
_ALIGN_ELEMS = 32


class PoolError(RuntimeError):
    """Misuse of the pool (a double drop, an unknown group): a bug, never user input."""


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    offset: int  # element offset from the start of its group

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class GroupLayout:
    name: str
    first_page: int
    num_pages: int
    slots: tuple[ParamSlot, ...]

    @property
    def pages(self) -> range:
        return range(self.first_page, self.first_page + self.num_pages)


def page_elems(page_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Elements in one page: K and V of page_size tokens of one layer."""
    return 2 * page_size * num_kv_heads * head_dim


def plan_groups(
    groups: dict[str, list[tuple[str, tuple[int, ...]]]], elems_per_page: int
) -> list[GroupLayout]:
    """Lay the groups out back to back from page 0, each starting on a page boundary."""
    layouts: list[GroupLayout] = []
    page = 0
    for gname, params in groups.items():
        slots: list[ParamSlot] = []
        offset = 0
        for pname, shape in params:
            slot = ParamSlot(pname, tuple(shape), offset)
            slots.append(slot)
            offset += -(-slot.numel // _ALIGN_ELEMS) * _ALIGN_ELEMS
        n_pages = max(1, -(-offset // elems_per_page))
        layouts.append(GroupLayout(gname, page, n_pages, tuple(slots)))
        page += n_pages
    return layouts


class DevicePool:
    """One device's pages. Parameter groups are placed at construction from page 0 upwards."""

    def __init__(
        self,
        *,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        groups: dict[str, list[tuple[str, tuple[int, ...]]]],
    ) -> None:
        self.page_size = page_size
        self.elems_per_page = page_elems(page_size, num_kv_heads, head_dim)
        self.layouts = {g.name: g for g in plan_groups(groups, self.elems_per_page)}
        param_pages = sum(g.num_pages for g in self.layouts.values())
        if param_pages >= num_pages:
            raise PoolError(
                f"the parameters need {param_pages} pages but the pool has {num_pages}; "
                "raise --device-memory"
            )
        self.num_pages = num_pages
        self.storage = torch.empty(num_pages * self.elems_per_page, dtype=dtype, device=device)  # (P * E,)
        self.kv_cache = self.storage.view(num_pages, 2, page_size, num_kv_heads, head_dim)  # (P, 2, ps, H_kv, d)
        self._resident: set[str] = set(self.layouts)  # groups whose pages hold parameters

    # -------------------------------------------------------------- parameters

    def view(self, group: str, name: str) -> torch.Tensor:
        """The pool range that holds parameter `name` of `group`, shaped as the parameter."""
        layout = self._layout(group)
        for slot in layout.slots:
            if slot.name == name:
                start = layout.first_page * self.elems_per_page + slot.offset
                return self.storage[start : start + slot.numel].view(slot.shape)
        raise PoolError(f"group {group!r} has no parameter {name!r}")

    def is_resident(self, group: str) -> bool:
        return group in self._resident

    def group_pages(self, group: str) -> range:
        return self._layout(group).pages

    def initial_kv_pages(self) -> list[int]:
        """Pages not used by any parameter group at construction."""
        used = sum(g.num_pages for g in self.layouts.values())
        return list(range(used, self.num_pages))

    # -------------------------------------------------------------- drop / restore

    def drop(self, group: str) -> range:
        """Give a resident group's pages to the KV side. Its views must not be read after this."""
        if group not in self._resident:
            raise PoolError(f"group {group!r} is already dropped")
        self._resident.discard(group)
        return self._layout(group).pages

    def restore(self, group: str) -> range:
        """Take a dropped group's pages back. The caller has already reclaimed them from the KV
        manager (no KV lives there any more) and refills the weights afterwards."""
        if group in self._resident:
            raise PoolError(f"group {group!r} is resident")
        self._resident.add(group)
        return self._layout(group).pages

    # -------------------------------------------------------------- accounting

    @property
    def param_pages(self) -> int:
        return sum(self.layouts[g].num_pages for g in self._resident)

    @property
    def kv_pages(self) -> int:
        return self.num_pages - self.param_pages

    @property
    def page_bytes(self) -> int:
        return self.elems_per_page * self.storage.element_size()

    def _layout(self, group: str) -> GroupLayout:
        if group not in self.layouts:
            raise PoolError(f"unknown parameter group {group!r}")
        return self.layouts[group]
