-- wrk script for every scenario; the environment chooses it:
--   BENCH_MODE    single (one command per request), batch (BENCH_BATCH commands per request),
--                 mixed (single, with every 20th request a status read of an earlier command: 5 %; with
--                 BENCH_LISTS=1 also one request in 100 a page of a device's commands: 1 %); each read is
--                 timed on its own (sent with an X-Request-ID the service echoes), so done() has their p99
--   BENCH_API_KEY sent as X-API-Key when set; BENCH_PREFER sent as Prefer when set
--   BENCH_RUN     makes request ids unique across runs (mixed mode chooses its own ids to read back)
--   BENCH_DEVICES device ids vary over this many devices (1000: device_000 … device_999), one after the other,
--                 from BENCH_DEVICE_OFFSET on (0)
--   BENCH_LIMIT   when above 0: send that many requests, then only GET /health until the last of them is
--                 answered, print LIMIT (the caller stops wrk) and count the rate over those requests alone
-- done() prints one line: BENCH {json}.

local ffi = require("ffi")
ffi.cdef([[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock, bench_timespec *t);
]])
local clock = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000000 + tonumber(clock.tv_nsec) / 1000
end

local mode = os.getenv("BENCH_MODE") or "single"
local batch_size = tonumber(os.getenv("BENCH_BATCH") or "100")
local run = os.getenv("BENCH_RUN") or "0"
local lists = os.getenv("BENCH_LISTS") == "1"
local devices = tonumber(os.getenv("BENCH_DEVICES") or "1000")
local device_format = "device_%0" .. #tostring(devices - 1) .. "d"
local device_offset = tonumber(os.getenv("BENCH_DEVICE_OFFSET") or "0")
local limit = tonumber(os.getenv("BENCH_LIMIT") or "0")
local IDLE = "bench-idle" -- the X-Request-ID of the GET /health sent once `limit` requests are out
thread_id = 0  -- a global: setup() gives each thread its own with thread:set()
local counter = 0

local COMMAND = '{"device_id":"%s","command_type":"config_update",'
  .. '"payload":{"measurement_interval":600},"protocol":"coap","parser_script_ref":"efento_bidirectional_parser.py"%s}'

local threads = {}
-- Globals, which done() reads from each thread with thread:get():
reads = 0
answered, failed, first_us, last_us = 0, 0, 0, 0 -- with a limit: its requests answered, non-2xx, first sent, last in
status_ms, list_ms = {}, {} -- each read's latency
local sent_at = {} -- X-Request-ID of a read in flight -> when it was sent
local read_headers = {}
local checked = false -- wrk calls request() once before the run to check it, and never sends that one

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  wrk.headers["Content-Type"] = "application/json"
  local key = os.getenv("BENCH_API_KEY")
  if key and key ~= "" then wrk.headers["X-API-Key"] = key end
  local prefer = os.getenv("BENCH_PREFER")
  if prefer and prefer ~= "" then wrk.headers["Prefer"] = prefer end
  for name, value in pairs(wrk.headers) do read_headers[name] = value end
end

local function request_id(n)
  return string.format("bench-%s-%d-%d", run, thread_id, n)
end

local function device(n)
  return string.format(device_format, (device_offset + n) % devices)
end

local function timed_get(kind, path)
  reads = reads + 1
  local id = string.format("bench-%s-%s-%d", kind, run, counter)
  read_headers["X-Request-ID"] = id
  sent_at[id] = now_us()
  return wrk.format("GET", path, read_headers, nil)
end

function request()
  if not checked then
    checked = true
    return wrk.format("GET", "/health", nil, nil)
  end
  counter = counter + 1
  if limit > 0 then
    if counter > limit then
      return wrk.format("GET", "/health", {["X-Request-ID"] = IDLE}, nil)
    end
    if counter == 1 then first_us = now_us() end
  end
  if mode == "batch" then
    local items = {}
    for i = 1, batch_size do
      items[i] = string.format(COMMAND, device((counter - 1) * batch_size + i - 1), "")
    end
    return wrk.format("POST", "/api/v1/commands/batch", nil, '{"commands":[' .. table.concat(items, ",") .. "]}")
  end
  if mode == "mixed" then
    -- 50 in every 100: never a multiple of 20, so the status reads stay 5 %
    if lists and counter % 100 == 50 then
      return timed_get("list", string.format("/api/v1/commands?device_id=%s&limit=20", device(counter)))
    end
    -- 201 back: a command (not a read), answered long ago even with hundreds of connections per thread
    if counter % 20 == 0 and counter > 201 then
      return timed_get("status", "/api/v1/commands/" .. request_id(counter - 201) .. "/status")
    end
    local extra = string.format(',"request_id":"%s"', request_id(counter))
    return wrk.format("POST", "/api/v1/commands", nil, string.format(COMMAND, device(counter), extra))
  end
  return wrk.format("POST", "/api/v1/commands", nil, string.format(COMMAND, device(counter), ""))
end

-- wrk hands every answer to response() only when the script defines it: only the loads that need it do.
if limit > 0 or mode == "mixed" then
  function response(status, headers, body)
    local id = headers["x-request-id"] or headers["X-Request-ID"]
    local started = id and sent_at[id]
    if started then
      sent_at[id] = nil
      local latencies = id:sub(7, 10) == "list" and list_ms or status_ms
      latencies[#latencies + 1] = (now_us() - started) / 1000
    end
    if limit > 0 and id ~= IDLE then
      answered = answered + 1
      if status > 299 then failed = failed + 1 end
      if answered == limit then
        last_us = now_us()
        io.write("LIMIT\n")
        io.flush()
      end
    end
  end
end

local function percentile(values, p)
  if #values == 0 then return 0 end
  table.sort(values)
  return values[math.max(1, math.ceil(#values * p / 100))]
end

function done(summary, latency, requests)
  local errors = summary.errors
  local all_reads, statuses, lists_read = 0, {}, {}
  local count, non2xx, duration = summary.requests, errors.status, summary.duration
  for _, thread in ipairs(threads) do
    all_reads = all_reads + (thread:get("reads") or 0)
    for _, ms in ipairs(thread:get("status_ms") or {}) do statuses[#statuses + 1] = ms end
    for _, ms in ipairs(thread:get("list_ms") or {}) do lists_read[#lists_read + 1] = ms end
    if limit > 0 then -- one thread (the bench runs wrk with -t1): its own count, over its own time
      count, non2xx = thread:get("answered"), thread:get("failed")
      local last = thread:get("last_us")
      if last > 0 then duration = last - thread:get("first_us") end
    end
  end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"reads":%d,'
      .. '"status_reads":%d,"status_p99_us":%d,"list_reads":%d,"list_p99_us":%d}\n',
    count, duration, non2xx, errors.connect + errors.read + errors.write,
    errors.timeout, latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    all_reads, #statuses, percentile(statuses, 99) * 1000, #lists_read, percentile(lists_read, 99) * 1000))
end
