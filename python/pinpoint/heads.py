"""Head sets and head scores: what locate returns and what tune consumes.

Heads are (layer, query head) pairs, counted as query heads also under GQA.
"""
from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["HeadSet", "HeadScores", "as_head_list"]


def as_head_list(heads, *, n_layers: int | None = None, n_heads: int | None = None, sort: bool = False,
                 where: str = "heads", allow_empty: bool = False) -> list[tuple[int, int]]:
    """THE head validator: ``heads`` as a list of (layer, query head) int pairs.

    Accepts a :class:`HeadSet`, any iterable of 2-item pairs (tuples, lists, 0-d int
    tensors or numpy ints inside them, records with ``.layer``/``.head``), or an int
    tensor of shape [k, 2]. Semantics, the same for every caller:

    - order is kept as given (``sort=True`` returns them sorted by (layer, head));
    - a pair that is not two ints (bools refused) -> TypeError naming the entry;
    - a layer outside 0..n_layers-1 or a head outside 0..n_heads-1 (checked when the bound
      is given) -> ValueError naming the entry and the valid range;
    - a repeated pair -> ValueError naming the second occurrence;
    - an empty input -> ValueError unless ``allow_empty``.

    ``where`` is how the input is named in the messages (e.g. ``"heads"``, ``"exclude"``).
    """
    items = _head_pairs(heads, where)
    if not items and not allow_empty:
        raise ValueError(f"{where} is empty: select at least one (layer, head)")
    seen: set[tuple[int, int]] = set()
    for i, (layer, head) in enumerate(items):
        # Each message states the range twice in two phrasings because callers (and their
        # tests) have long matched either wording.
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ValueError(f"{where}[{i}] = ({layer}, {head}): layer {layer} is out of range; the model has "
                             f"{n_layers} layers (0..{n_layers - 1}), so layer {layer} is out of range for a "
                             f"model with {n_layers} layers")
        if n_heads is not None and not 0 <= head < n_heads:
            raise ValueError(f"{where}[{i}] = ({layer}, {head}): head {head} is out of range; each layer has "
                             f"{n_heads} query heads (0..{n_heads - 1}), so head {head} is out of range for "
                             f"{n_heads} query heads per layer")
        if (layer, head) in seen:
            raise ValueError(f"{where}[{i}] = ({layer}, {head}) is a duplicate: it is listed twice, and each "
                             "head may appear once")
        seen.add((layer, head))
    return sorted(items) if sort else items


def _head_pairs(heads, where: str) -> list[tuple[int, int]]:
    """(layer, head) int pairs from the accepted input forms; TypeError names a bad entry."""
    if isinstance(heads, HeadSet):
        return list(heads)
    if isinstance(heads, (str, bytes)):
        raise TypeError(f"{where} must be a HeadSet or an iterable of (layer, head) pairs, got the string "
                        f"{heads!r}")
    if isinstance(heads, torch.Tensor):
        heads = heads.tolist()
    if not isinstance(heads, Iterable):
        raise TypeError(f"{where} must be a HeadSet or an iterable of (layer, head) pairs, got "
                        f"{type(heads).__name__}")
    items = []
    for i, item in enumerate(heads):
        if hasattr(item, "layer") and hasattr(item, "head") and not isinstance(item, tuple):
            item = (item.layer, item.head)  # a Head-like record
        try:
            pair = tuple(item)
        except TypeError:
            pair = None
        if pair is None or len(pair) != 2:
            raise TypeError(f"{where}[{i}] = {item!r} is not a (layer, head) pair: each entry must be a "
                            "(layer, head) pair")
        if any(isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool) for v in pair):
            raise TypeError(f"{where}[{i}] = {item!r}: layer and head must be ints, not bools")
        try:
            items.append(tuple(operator.index(v) for v in pair))
        except TypeError:
            raise TypeError(f"{where}[{i}] = {item!r}: layer and head must be ints") from None
    return items


