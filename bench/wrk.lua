-- The benchmark's wrk script (run with -t1): the request shape comes from the arguments after `--`,
-- and done() prints one JSON line (prefixed BENCHJSON) that bench/run.py reads.
--
--   wrk -t1 -cN -dD --latency -s bench/wrk.lua URL -- METHOD BODY STOP_AFTER MIX_EVERY MIX_PATH
--
-- METHOD/BODY: the request ("-" for no body; a body is sent as text/plain). STOP_AFTER > 0: exit
-- after that many responses (instead of at the duration), printing only BENCHSTOP {"requests": N}. MIX_EVERY > 0: every MIX_EVERY-th request
-- is instead a text/plain POST of "bench" to MIX_PATH (the memory figure's background share).
-- "status_errors" counts answers with a status of 400 or more (wrk's own rule).

local main_request, mix_request
local stop_after, mix_every = 0, 0
local sent, received = 0, 0

function init(args)
  local method = args[1] or "GET"
  local body = args[2]
  if body == nil or body == "-" then
    body = nil
  end
  stop_after = tonumber(args[3] or "0") or 0
  mix_every = tonumber(args[4] or "0") or 0
  local headers = {}
  if body ~= nil then
    headers["Content-Type"] = "text/plain"
  end
  main_request = wrk.format(method, nil, headers, body)
  if mix_every > 0 then
    mix_request = wrk.format("POST", args[5], {["Content-Type"] = "text/plain"}, "bench")
  end
  if stop_after > 0 then
    response = function(status, headers, body)
      received = received + 1
      if received == stop_after then
        -- wrk's main thread sleeps for the whole duration whatever the threads do: end the process
        -- here with the count (no latencies: the memory figure needs none).
        io.write(string.format('BENCHSTOP {"requests": %d}\n', received))
        io.flush()
        os.exit(0)
      end
    end
  end
end

function request()
  sent = sent + 1
  if mix_every > 0 and sent % mix_every == 0 then
    return mix_request
  end
  return main_request
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_s": %.6f, "errors": %d, "status_errors": %d, ' ..
    '"p50_ms": %.4f, "p90_ms": %.4f, "p99_ms": %.4f, "max_ms": %.4f, "mean_ms": %.4f}\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
end
