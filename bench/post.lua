-- wrk script: POST pre-signed Replicate prediction webhooks, cycling through a file
-- made by bench/run.py (one request per line: webhook-id \t timestamp \t signature \t body).
-- wrk's LuaJIT has no HMAC, so signatures are made beforehand with fresh timestamps.
local requests = {}
local counter = 0
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local threads = 0
-- Each wrk thread takes every n-th line, so no two threads ever send the same
-- request: a repeated webhook-id and body is a duplicate, which the relay stores
-- but does not forward again. (A thread's init runs before the next thread's
-- setup, so the thread count comes from the environment, not from counting.)
nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
-- Several wrk processes at once (one per relay instance) split the file the same way.
local parts = tonumber(os.getenv("BENCH_PARTS") or "1")
local part = tonumber(os.getenv("BENCH_PART") or "0")

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local function load(path)
  local n = 0
  for line in io.lines(path) do
    n = n + 1
    local id, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    if id and (n % (nthreads * parts)) == part * nthreads + tid then
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
