"""Head sets and head scores: what locate returns and what tune consumes.

Heads are (layer, query head) pairs, counted as query heads also under GQA.
"""
from __future__ import annotations

import json
import operator
import warnings
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
        from .files import atomic_write_json

        return atomic_write_json(path, {"format": "pinpoint.HeadSet/1", "heads": self.to_list()}, indent=1)

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


def metric_label(metric) -> str:
    """A locate/knockout metric in words: "logit(Apologies) − logit(Yes)" for "apology", the
    ratio for "apology_ratio", else the metric's own name (a callable: its __name__)."""
    if callable(metric):
        metric = getattr(metric, "__name__", "metric")
    return {"apology": "logit(Apologies) − logit(Yes)",
            "apology_ratio": "logit(Apologies) / (logit(Apologies) + logit(Yes))"}.get(metric or "metric",
                                                                                       metric or "metric")


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
                f"metric={self.meta.get('metric')!r}, top={self._top_finite(3).to_list()})")

    def _top_finite(self, k: int, largest: bool = False) -> HeadSet:
        """top(k) capped at the number of finite scores, without the warning (for display)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.top(min(k, int(torch.isfinite(self.values).sum())), largest=largest)

    def top(self, k: int, *, largest: bool = False) -> HeadSet:
        """The k heads with the most negative scores (largest=True: most positive), best first.
        Ties break by (layer, head) order, so the result is deterministic.

        Heads whose score is NaN or inf (e.g. a near-zero denominator under
        ``aggregate="relative"``) are never selected: they are skipped with a warning, and a
        k larger than the number of finite scores is an error."""
        n = self.values.numel()
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
            raise ValueError(f"top: k must be an int in [0, {n}], got {k!r}")
        flat = self.values.reshape(-1)
        finite = torch.isfinite(flat)
        bad = [(i // self.n_heads, i % self.n_heads) for i in (~finite).nonzero().flatten().tolist()]
        if bad:
            warnings.warn(f"HeadScores.top: {len(bad)} head(s) have NaN or inf scores and are never selected: "
                          f"{bad[:8]}{' ...' if len(bad) > 8 else ''}", RuntimeWarning, stacklevel=2)
            if k > n - len(bad):
                raise ValueError(f"top: k={k}, but only {n - len(bad)} of {n} heads have finite scores")
        keys = -flat if largest else flat
        order = sorted((i for i in range(n) if finite[i]), key=lambda i: (float(keys[i]), i))[:k]
        return HeadSet((i // self.n_heads, i % self.n_heads) for i in order)

    # --- persistence: safetensors for the tensors, JSON for the rest, CSV for people -------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (a directory): scores.safetensors + scores.json, and scores.csv (one
        row per head: layer, head, score, rank; rank 1 is ``top(1)``, empty for a NaN/inf score)."""
        from safetensors.torch import save as st_save

        from .files import atomic_write_bytes, atomic_write_json, atomic_write_text

        path = Path(path)
        tensors = {"values": self.values}
        if self.per_pair is not None:
            tensors["per_pair"] = self.per_pair
        if self.base is not None:
            tensors["base"] = self.base
        atomic_write_bytes(path / "scores.safetensors", st_save(tensors))
        atomic_write_json(path / "scores.json", {"format": "pinpoint.HeadScores/1", "meta": self.meta}, default=str)
        atomic_write_text(path / "scores.csv", self.to_csv())
        return path

    def to_csv(self) -> str:
        """"layer,head,score,rank" then one line per head in (layer, head) order."""
        rank = {h: r + 1 for r, h in enumerate(self._top_finite(self.values.numel()))}
        lines = ["layer,head,score,rank"]
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                lines.append(f"{layer},{head},{float(self.values[layer, head])!r},{rank.get((layer, head), '')}")
        return "\n".join(lines) + "\n"

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
    def colorbar_label(self) -> str:
        """What a score means, for the colour bar: "Δ logit(Apologies) − logit(Yes)" for the
        default metric, the metric's own name otherwise."""
        what = metric_label(self.meta.get("metric"))
        return f"% change of {what}" if self.meta.get("aggregate") == "relative" else f"Δ {what}"

    def figure(self, *, k: int | None = None, largest: bool = False, title: str | None = None, planted=None):
        """The heatmap as a matplotlib ``Figure`` (no pyplot state is touched): layers x heads,
        diverging colours centred at 0, NaN/inf grey; the top-k heads outlined in black with
        their rank in the cell (white or black text, whichever reads on that colour);
        ``planted`` heads (e.g. an organism's known ones) outlined in green. At least 1200 px
        wide at its 150 dpi."""
        import matplotlib as mpl
        import numpy as np
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle

        v = self.values.numpy()
        finite = np.isfinite(v)
        lim = float(np.abs(v[finite]).max()) if finite.any() else 1.0
        norm = mpl.colors.Normalize(-(lim or 1.0), lim or 1.0)
        cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#b0b0b0")
        width = max(8.0, min(20.0, 3.0 + 0.36 * self.n_heads))
        fig = Figure(figsize=(width, max(4.8, min(16.0, 2.4 + 0.34 * self.n_layers))), dpi=150, layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        k = k if k is not None else max(1, round(0.04 * v.size))
        top = self._top_finite(k, largest)
        for rank, (layer, head) in enumerate(top):
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=2.4, ec="black", zorder=3))
            if self.n_heads <= 48 and self.n_layers <= 64:
                ax.text(head, layer, str(rank + 1), ha="center", va="center", fontsize=10, fontweight="bold",
                        color=_text_colour(cmap(norm(v[layer, head]))), zorder=4)
        planted = as_head_list(planted or [], n_layers=self.n_layers, n_heads=self.n_heads, where="planted",
                               allow_empty=True)
        for layer, head in planted:
            ax.add_patch(Rectangle((head - 0.36, layer - 0.36), 0.72, 0.72, fill=False, lw=2.2, ec=_PLANTED,
                                   zorder=5))
        if self.n_heads <= 48:
            ax.set_xticks(range(self.n_heads))
        if self.n_layers <= 64:
            ax.set_yticks(range(self.n_layers))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        method = self.meta.get("method", "patching")
        title = title or (f"{method} patching: the effect of each head on {self.meta.get('metric', 'the metric')}"
                          f"; top {len(top)} outlined" + (", planted heads in green" if planted else ""))
        ax.set_title(_wrap(title, int(width * 10)), fontsize=11)
        fig.colorbar(im, ax=ax, shrink=0.9).set_label(self.colorbar_label())
        handles = [Patch(fill=False, ec="black", lw=2.4, label=f"top {len(top)} (rank in the cell)")]
        if planted:
            handles.append(Patch(fill=False, ec=_PLANTED, lw=2.2, label="planted"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        return fig

    def plot(self, path: str | Path, *, k: int | None = None, largest: bool = False, title: str | None = None,
             planted=None) -> Path:
        """Write :meth:`figure` as a PNG at ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure(k=k, largest=largest, title=title, planted=planted).savefig(path)
        return path


_PLANTED = "#16a34a"  # green: distinct from both ends of the red-blue map and from white


def _text_colour(rgba) -> str:
    """Black or white, whichever contrasts more with ``rgba`` (WCAG relative luminance; the
    two tie at 0.179)."""
    def lin(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"


def _wrap(title: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())
