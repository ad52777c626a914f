"""Pool sizing on plain numbers: what a `DevicePool` of a layer range would hold, without
allocating it.

Everything here is computed with the functions the real pool uses (`param_groups`,
`plan_groups`, `page_elems`) and the same arithmetic as `ModelRunner` (pages = budget //
page_bytes) and `BlockManager` (a block is one page per local layer), so the simulator and a
real pool agree to the page. Invariants, as in the pool:

    param_pages + kv_pages == num_pages
    kv_blocks == kv_pages // num_layers_held,  kv_tokens == kv_blocks * page_size

Pure: a ModelConfig and integers in, integers out.
"""

from __future__ import annotations

from dataclasses import dataclass

from kunlite.config import ModelConfig
from kunlite.engine.memory import page_elems, plan_groups
from kunlite.engine.model import layer_group, param_groups


@dataclass(frozen=True)
class GroupSize:
    """One parameter group ("embed", "layer.{i}", "head") as the pool lays it out."""

    name: str
    params: int  # elements, unpadded
    param_bytes: int  # params * element size, unpadded
    pages: int  # whole pages the pool gives it (tensors aligned inside, rounded up)


@dataclass(frozen=True)
class PoolSizing:
    """The pool of one device holding layers [l0, l1) with a budget of device_memory bytes."""

    layers: tuple[int, int]
    page_size: int  # tokens per page
    page_bytes: int
    num_pages: int  # device_memory // page_bytes
    groups: tuple[GroupSize, ...]

    @property
    def num_layers_held(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def param_bytes(self) -> int:
        """Unpadded parameter bytes (what the checkpoint holds for this range)."""
        return sum(g.param_bytes for g in self.groups)

    @property
    def param_pages(self) -> int:
        return sum(g.pages for g in self.groups)

    @property
    def kv_pages(self) -> int:
        """Pages left to the KV side at start-up; negative when the parameters do not fit
        (the real pool refuses to start then: see `fits`)."""
        return self.num_pages - self.param_pages

    @property
    def fits(self) -> bool:
        """Whether DevicePool would accept this budget (it needs at least one KV page)."""
        return self.param_pages < self.num_pages

    @property
    def kv_blocks(self) -> int:
        return max(self.kv_pages, 0) // self.num_layers_held

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.page_size

    @property
    def kv_bytes(self) -> int:
        return max(self.kv_pages, 0) * self.page_bytes


def page_bytes(cfg: ModelConfig, page_size: int, elem_bytes: int) -> int:
    """Bytes of one page: K and V of page_size tokens of one layer."""
    return page_elems(page_size, cfg.num_kv_heads, cfg.head_dim) * elem_bytes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def group_sizes(
    cfg: ModelConfig, layers: tuple[int, int], elem_bytes: int, page_size: int
) -> tuple[GroupSize, ...]:
    """The parameter groups of a layer range, in pool order, with their page counts."""
    l0, l1 = layers
    if not 0 <= l0 < l1 <= cfg.num_layers:
        raise ValueError(f"layer range {layers} is not inside [0, {cfg.num_layers})")
    groups = param_groups(cfg, layers)
    layouts = plan_groups(groups, page_elems(page_size, cfg.num_kv_heads, cfg.head_dim))
    out = []
    for layout in layouts:
        n = sum(_numel(shape) for _, shape in groups[layout.name])
        out.append(GroupSize(layout.name, n, n * elem_bytes, layout.num_pages))
    return tuple(out)


def pool_sizing(
    cfg: ModelConfig,
    layers: tuple[int, int],
    *,
    elem_bytes: int,
    page_size: int,
    device_memory: int,
) -> PoolSizing:
    """What a DevicePool of this range and budget holds (as `ModelRunner` sizes it)."""
    if device_memory < 0 or elem_bytes < 1 or page_size < 1:
        raise ValueError("device_memory, elem_bytes and page_size must be positive")
    pb = page_bytes(cfg, page_size, elem_bytes)
    return PoolSizing(layers=layers, page_size=page_size, page_bytes=pb,
                      num_pages=device_memory // pb,
                      groups=group_sizes(cfg, layers, elem_bytes, page_size))


def model_params(cfg: ModelConfig) -> int:
    """Parameter count of the whole model (tied embeddings counted once)."""
    return sum(g.params for g in group_sizes(cfg, (0, cfg.num_layers), 1, 1))


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer (every layer has the same shapes)."""
    (g,) = [g for g in group_sizes(cfg, (0, 1), 1, 1) if g.name == layer_group(0)]
    return g.params


@dataclass(frozen=True)
class DropSizing:
    """What dropping a range of decoder layers frees on a device (KunServe's drop)."""

    layers: tuple[int, int]
    param_bytes: int  # unpadded parameter bytes of the dropped layers
    pages: int  # pool pages handed to the KV side
    bytes: int  # pages * page_bytes: the KV memory gained


def dropped_sizing(
    cfg: ModelConfig, layers: tuple[int, int], *, elem_bytes: int, page_size: int
) -> DropSizing:
    """Memory freed when a device drops the decoder layers [l0, l1) it holds.

    Only layer groups are dropped (as `ModelRunner.drop_layers` does); the embedding and the
    head stay. A layer's page count does not depend on the other groups a device holds, so
    this needs only the dropped range. How many whole KV blocks that adds depends on the
    device's spare pages: (kv_pages + pages) // layers_held - kv_pages // layers_held.
    """
    sizes = group_sizes(cfg, layers, elem_bytes, page_size)
    dropped = [g for g in sizes if g.name.startswith("layer.")]
    pages = sum(g.pages for g in dropped)
    return DropSizing(layers=layers, param_bytes=sum(g.param_bytes for g in dropped),
                      pages=pages, bytes=pages * page_bytes(cfg, page_size, elem_bytes))
