-- wrk reporter for bench/load.py: one machine-readable line at the end of a run.
-- Latencies are in microseconds; errors.status counts responses that were not 2xx/3xx.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\"requests\":%d,\"duration_us\":%d,\"connect_errors\":%d,\"read_errors\":%d,"
      .. "\"write_errors\":%d,\"timeouts\":%d,\"non_2xx\":%d,\"p50_us\":%d,\"p99_us\":%d,"
      .. "\"max_us\":%d}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
