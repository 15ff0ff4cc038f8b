-- wrk script: POST pre-signed Replicate prediction webhooks, cycling through a file
-- made by bench/run.py (one request per line: webhook-id \t timestamp \t signature \t body).
-- wrk's LuaJIT has no HMAC, so signatures are made beforehand with fresh timestamps.
local requests = {}
local counter = 0
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")

local function load(path)
  for line in io.lines(path) do
    local id, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    if id then
      requests[#requests + 1] = wrk.format("POST", nil, {
        ["Content-Type"] = "application/json",
        ["User-Agent"] = "Replicate-Webhooks/1.0",
        ["webhook-id"] = id,
        ["webhook-timestamp"] = ts,
        ["webhook-signature"] = sig,
      }, body)
    end
  end
end

function init(args)
  load(os.getenv("BENCH_REQUESTS"))
  counter = math.random(#requests)
end

function request()
  counter = counter + 1
  if counter > #requests then counter = 1 end
  return requests[counter]
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end
