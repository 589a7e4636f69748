-- wrk script for scripts/bench: meterd's and Limitador's check and consume
-- requests driven by wrk, a generator neither side wrote.
--
--   wrk -t2 -c64 -d5s -s loadtest/wrk/bench.lua http://127.0.0.1:PORT -- KIND NONCE [CUSTOMERS]
--
-- KIND
--   meterd-check       POST /v1/check {"customer":"c…","meter":"tokens","quantity":1}
--   meterd-consume     the same with "consume":true,"id":"<NONCE>-<thread>-<n>"
--   limitador-check    POST /check {"namespace":"bench","values":{"customer":"c…"},"delta":1}
--   limitador-consume  POST /check_and_report, same body
-- NONCE      makes consume ids unique across runs against one server (e.g. the
--            run's start time); within a run, ids are unique per thread and count.
-- CUSTOMERS  how many names c0 … c{N-1} to cycle over (default 10000, the
--            loadtest's naming: workload::customer_name). Thread t starts at
--            name t·4999 mod N and steps by one per request.
--
-- done() prints one line that `meterd-loadtest from-wrk` reads:
--   wrk-result {"kind":…,"requests":…,"duration_us":…,"status_errors":…,…,"latency":{"p50_us":…}}
-- status_errors are responses with status >= 400 (wrk's own count), which are
-- also in `requests`; a 2xx or 3xx other than 200 is not detected (neither
-- target sends one).

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

local KINDS = {
  ["meterd-check"] = { path = "/v1/check", consume = false },
  ["meterd-consume"] = { path = "/v1/check", consume = true },
  ["limitador-check"] = { path = "/check", consume = false, limitador = true },
  ["limitador-consume"] = { path = "/check_and_report", consume = false, limitador = true },
}

local spec, nonce, customers, cursor, sent, bodies, fixed, consume_headers

function init(args)
  kind = args[1]
  spec = KINDS[kind or ""]
  if spec == nil then
    io.stderr:write("bench.lua: KIND must be meterd-check, meterd-consume, limitador-check or limitador-consume\n")
    os.exit(2)
  end
  nonce = args[2] or "0"
  customers = tonumber(args[3] or "10000")
  if customers == nil or customers < 1 then
    io.stderr:write("bench.lua: CUSTOMERS must be a positive number\n")
    os.exit(2)
  end
  cursor = (thread_index * 4999) % customers
  sent = 0
  local headers = { ["Content-Type"] = "application/json" }
  bodies, fixed = {}, {}
  for i = 0, customers - 1 do
    local name = "c" .. i
    if spec.limitador then
      fixed[i] = wrk.format("POST", spec.path, headers,
        '{"namespace":"bench","values":{"customer":"' .. name .. '"},"delta":1}')
    elseif spec.consume then
      bodies[i] = '{"customer":"' .. name .. '","meter":"tokens","quantity":1,"consume":true,"id":"'
    else
      fixed[i] = wrk.format("POST", spec.path, headers,
        '{"customer":"' .. name .. '","meter":"tokens","quantity":1}')
    end
  end
  consume_headers = headers
end

function request()
  local i = cursor
  cursor = cursor + 1
  if cursor == customers then
    cursor = 0
  end
  if spec.consume then
    sent = sent + 1
    local body = bodies[i] .. nonce .. "-" .. thread_index .. "-" .. sent .. '"}'
    return wrk.format("POST", spec.path, consume_headers, body)
  end
  return fixed[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  local us = function(q) return latency:percentile(q) end
  io.write(string.format(
    'wrk-result {"kind":"%s","threads":%d,"requests":%d,"duration_us":%d,"status_errors":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"latency":{"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,"max_us":%.1f,"mean_us":%.1f}}\n',
    tostring(threads[1] and threads[1]:get("kind") or "?"), #threads, summary.requests, summary.duration,
    e.status, e.connect, e.read, e.write, e.timeout,
    us(50), us(90), us(99), us(99.9), latency.max, latency.mean))
end
