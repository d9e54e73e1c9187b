"""A histogram a room keeps in plain Python and reports in its RoomStats; the httpserver exports it
to Prometheus unchanged (cumulative bucket counts, sum, count)."""

import bisect

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, name: str, buckets: tuple[float, ...]):
        self.name, self.buckets = name, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple:
        """(name, upper bounds, cumulative counts per bound and +Inf, sum)"""
        cumulative, total = [], 0
        for count in self.counts:
            total += count
            cumulative.append(total)
        return self.name, self.buckets, tuple(cumulative), self.sum
