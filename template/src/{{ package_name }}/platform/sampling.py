"""Head sampling decided at the door, before FastAPI's telemetry does any work.

FastAPI's telemetry costs every request something before it even asks `exclude` (it walks
the middleware stack looking for an older instrumentation), and with a ratio sampler
(`OTEL_TRACES_SAMPLER=parentbased_traceidratio`) it reads the propagation headers, builds
the server span's attributes and starts a span for every new trace, only for the sampler
to drop most of them: measured, that was most of what tracing at 10% cost a request.

So `TracedFastAPI` decides first, for each request (`EarlySampling.decide`): a probe is
never traced (tracing.py says why); a request with a `traceparent` follows its caller, in
FastAPI's telemetry as before; a new trace is drawn at the ratio. Sampled in, the root
sampler takes that decision instead of drawing again. Sampled out, or a probe, the
request carries FastAPI's own mark of a request its telemetry must not observe, so none
of it runs; a sampled-out request gets what a dropped server span would have given it, a
non-recording span with fresh ids, so its log lines still carry `trace_id` and outbound
calls pass `traceparent` on, marked not sampled.
"""

import random
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from opentelemetry import context, trace
from starlette.types import Receive, Scope, Send

from .health import PROBE_PATHS

if TYPE_CHECKING:  # the SDK is imported only when tracing is on
    from opentelemetry.sdk.trace.sampling import Sampler

# FastAPI's telemetry leaves alone a request whose scope has this key (it sets it itself
# on the requests it excludes, and on one it already observes).
UNOBSERVED = "fastapi.telemetry"
_LOW_64_BITS = (1 << 64) - 1
# Set by `decide` for a request it sampled in, read (once) by that request's root sampler.
_drawn_in: ContextVar[bool] = ContextVar("drawn_in", default=False)


class EarlySampling:
    """`ratio`: the root ratio of parentbased_traceidratio; None: only probes are decided
    here, everything else by the sampler (the other samplers decide nothing per request)."""

    def __init__(self, ratio: float | None) -> None:
        # TraceIdRatioBased's rule: sampled when the trace id's low 64 bits are under it.
        self.bound = None if ratio is None else round(ratio * (1 << 64))

    def decide(self, scope: Scope) -> int | None:
        """None: FastAPI's telemetry traces the request; 0: untraced, a probe; else the
        trace id of a new trace sampled out."""
        if scope.get("path") in PROBE_PATHS:
            return 0
        if self.bound is None or any(name == b"traceparent" for name, _ in scope["headers"]):
            return None
        trace_id = random.getrandbits(128)
        if trace_id & _LOW_64_BITS < self.bound:
            _drawn_in.set(True)
            return None
        return trace_id or 1

    def root_sampler(self, otherwise: "Sampler") -> "Sampler":
        """Samples the request `decide` drew in; any other new trace as `otherwise` says
        (spans started outside a request)."""
        from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

        class DrawnAtTheDoor(Sampler):  # type: ignore[misc]
            def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
                if _drawn_in.get():
                    _drawn_in.set(False)  # this request's server span only
                    attributes = kwargs.get("attributes", args[4] if len(args) > 4 else None)
                    return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
                return otherwise.should_sample(*args, **kwargs)

            def get_description(self) -> str:
                return f"DrawnAtTheDoor({otherwise.get_description()})"

        return DrawnAtTheDoor()


class TracedFastAPI(FastAPI):
    """The app when tracing is on: each request is decided before FastAPI's telemetry."""

    def __init__(self, *, sampling: EarlySampling, **options: Any) -> None:
        super().__init__(**options)
        self.sampling = sampling

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        decided = self.sampling.decide(scope) if scope["type"] == "http" else None
        if decided is None:
            await super().__call__(scope, receive, send)
            return
        scope[UNOBSERVED] = None
        if not decided:
            await super().__call__(scope, receive, send)
            return
        ids = trace.SpanContext(decided, random.getrandbits(64) or 1, is_remote=False)
        token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(ids)))
        try:
            await super().__call__(scope, receive, send)
        finally:
            context.detach(token)
