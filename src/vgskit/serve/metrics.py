"""Request counters and latency histograms in the Prometheus text exposition format (version 0.0.4).

Written by hand to keep the service's dependencies at the web framework: a counter of requests by route
template, method and status, a histogram of request latency by route, and a histogram per search stage
(decode, resample, encode, search). Routes are labelled by their template (``/images/{index}/{item_id}``),
never by the raw path, so that the number of series stays bounded whatever clients request.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence

STAGES = ("decode", "resample", "encode", "search")
#: Upper bounds (seconds) of the histogram buckets: 1 ms to 10 s covers a cached answer up to a long query
#: on a slow CPU.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative-bucket histogram of one series (not thread-safe on its own: :class:`Metrics` locks)."""

    def __init__(self, buckets: Sequence[float] = BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> Iterable[str]:
        sep = "," if labels else ""
        cumulative = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else _number(bound)
            yield f'{name}_bucket{{{labels}{sep}le="{le}"}} {cumulative}'
        braces = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{braces} {_number(self.total)}"
        yield f"{name}_count{braces} {self.n}"


class Metrics:
    """The service's counters and histograms; every method is safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.request_seconds: dict[str, Histogram] = {}
        self.stage_seconds = {stage: Histogram() for stage in STAGES}
        self.in_flight = 0

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, method, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.request_seconds.setdefault(route, Histogram()).observe(seconds)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        with self._lock:
            for stage, value in seconds.items():
                self.stage_seconds[stage].observe(value)

    def render(self, extra_gauges: dict[str, tuple[str, float]] | None = None) -> str:
        """The exposition text; ``extra_gauges`` maps a metric name to ``(help, value)``."""
        with self._lock:
            out = ["# HELP vgskit_http_requests_total HTTP requests answered, by route template, method and status.",
                   "# TYPE vgskit_http_requests_total counter"]
            for (route, method, status), n in sorted(self.requests.items()):
                out.append(f'vgskit_http_requests_total{{route="{_escape(route)}",method="{_escape(method)}",'
                           f'status="{status}"}} {n}')
            out += ["# HELP vgskit_http_request_duration_seconds Time to answer a request, by route template.",
                    "# TYPE vgskit_http_request_duration_seconds histogram"]
            for route, hist in sorted(self.request_seconds.items()):
                out += hist.lines("vgskit_http_request_duration_seconds", f'route="{_escape(route)}"')
            out += ["# HELP vgskit_search_stage_duration_seconds Time spent in each stage of a search "
                    "(decode, resample, encode, search).",
                    "# TYPE vgskit_search_stage_duration_seconds histogram"]
            for stage, hist in self.stage_seconds.items():
                out += hist.lines("vgskit_search_stage_duration_seconds", f'stage="{stage}"')
            for name, (text, value) in (extra_gauges or {}).items():
                out += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {_number(value)}"]
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
