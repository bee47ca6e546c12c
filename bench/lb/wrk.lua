-- wrk script for bench/lb/run.py.
-- setup: with WRK_ADDRS="a.b.c.d:port,e.f.g.h:port" in the environment, thread i connects to the
--        i-th address (round robin), so one wrk process can load several task addresses directly;
-- delay: with WRK_DELAY_MS=d, each connection waits d ms after a response before its next request
--        (a fixed offered load of about connections x 1000 / d requests per second);
-- done:  prints one line `WRKJSON {...}` with counts, errors and latency percentiles (microseconds).
local addrs = nil
local next_addr = 0

function setup(thread)
  local spec = os.getenv("WRK_ADDRS")
  if not spec or spec == "" then return end
  if not addrs then
    addrs = {}
    for item in string.gmatch(spec, "[^,]+") do
      local host, port = string.match(item, "^(.+):(%d+)$")
      addrs[#addrs + 1] = wrk.lookup(host, port)[1]
    end
  end
  thread.addr = addrs[(next_addr % #addrs) + 1]
  next_addr = next_addr + 1
end

local think = tonumber(os.getenv("WRK_DELAY_MS") or "")
if think and think > 0 then
  function delay()
    return think
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local p = {}
  for _, q in ipairs({50, 90, 99, 99.9}) do
    p[#p + 1] = string.format('"%s":%d', tostring(q), latency:percentile(q))
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d},"latency_us":{%s,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, table.concat(p, ","), latency.max, latency.mean))
end
