"""``GET /metrics``: the server's counters in Prometheus' text format (prometheus_client, a registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no `_created` series: a scrape reads counters, not when they were made

# seconds: a token on a GPU to a 7B's first answer on a small CPU
_TTFT = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
_LATENCY = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class ServeMetrics:
    def __init__(self, server):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llava_edge_requests", "Answers ended, by API and how they ended "
                                "(eos, stop, max_tokens, context, cancelled, timeout, error)", ["api", "finish"],
                                registry=r)
        self.refused = Counter("llava_edge_requests_refused", "Requests refused before the model saw them, by "
                               "reason", ["api", "reason"], registry=r)
        self.prompt_tokens = Counter("llava_edge_prompt_tokens", "Prompt positions of answered requests, image "
                                     "positions included", registry=r)
        self.image_tokens = Counter("llava_edge_prompt_image_tokens", "Prompt positions that hold an image",
                                    registry=r)
        self.reused_tokens = Counter("llava_edge_prompt_reused_tokens", "Prompt positions not decoded: KV cells "
                                     "a sequence held or a saved file had", registry=r)
        self.reuse_hits = Counter("llava_edge_kv_reuse_hits", "Requests that reused KV cells beyond the first "
                                  "position", registry=r)
        self.image_file_loads = Counter("llava_edge_image_kv_file_loads", "Requests whose image cells came from "
                                        "a saved file (no vision graph, no image prefill)", registry=r)
        self.completion_tokens = Counter("llava_edge_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("llava_edge_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=_TTFT, registry=r)
        self.latency = Histogram("llava_edge_request_duration_seconds", "From arrival to the last token",
                                 buckets=_LATENCY, registry=r)
        queue = Gauge("llava_edge_queue_depth", "Requests waiting for a sequence", registry=r)
        queue.set_function(lambda: server.engine.queue_depth if server.engine else 0)
        active = Gauge("llava_edge_active_sequences", "Sequences answering or reading a prompt", registry=r)
        active.set_function(lambda: server.engine.active if server.engine else 0)

    def finished(self, api: str, req) -> None:
        self.requests.labels(api, req.finish_reason or "cancelled").inc()
        if req.finish_reason in ("cancelled", "error") and req.t_first_token is None:
            return
        self.prompt_tokens.inc(req.prompt_positions)
        self.image_tokens.inc(req.image_positions)
        self.reused_tokens.inc(req.reused_positions)
        if req.reused_positions > 1:
            self.reuse_hits.inc()
        if req.image_from_file:
            self.image_file_loads.inc()
        self.completion_tokens.inc(len(req.completion_ids))
        if req.t_first_token is not None:
            self.ttft.observe(req.t_first_token - req.t_submit)
        if req.t_done is not None:
            self.latency.observe(req.t_done - req.t_submit)

    def rejected(self, api: str, reason: str) -> None:
        self.refused.labels(api, reason).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