class HeadSet:
    """An ordered set of (layer, head) pairs, most important first when it comes from
    :meth:`HeadScores.top`."""

    def __init__(self, heads: Iterable[tuple[int, int]] = ()):
        self._heads = tuple(as_head_list(heads, allow_empty=True))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._heads)

    def __len__(self) -> int:
        return len(self._heads)

    def __getitem__(self, i):
        return HeadSet(self._heads[i]) if isinstance(i, slice) else self._heads[i]

    def __contains__(self, item) -> bool:
        return tuple(item) in self._heads

    def __eq__(self, other) -> bool:
        if isinstance(other, HeadSet):
            return self._heads == other._heads
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._heads)

    def __repr__(self) -> str:
        return f"HeadSet({list(self._heads)})"

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [heads]} in layer order."""
        out: dict[int, list[int]] = {}
        for layer, head in sorted(self._heads):
            out.setdefault(layer, []).append(head)
        return out

    def to_list(self) -> list[list[int]]:
        return [list(h) for h in self._heads]

    def save(self, path: str | Path) -> Path:
        """Write a JSON file {"format": ..., "heads": [[layer, head], ...]}."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": "pinpoint.HeadSet/1", "heads": self.to_list()}, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, k: int | None = None) -> "HeadSet":
        """A HeadSet JSON file, or a saved HeadScores directory (its top `k` heads, default
        about 4% of all heads as in the paper)."""
        path = Path(path)
        if path.is_dir():
            scores = HeadScores.load(path)
            k = k if k is not None else max(1, round(0.04 * scores.values.numel()))
            return scores.top(k)
        if not path.exists():
            raise FileNotFoundError(f"heads file {path} does not exist")
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"heads file {path} is not JSON: {exc}") from None
        heads = info.get("heads") if isinstance(info, dict) else info
        if heads is None:
            raise ValueError(f"heads file {path} has no 'heads' list")
        hs = cls(as_head_list(heads, where=f"{path}: heads"))
        return hs[:k] if k is not None else hs

    def mask(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """bool [n_layers, n_heads], True at the selected heads."""
        as_head_list(self._heads, n_layers=n_layers, n_heads=n_heads, allow_empty=True)
        m = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in self._heads:
            m[layer, head] = True
        return m


class HeadScores:
    """Scores of every head: ``values`` float32 CPU [n_layers, n_heads].

    ``per_pair`` [n_pairs, n_layers, n_heads] keeps the per-pair effects that ``values``
    aggregates; ``base`` [n_pairs] the unpatched metric; ``meta`` says how they were made.
    """

    def __init__(self, values: torch.Tensor, *, per_pair: torch.Tensor | None = None,
                 base: torch.Tensor | None = None, meta: dict | None = None):
        if values.dim() != 2:
            raise ValueError(f"HeadScores.values must be [n_layers, n_heads], got {tuple(values.shape)}")
        self.values = values.detach().to("cpu", torch.float32).contiguous()
        self.per_pair = None if per_pair is None else per_pair.detach().to("cpu", torch.float32).contiguous()
        self.base = None if base is None else base.detach().to("cpu", torch.float32).contiguous()
        self.meta = dict(meta or {})
        self.meta.setdefault("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def n_layers(self) -> int:
        return self.values.shape[0]

    @property
    def n_heads(self) -> int:
        return self.values.shape[1]

    def __repr__(self) -> str:
        return (f"HeadScores({self.n_layers}x{self.n_heads}, method={self.meta.get('method')!r}, "
                f"metric={self.meta.get('metric')!r}, top={self.top(min(3, self.values.numel())).to_list()})")

    def top(self, k: int, *, largest: bool = False) -> HeadSet:
        """The k heads with the most negative scores (largest=True: most positive), best first.
        Ties break by (layer, head) order, so the result is deterministic."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.values.numel():
            raise ValueError(f"top: k must be an int in [0, {self.values.numel()}], got {k!r}")
        flat = self.values.reshape(-1)
        keys = -flat if largest else flat
        order = sorted(range(flat.numel()), key=lambda i: (float(keys[i]), i))[:k]
        return HeadSet((i // self.n_heads, i % self.n_heads) for i in order)

    # --- persistence: safetensors for the tensors, JSON for the rest ---------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (a directory): scores.safetensors + scores.json."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"values": self.values}
        if self.per_pair is not None:
            tensors["per_pair"] = self.per_pair
        if self.base is not None:
            tensors["base"] = self.base
        tmp = path / "scores.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(path / "scores.safetensors")
        (path / "scores.json.tmp").write_text(json.dumps({"format": "pinpoint.HeadScores/1", "meta": self.meta},
                                                         indent=2, default=str))
        (path / "scores.json.tmp").replace(path / "scores.json")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        from safetensors.torch import load_file

        path = Path(path)
        st, js = path / "scores.safetensors", path / "scores.json"
        if not st.exists() or not js.exists():
            raise FileNotFoundError(f"{path} is not a saved HeadScores directory (needs scores.safetensors "
                                    "and scores.json)")
        info = json.loads(js.read_text())
        if info.get("format") != "pinpoint.HeadScores/1":
            raise ValueError(f"{js}: unknown format {info.get('format')!r}")
        t = load_file(str(st))
        return cls(t["values"], per_pair=t.get("per_pair"), base=t.get("base"), meta=info.get("meta", {}))

    # --- the picture ---------------------------------------------------------------------
    def plot(self, path: str | Path, *, k: int | None = None, largest: bool = False, title: str | None = None,
             planted=None) -> Path:
        """Heatmap PNG (layers x heads, diverging colours centred at 0), the top-k heads
        boxed; optional `planted` heads get a dot (e.g. an organism's known heads)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        v = self.values.numpy()
        lim = float(abs(v).max()) or 1.0
        fig_w = min(14.0, 2.5 + 0.32 * self.n_heads)
        fig_h = min(12.0, 1.8 + 0.3 * self.n_layers)
        fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
        im = ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        k = k if k is not None else max(1, round(0.04 * v.size))
        for rank, (layer, head) in enumerate(self.top(min(k, v.size), largest=largest)):
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=1.6, ec="black"))
            if self.n_heads <= 48:
                ax.text(head, layer, str(rank + 1), ha="center", va="center", fontsize=6)
        for layer, head in (planted or []):
            ax.plot(head, layer, marker="o", ms=3, color="gold", mec="black", mew=0.5)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        unit = "%" if self.meta.get("aggregate") == "relative" else "metric change"
        ax.set_title(title or f"{self.meta.get('method', 'patching')} patching: effect on "
                     f"{self.meta.get('metric', 'metric')} ({unit}); top {k} boxed")
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
