-- wrk script for every scenario; the environment chooses it:
--   BENCH_MODE    single (one command per request), batch (BENCH_BATCH commands per request),
--                 mixed (single, with every 20th request a status read of an earlier command: 5 %; with
--                 BENCH_LISTS=1 also one request in 100 a page of a device's commands: 1 %)
--   BENCH_API_KEY sent as X-API-Key when set; BENCH_PREFER sent as Prefer when set
--   BENCH_RUN     makes request ids unique across runs (mixed mode chooses its own ids to read back)
-- Device ids vary over 1,000 devices. done() prints one line: BENCH {json}.

local mode = os.getenv("BENCH_MODE") or "single"
local batch_size = tonumber(os.getenv("BENCH_BATCH") or "100")
local run = os.getenv("BENCH_RUN") or "0"
local lists = os.getenv("BENCH_LISTS") == "1"
thread_id = 0  -- a global: setup() gives each thread its own with thread:set()
local counter = 0

local COMMAND = '{"device_id":"device_%03d","command_type":"config_update",'
  .. '"payload":{"measurement_interval":600},"protocol":"coap","parser_script_ref":"efento_bidirectional_parser.py"%s}'

local threads = {}
reads = 0  -- a global: done() reads it from each thread with thread:get()

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
end

local function request_id(n)
  return string.format("bench-%s-%d-%d", run, thread_id, n)
end

function request()
  counter = counter + 1
  if mode == "batch" then
    local items = {}
    for i = 1, batch_size do
      items[i] = string.format(COMMAND, (counter * batch_size + i) % 1000, "")
    end
    return wrk.format("POST", "/api/v1/commands/batch", nil, '{"commands":[' .. table.concat(items, ",") .. "]}")
  end
  if mode == "mixed" then
    -- 50 in every 100: never a multiple of 20, so the status reads stay 5 %
    if lists and counter % 100 == 50 then
      reads = reads + 1
      return wrk.format("GET", string.format("/api/v1/commands?device_id=device_%03d&limit=20", counter % 1000))
    end
    -- 201 back: a command (not a read), answered long ago even with hundreds of connections per thread
    if counter % 20 == 0 and counter > 201 then
      reads = reads + 1
      return wrk.format("GET", "/api/v1/commands/" .. request_id(counter - 201) .. "/status", nil, nil)
    end
    local extra = string.format(',"request_id":"%s"', request_id(counter))
    return wrk.format("POST", "/api/v1/commands", nil, string.format(COMMAND, counter % 1000, extra))
  end
  return wrk.format("POST", "/api/v1/commands", nil, string.format(COMMAND, counter % 1000, ""))
end

function done(summary, latency, requests)
  local errors = summary.errors
  local all_reads = 0
  for _, thread in ipairs(threads) do all_reads = all_reads + (thread:get("reads") or 0) end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"reads":%d}\n',
    summary.requests, summary.duration, errors.status, errors.connect + errors.read + errors.write,
    errors.timeout, latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    all_reads))
end
