"""Transport de-duplication: has this (run, rank, incarnation, seq) been accepted already?"""

from __future__ import annotations


class SeqTracker:
    """Accepted seqs of one (run, rank, incarnation): a contiguous prefix plus stragglers.

    ``contiguous`` is the highest seq such that every seq up to it was accepted, or given up
    by the rank (its reported ``base`` says nothing below it will come again). That is the
    number the collector acknowledges.
    """

    def __init__(self) -> None:
        self.contiguous = 0
        self._above: set[int] = set()

    def seen(self, seq: int) -> bool:
        """Was ``seq`` accepted (or given up) already?"""
        return seq <= self.contiguous or seq in self._above

    def accept(self, seq: int) -> bool:
        """Record ``seq``; False if it was accepted before (a retransmit)."""
        if seq <= self.contiguous or seq in self._above:
            return False
        self._above.add(seq)
        self._advance()
        return True

    def skip_below(self, base: int) -> None:
        """The rank holds nothing below ``base`` any more: stop waiting for those seqs."""
        if base - 1 > self.contiguous:
            self.contiguous = base - 1
            self._above = {seq for seq in self._above if seq > self.contiguous}
            self._advance()

    def _advance(self) -> None:
        while self.contiguous + 1 in self._above:
            self.contiguous += 1
            self._above.discard(self.contiguous)
