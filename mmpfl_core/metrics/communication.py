"""Communication cost: bytes each site uploads and downloads per federated round.

Bytes are computed from what is actually passed (``numel * element_size``), so a strategy that
shares only a head, or casts to float16 before sending, is charged exactly for that. Framing and
compression overheads of a real transport are not modelled. One megabyte here is 10**6 bytes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mmpfl_core.errors import DataError

DIRECTIONS = ("up", "down")


def tensor_bytes(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> dict[str, int]:
    """Bytes per dtype name, e.g. ``{"float32": 4000, "int64": 16}``.

    Args:
        tensors: a mapping (such as a ``state_dict``) or any iterable of tensors.
    """
    items = tensors.values() if isinstance(tensors, Mapping) else tensors
    out: dict[str, int] = defaultdict(int)
    for t in items:
        if not isinstance(t, torch.Tensor):
            raise DataError(
                f"expected torch.Tensor values, got {type(t).__name__}; pass a state_dict or a list of tensors."
            )
        out[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return dict(sorted(out.items()))


class CommunicationCounter:
    """Accumulates bytes per (round, site, direction, dtype).

    ``up`` is site -> server, ``down`` is server -> site. The state is a flat list of records so
    that it serialises to JSON and can be checkpointed with the rest of a run.
    """

    def __init__(self) -> None:
        # (round, site, direction, dtype) -> bytes
        self._bytes: dict[tuple[int, Any, str, str], int] = defaultdict(int)

    def _add(self, round: int, site: Any, direction: str, tensors) -> int:
        total = 0
        for dtype, nbytes in tensor_bytes(tensors).items():
            self._bytes[(int(round), site, direction, dtype)] += nbytes
            total += nbytes
        return total

    def add_upload(self, round: int, site: Any, tensors) -> int:
        """Charge what ``site`` sends to the server in ``round``; returns the bytes added."""
        return self._add(round, site, "up", tensors)

    def add_download(self, round: int, site: Any, tensors) -> int:
        """Charge what the server sends to ``site`` in ``round``; returns the bytes added."""
        return self._add(round, site, "down", tensors)

    def rounds(self) -> list[int]:
        """Rounds with at least one record, ascending."""
        return sorted({key[0] for key in self._bytes})

    def round_totals(self, round: int) -> dict[str, int]:
        """``{"up": bytes, "down": bytes}`` summed over sites in one round."""
        out = dict.fromkeys(DIRECTIONS, 0)
        for (r, _, direction, _), nbytes in self._bytes.items():
            if r == round:
                out[direction] += nbytes
        return out

    def cumulative_totals(self, up_to_round: int | None = None) -> dict[str, int]:
        """``{"up", "down"}`` bytes over all rounds ``<= up_to_round`` (all rounds if None)."""
        out = dict.fromkeys(DIRECTIONS, 0)
        for (r, _, direction, _), nbytes in self._bytes.items():
            if up_to_round is None or r <= up_to_round:
                out[direction] += nbytes
        return out

    def dtype_totals(self, direction: str | None = None) -> dict[str, int]:
        """Bytes per dtype over all rounds, for one direction or both."""
        self._check_direction(direction)
        out: dict[str, int] = defaultdict(int)
        for (_, _, d, dtype), nbytes in self._bytes.items():
            if direction is None or d == direction:
                out[dtype] += nbytes
        return dict(sorted(out.items()))

    def site_totals(self, direction: str | None = None) -> dict[Any, int]:
        """Bytes per site over all rounds, for one direction or both."""
        self._check_direction(direction)
        out: dict[Any, int] = defaultdict(int)
        for (_, site, d, _), nbytes in self._bytes.items():
            if direction is None or d == direction:
                out[site] += nbytes
        return dict(out)

    def total_bytes(self, direction: str | None = None) -> int:
        """All bytes so far, for one direction or both."""
        self._check_direction(direction)
        return sum(n for (_, _, d, _), n in self._bytes.items() if direction is None or d == direction)

    def megabytes(self, direction: str | None = None) -> float:
        """:meth:`total_bytes` in MB (10**6 bytes)."""
        return self.total_bytes(direction) / 1e6

    def as_rows(self) -> list[dict[str, int]]:
        """One row per round: ``round, bytes_up, bytes_down, cum_bytes_up, cum_bytes_down``."""
        rows, cum = [], dict.fromkeys(DIRECTIONS, 0)
        for r in self.rounds():
            tot = self.round_totals(r)
            for d in DIRECTIONS:
                cum[d] += tot[d]
            rows.append(
                {
                    "round": r,
                    "bytes_up": tot["up"],
                    "bytes_down": tot["down"],
                    "cum_bytes_up": cum["up"],
                    "cum_bytes_down": cum["down"],
                }
            )
        return rows

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"records": [[round, site, direction, dtype, bytes], ...]}``."""
        return {"records": [[r, s, d, t, n] for (r, s, d, t), n in self._bytes.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the counts with those from :meth:`state_dict`."""
        try:
            records = [(int(r), s, str(d), str(t), int(n)) for r, s, d, t, n in state["records"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"not a CommunicationCounter state ({exc}); pass the dict returned by "
                "CommunicationCounter.state_dict()."
            ) from exc
        self._bytes = defaultdict(int)
        for r, s, d, t, n in records:
            self._check_direction(d)
            self._bytes[(r, s, d, t)] += n

    @staticmethod
    def _check_direction(direction: str | None) -> None:
        if direction is not None and direction not in DIRECTIONS:
            raise DataError(f"direction={direction!r}; use 'up', 'down' or None for both.")
