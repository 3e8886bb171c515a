-- The backpressure burst's wrk script (run with -t1): POSTs a text/plain body as fast as the
-- connections allow, counts the answers by status and the Retry-After values of the refusals, and
-- keeps the job id of every 202. done() writes the ids to IDS_FILE, one a line, and prints one JSON
-- line (prefixed BENCHBURST) that bench/run.py reads.
--
--   wrk -t1 -cN -dD -s bench/burst.lua URL -- BODY IDS_FILE

local req
local threads = {}
-- Per thread; done() (wrk's main Lua state) reads them with thread:get.
statuses = {}
retry_after = {}
ids = {}
ids_path = nil

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  req = wrk.format("POST", nil, {["Content-Type"] = "text/plain"}, args[1] or "bench")
  ids_path = args[2]
end

function request()
  return req
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  local value = headers["Retry-After"] or headers["retry-after"]
  if value ~= nil then
    retry_after[value] = (retry_after[value] or 0) + 1
  end
  if status == 202 then
    local id = headers["X-Bgfn-Job-Id"] or headers["x-bgfn-job-id"]
    if id ~= nil then
      ids[#ids + 1] = id
    end
  end
end

local function encode(counts)
  local parts = {}
  for key, count in pairs(counts) do
    table.insert(parts, string.format('"%s": %d', key, count))
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, requests)
  local merged_statuses, merged_retry = {}, {}
  for _, thread in ipairs(threads) do
    for key, count in pairs(thread:get("statuses") or {}) do
      merged_statuses[key] = (merged_statuses[key] or 0) + count
    end
    for key, count in pairs(thread:get("retry_after") or {}) do
      merged_retry[key] = (merged_retry[key] or 0) + count
    end
    local path = thread:get("ids_path")
    if path ~= nil then
      local file = assert(io.open(path, "a"))
      for _, id in ipairs(thread:get("ids") or {}) do
        file:write(id, "\n")
      end
      file:close()
    end
  end
  local e = summary.errors
  io.write(string.format('BENCHBURST {"requests": %d, "duration_s": %.6f, "errors": %d, "statuses": %s, ' ..
    '"retry_after": %s}\n', summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout,
    encode(merged_statuses), encode(merged_retry)))
end
